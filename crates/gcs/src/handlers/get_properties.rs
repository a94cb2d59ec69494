use crate::agent::Agent;
use crate::error::{GcsError, Result};
use bridge::JsonString;
use bridge::message::{
    GetPropertiesRequest, GetPropertiesResponse, Properties, ResponseBase, property_type,
};

/// Supports the ProcessList property (also the answer to an empty query).
pub fn handle(agent: &Agent, req: GetPropertiesRequest) -> Result<GetPropertiesResponse> {
    let types = &req.query.0.property_types;
    if let Some(other) = types
        .iter()
        .find(|t| t.as_str() != property_type::PROCESS_LIST)
    {
        return Err(GcsError::NotImplemented(format!(
            "property type {other:?} is not supported by ferry-gcs (supported: {})",
            property_type::PROCESS_LIST
        )));
    }
    Ok(GetPropertiesResponse {
        base: ResponseBase::ok(),
        properties: JsonString(Properties {
            process_list: agent.process_list(&req.base.container_id)?,
        }),
    })
}
