//! One handler per bridge request, as small functions over the [`Agent`].

pub mod create;
pub mod delete_state;
pub mod dump_stacks;
pub mod execute_process;
pub mod get_properties;
pub mod modify_settings;
pub mod negotiate;
pub mod resize_console;
pub mod shutdown;
pub mod signal_process;
pub mod start;
pub mod wait_for_process;

use crate::agent::Agent;
use crate::error::GcsError;
use crate::outbox::Scope;
use bridge::message::{BaseResponse, Request, Response, ResponseBase};
use std::sync::Arc;

/// Plain success for requests that return nothing else.
pub(crate) fn ok() -> BaseResponse {
    BaseResponse::from(ResponseBase::ok())
}

/// Runs one negotiated request and queues its answer.
pub async fn dispatch(agent: Arc<Agent>, generation: u64, id: u64, request: Request) {
    let rpc = request.rpc();
    let activity = request.base().activity_id.clone();
    tracing::debug!(rpc = rpc.name(), id, container = %request.base().container_id, "request");
    let result = match request {
        Request::WaitForProcess(w) => {
            // Answers on its own schedule, possibly on a later connection.
            return wait_for_process::handle(agent, generation, id, w).await;
        }
        Request::Create(r) => create::handle(&agent, r).map(Response::Create),
        Request::Start(r) => start::handle(&agent, r).map(Response::Start),
        Request::ShutdownGraceful(r) => {
            shutdown::handle(&agent, r, false).map(Response::ShutdownGraceful)
        }
        Request::ShutdownForced(r) => {
            shutdown::handle(&agent, r, true).map(Response::ShutdownForced)
        }
        Request::ExecuteProcess(r) => execute_process::handle(&agent, r)
            .await
            .map(Response::ExecuteProcess),
        Request::SignalProcess(r) => signal_process::handle(&agent, r).map(Response::SignalProcess),
        Request::ResizeConsole(r) => resize_console::handle(&agent, r).map(Response::ResizeConsole),
        Request::GetProperties(r) => get_properties::handle(&agent, r).map(Response::GetProperties),
        Request::ModifySettings(r) => modify_settings::handle(&r).map(Response::ModifySettings),
        Request::DumpStacks(_) => Ok(Response::DumpStacks(dump_stacks::handle(&agent))),
        Request::DeleteContainerState(r) => {
            delete_state::handle(&agent, r).map(Response::DeleteContainerState)
        }
        Request::UpdateContainer(r) => Err(GcsError::NotImplemented(format!(
            "UpdateContainer (resource limits) is not implemented by ferry-gcs; container {:?} is unchanged",
            r.base.container_id
        ))),
        Request::LifecycleNotification(_) => Err(GcsError::NotImplemented(
            "LifecycleNotification is not implemented by ferry-gcs".into(),
        )),
        Request::NegotiateProtocol(n) => negotiate::handle(&n),
    };
    agent.respond(
        Scope::Connection(generation),
        id,
        rpc,
        &activity,
        result,
        None,
    );
}
