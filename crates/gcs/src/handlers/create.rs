use crate::agent::Agent;
use crate::error::Result;
use bridge::message::{ContainerCreateRequest, ContainerCreateResponse, ResponseBase};

pub fn handle(agent: &Agent, req: ContainerCreateRequest) -> Result<ContainerCreateResponse> {
    agent.create_container(&req.base.container_id, req.container_config.0)?;
    Ok(ContainerCreateResponse {
        base: ResponseBase::ok(),
        selected_protocol_version: bridge::negotiate::PROTOCOL_VERSION,
    })
}
