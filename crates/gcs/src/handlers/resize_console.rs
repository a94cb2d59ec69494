use crate::agent::Agent;
use crate::error::Result;
use bridge::message::{BaseResponse, ResizeConsoleRequest};

pub fn handle(agent: &Agent, req: ResizeConsoleRequest) -> Result<BaseResponse> {
    agent.resize_console(
        &req.base.container_id,
        req.process_id,
        req.height,
        req.width,
    )?;
    Ok(super::ok())
}
