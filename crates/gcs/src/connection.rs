//! The bridge connection: dial the host, read requests, hand them to handlers; when the
//! connection breaks, dial again. Everything the agent runs survives a broken connection, and a
//! new connection starts un-negotiated, as a fresh hcsshim host expects.

use crate::agent::Agent;
use crate::handlers;
use crate::outbox::Scope;
use bridge::io::{ReadError, read_frame};
use bridge::message::{NegotiateProtocolRequest, Request, ResponseBase};
use bridge::{BRIDGE_PORT, Frame, FrameError, Header, Identifier};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncRead;
use tokio::sync::watch;
use transport::BoxStream;

/// Dials the bridge until it answers (or the agent is shutting down).
async fn dial_bridge(agent: &Agent) -> Option<BoxStream> {
    let mut attempts: u64 = 0;
    let mut last_warn = Instant::now();
    let mut shutdown = agent.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            return None;
        }
        match agent
            .config
            .transport
            .dial(BRIDGE_PORT, agent.config.dial_timeout)
            .await
        {
            Ok(s) => return Some(s),
            Err(e) => {
                attempts += 1;
                // Quiet while the host is away (a migration blackout), but not silent.
                if attempts == 1 || last_warn.elapsed() > Duration::from_secs(10) {
                    tracing::warn!(attempts, error = %e, transport = %agent.config.transport.describe(), "bridge not reachable; retrying every {:?}", agent.config.reconnect_interval);
                    last_warn = Instant::now();
                } else {
                    tracing::debug!(attempts, error = %e, "bridge dial failed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(agent.config.reconnect_interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Serves the bridge until the host shuts the UVM down.
pub async fn serve(agent: Arc<Agent>) {
    let mut generation = 0u64;
    while let Some(stream) = dial_bridge(&agent).await {
        generation += 1;
        tracing::info!(connection = generation, "bridge connected");
        let (reader, writer) = tokio::io::split(stream);
        // Buffered: a frame's header and body usually arrive together, and are then read with
        // one system call instead of two.
        let reader = tokio::io::BufReader::with_capacity(64 * 1024, reader);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut writer_task =
            tokio::spawn(agent.outbox.clone().run_writer(generation, writer, stop_rx));
        let mut shutdown = agent.shutdown.subscribe();
        let (reason, flush) = tokio::select! {
            r = read_loop(&agent, generation, reader) => r,
            _ = &mut writer_task => ("writing to the host failed".to_string(), false),
            _ = shutdown.wait_for(|s| *s) => ("utility VM shutting down".to_string(), true),
        };
        if flush {
            // The agent is the one hanging up: let the last answers (an error for the bad
            // frame, the shutdown response) reach the host first.
            let _ =
                tokio::time::timeout(Duration::from_secs(2), agent.outbox.drained_for(generation))
                    .await;
        }
        let _ = stop_tx.send(true);
        let _ = writer_task.await;
        tracing::info!(connection = generation, %reason, "bridge connection ended");
        // The next host (a restarted one, or a migration's destination) is coming.
        crate::priority::host_changed();
    }
}

/// Reads and dispatches frames until the connection ends; returns why it ended, and whether
/// the agent itself is hanging up (so answers still queued should be flushed first).
async fn read_loop<R: AsyncRead + Unpin>(
    agent: &Arc<Agent>,
    generation: u64,
    mut r: R,
) -> (String, bool) {
    let mut negotiated = false;
    let max = agent.config.max_frame_size;
    loop {
        let frame = match read_frame(&mut r, max).await {
            Ok(f) => f,
            Err(ReadError::Frame(e)) => {
                tracing::warn!(error = %e, "bad frame from host");
                answer_bad_frame(agent, generation, &e);
                if e.is_stream_fatal() {
                    return (format!("unrecoverable frame error: {e}"), true);
                }
                continue;
            }
            Err(ReadError::Closed) => return ("closed by host".into(), false),
            Err(e) => return (e.to_string(), false),
        };
        let Identifier::Request(rpc) = frame.ident else {
            tracing::warn!(ident = %frame.ident, id = frame.id, "the host sent a non-request; ignored");
            continue;
        };
        let request = match Request::parse(rpc, &frame) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable request");
                answer_bad_frame(agent, generation, &e);
                continue;
            }
        };
        let activity = request.base().activity_id.clone();
        match request {
            Request::NegotiateProtocol(n) => {
                let result = handlers::negotiate::handle(&n);
                negotiated |= result.is_ok();
                agent.respond(
                    Scope::Connection(generation),
                    frame.id,
                    rpc,
                    &activity,
                    result,
                    None,
                );
                if negotiated {
                    // Only now may queued notifications and waits flow to this host.
                    agent.outbox.set_negotiated(generation);
                    agent.host_back.send_replace(generation);
                    log_negotiated(generation, &n);
                }
            }
            _ if !negotiated => {
                agent.respond(
                    Scope::Connection(generation),
                    frame.id,
                    rpc,
                    &activity,
                    Err(crate::error::GcsError::NotImplemented(format!(
                        "{} before NegotiateProtocol: negotiate the protocol version first",
                        rpc.name()
                    ))),
                    None,
                );
            }
            // Requests that only look at or poke the agent's state are answered inline (a task
            // hop per request is most of a round trip's cost); those that wait or spawn get a
            // task of their own so the connection keeps reading.
            request @ (Request::GetProperties(_)
            | Request::SignalProcess(_)
            | Request::ResizeConsole(_)
            | Request::Start(_)
            | Request::DumpStacks(_)
            | Request::ModifySettings(_)
            | Request::UpdateContainer(_)
            | Request::LifecycleNotification(_)) => {
                handlers::dispatch(agent.clone(), generation, frame.id, request).await;
            }
            request => {
                let agent = agent.clone();
                tokio::spawn(handlers::dispatch(agent, generation, frame.id, request));
            }
        }
    }
}

fn log_negotiated(generation: u64, n: &NegotiateProtocolRequest) {
    tracing::info!(
        connection = generation,
        min = n.minimum_version,
        max = n.maximum_version,
        "protocol negotiated"
    );
}

/// Answers a request whose frame could not be decoded, when it was a request at all.
fn answer_bad_frame(agent: &Agent, generation: u64, e: &FrameError) {
    let Some((id, raw_type)) = e.request_to_answer() else {
        return;
    };
    let body =
        serde_json::to_vec(&ResponseBase::error(e.hresult(), e.to_string())).unwrap_or_default();
    let response_type = bridge::ident::raw_response_type(raw_type);
    let bytes = match Identifier::from_u32(response_type) {
        Ok(Identifier::Response(rpc)) => Frame {
            ident: Identifier::Response(rpc),
            id,
            body,
        }
        .encode(agent.config.max_frame_size)
        .ok(),
        // An unknown request type still gets an answer under its own type with kind 2.
        _ => {
            let mut v = Header {
                raw_type: response_type,
                size: (bridge::HEADER_SIZE + body.len()) as u32,
                id,
            }
            .encode()
            .to_vec();
            v.extend_from_slice(&body);
            Some(v)
        }
    };
    if let Some(bytes) = bytes {
        agent.send_raw(
            generation,
            bytes,
            format!("error answer to id {id} ({:#x})", e.hresult()),
        );
    }
}
