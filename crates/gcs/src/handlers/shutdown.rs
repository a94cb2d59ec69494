use crate::agent::Agent;
use crate::error::Result;
use bridge::message::{BaseRequest, BaseResponse};

/// ShutdownGraceful (SIGTERM to the init process) and ShutdownForced (SIGKILL); for the UVM's
/// own id, the whole agent.
pub fn handle(agent: &Agent, req: BaseRequest, forced: bool) -> Result<BaseResponse> {
    agent.shutdown_container(&req.base.container_id, forced)?;
    Ok(super::ok())
}
