use crate::agent::Agent;
use bridge::message::{DumpStacksResponse, ResponseBase};

/// hcsshim's GCS answers with its goroutine stacks; ferry-gcs answers with its state, which is
/// what an operator debugging a stuck container wants to see.
pub fn handle(agent: &Agent) -> DumpStacksResponse {
    DumpStacksResponse {
        base: ResponseBase::ok(),
        guest_stacks: agent.dump(),
    }
}
