use crate::agent::Agent;
use crate::error::Result;
use bridge::message::{BaseRequest, BaseResponse};

pub fn handle(agent: &Agent, req: BaseRequest) -> Result<BaseResponse> {
    agent.delete_container_state(&req.base.container_id)?;
    Ok(super::ok())
}
