use crate::agent::Agent;
use crate::error::Result;
use bridge::message::{BaseResponse, SignalProcessRequest};

/// Sends `Options.Signal` (absent or 0: SIGKILL).
pub fn handle(agent: &Agent, req: SignalProcessRequest) -> Result<BaseResponse> {
    let signal = req.options.map(|o| o.signal).unwrap_or(0);
    agent.signal_process(&req.base.container_id, req.process_id, signal)?;
    Ok(super::ok())
}
