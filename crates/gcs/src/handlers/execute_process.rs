use crate::agent::Agent;
use crate::error::Result;
use bridge::message::{ExecuteProcessRequest, ExecuteProcessResponse, ResponseBase};
use std::sync::Arc;

pub async fn handle(
    agent: &Arc<Agent>,
    req: ExecuteProcessRequest,
) -> Result<ExecuteProcessResponse> {
    let pid = agent
        .execute_process(
            &req.base.container_id,
            req.settings.process_parameters.0,
            req.settings.vsock_stdio_relay_settings,
        )
        .await?;
    Ok(ExecuteProcessResponse {
        base: ResponseBase::ok(),
        process_id: pid,
    })
}
