//! WaitForProcess answers only when the process exits. The answer is *sticky*: if the
//! connection it was asked on breaks first, it goes to the next negotiated connection, where a
//! restored host has adopted the same request id. The exit record is kept until an answer has
//! actually been written to a host.

use crate::agent::{Agent, WaitTarget};
use crate::error::GcsError;
use crate::outbox::Scope;
use bridge::message::{Response, ResponseBase, WaitForProcessRequest, WaitForProcessResponse};
use bridge::{INFINITE_WAIT, Rpc};
use std::sync::Arc;
use std::time::Duration;

pub async fn handle(agent: Arc<Agent>, generation: u64, id: u64, req: WaitForProcessRequest) {
    let pid = req.process_id;
    let activity = req.base.activity_id.clone();
    let answer =
        |scope, result: Result<u32, GcsError>, delivered: Option<Box<dyn FnOnce() + Send>>| {
            let result = result.map(|code| {
                Response::WaitForProcess(WaitForProcessResponse {
                    base: ResponseBase::ok(),
                    exit_code: code,
                })
            });
            agent.respond(scope, id, Rpc::WaitForProcess, &activity, result, delivered);
        };
    let target = match agent.wait_target(&req.base.container_id, pid) {
        Ok(t) => t,
        Err(e) => return answer(Scope::Connection(generation), Err(e), None),
    };
    let mut rx = match target {
        WaitTarget::Known(code) => return answer(Scope::Sticky, Ok(code as u32), None),
        WaitTarget::Pending(rx) => rx,
    };
    let exited = rx.wait_for(|c| c.is_some());
    let code = if req.timeout_in_ms == INFINITE_WAIT {
        exited.await.ok().and_then(|c| *c)
    } else {
        match tokio::time::timeout(Duration::from_millis(req.timeout_in_ms.into()), exited).await {
            Ok(r) => r.ok().and_then(|c| *c),
            Err(_) => {
                return answer(
                    Scope::Connection(generation),
                    Err(GcsError::Timeout(format!(
                        "process {pid} still running after {} ms",
                        req.timeout_in_ms
                    ))),
                    None,
                );
            }
        }
    };
    match code {
        Some(code) => {
            let agent2 = agent.clone();
            answer(
                Scope::Sticky,
                Ok(code as u32),
                Some(Box::new(move || agent2.exit_delivered(pid))),
            )
        }
        // The record was deleted (DeleteContainerState) before the process exited.
        None => answer(
            Scope::Connection(generation),
            Err(GcsError::process_not_found(pid)),
            None,
        ),
    }
}
