//! A process running in the guest, as the host sees it: its pid, its stdio streams, its
//! outstanding WaitForProcess, and the [`MigrationState`] that lets another host process take
//! it over.

use crate::error::{HostError, Result};
use crate::guest_connection::GuestConnection;
use crate::stdio::{InputPipe, OutputPipe};
use bridge::INFINITE_WAIT;
use bridge::message::{
    Request, RequestBase, ResizeConsoleRequest, Response, SignalProcessOptions,
    SignalProcessRequest, WaitForProcessRequest,
};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use tokio::sync::{oneshot, watch};

/// What the save path records per process (hcsshim's `cow.MigrationState`): the stdio ports
/// (0 = no pipe) and the id of the outstanding WaitForProcess call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationState {
    pub stdin_port: u32,
    pub stdout_port: u32,
    pub stderr_port: u32,
    pub wait_call_id: u64,
}

/// The host ends of a process's stdio (None where no pipe was asked for, or already taken).
#[derive(Default)]
pub struct ProcessIo {
    pub stdin: Option<InputPipe>,
    pub stdout: Option<OutputPipe>,
    pub stderr: Option<OutputPipe>,
}

pub struct Process {
    conn: GuestConnection,
    container_id: String,
    pid: u32,
    state: MigrationState,
    io: Mutex<ProcessIo>,
    exit: watch::Receiver<Option<Result<i32>>>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("container", &self.container_id)
            .field("pid", &self.pid)
            .field("state", &self.state)
            .finish()
    }
}

fn wait_request(container_id: &str, pid: u32, timeout_in_ms: u32) -> Request {
    Request::WaitForProcess(WaitForProcessRequest {
        base: RequestBase::for_container(container_id),
        process_id: pid,
        timeout_in_ms,
    })
}

/// Turns the answer of a WaitForProcess into an exit code.
fn exit_code_of(r: Result<Response>) -> Result<i32> {
    match r? {
        Response::WaitForProcess(w) => Ok(w.exit_code as i32),
        other => Err(HostError::Protocol(format!(
            "{:?} answered a WaitForProcess",
            other.rpc()
        ))),
    }
}

/// Publishes the exit code when the wait's answer arrives.
fn watch_exit(
    conn: &GuestConnection,
    rx: oneshot::Receiver<Result<Response>>,
) -> watch::Receiver<Option<Result<i32>>> {
    let (tx, exit) = watch::channel(None);
    let conn = conn.clone();
    tokio::spawn(async move {
        let code = exit_code_of(conn.await_reply(rx).await);
        let _ = tx.send(Some(code));
    });
    exit
}

impl Process {
    /// A running process this host is to wait for with a new WaitForProcess: one the guest
    /// just started for it, or one that no saved state describes (its host was killed after
    /// starting it, before recording it). `io` are its pipes (for the latter, listened on
    /// again at its ports: see [`crate::stdio::reopen`]).
    pub async fn started(
        conn: GuestConnection,
        container_id: &str,
        pid: u32,
        ports: (u32, u32, u32),
        io: ProcessIo,
    ) -> Result<Process> {
        let (wait_id, rx) = conn
            .send(&wait_request(container_id, pid, INFINITE_WAIT))
            .await?;
        let exit = watch_exit(&conn, rx);
        Ok(Process {
            container_id: container_id.to_string(),
            pid,
            state: MigrationState {
                stdin_port: ports.0,
                stdout_port: ports.1,
                stderr_port: ports.2,
                wait_call_id: wait_id,
            },
            io: Mutex::new(io),
            exit,
            conn,
        })
    }

    /// Re-attaches to a process another host started (the restore path): `adopted` is its
    /// outstanding wait, registered under the saved id (see
    /// [`GuestConnection::register_pending`]) without sending a new one. Probes once whether
    /// the process already exited while no host was connected (the original answer may have
    /// been lost), and takes whichever answer comes first. Without `probe` (the caller knows
    /// the process is still running, from a process list taken after the reconnection), the
    /// adopted wait alone answers: its answer goes to the new connection.
    pub fn adopt(
        conn: GuestConnection,
        container_id: &str,
        pid: u32,
        state: MigrationState,
        adopted: oneshot::Receiver<Result<Response>>,
        io: ProcessIo,
        probe: bool,
    ) -> Process {
        let (tx, exit) = watch::channel(None);
        let probe_conn = conn.clone();
        let request = wait_request(container_id, pid, 0);
        tokio::spawn(async move {
            let probed = async {
                if !probe {
                    return None;
                }
                match probe_conn.call(request).await {
                    Ok(r) => Some(exit_code_of(Ok(r))),
                    // Still running (or the guest is slow to say): the adopted wait will answer.
                    Err(HostError::Timeout(_) | HostError::NoAnswer(_)) => None,
                    Err(e) => Some(Err(e)),
                }
            };
            let adopted = async { exit_code_of(probe_conn.await_reply(adopted).await) };
            tokio::pin!(probed, adopted);
            let code = tokio::select! {
                p = &mut probed => match p {
                    Some(code) => code,
                    None => adopted.await,
                },
                a = &mut adopted => a,
            };
            let _ = tx.send(Some(code));
        });
        Process {
            container_id: container_id.to_string(),
            pid,
            state,
            io: Mutex::new(io),
            exit,
            conn,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    pub fn migration_state(&self) -> MigrationState {
        self.state
    }

    pub fn connection(&self) -> &GuestConnection {
        &self.conn
    }

    /// Takes the host end of stdin (None if there is no pipe or it was taken).
    pub fn take_stdin(&self) -> Option<InputPipe> {
        self.io
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stdin
            .take()
    }

    pub fn take_stdout(&self) -> Option<OutputPipe> {
        self.io
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stdout
            .take()
    }

    pub fn take_stderr(&self) -> Option<OutputPipe> {
        self.io
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stderr
            .take()
    }

    /// Waits for the exit code.
    pub async fn wait(&self) -> Result<i32> {
        let mut exit = self.exit.clone();
        match exit.wait_for(|e| e.is_some()).await {
            Ok(e) => e
                .clone()
                .unwrap_or_else(|| Err(HostError::Protocol("no exit".into()))),
            Err(_) => Err(HostError::ConnectionClosed("exit watcher gone".into())),
        }
    }

    /// The exit code if the process has exited (None while it runs).
    pub fn exit_code(&self) -> Option<Result<i32>> {
        self.exit.borrow().clone()
    }

    /// Sends a signal (0 = SIGKILL, as in hcsshim).
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.conn
            .call(Request::SignalProcess(SignalProcessRequest {
                base: RequestBase::for_container(&self.container_id),
                process_id: self.pid,
                options: Some(SignalProcessOptions { signal }),
            }))
            .await
            .map(drop)
    }

    pub async fn kill(&self) -> Result<()> {
        self.signal(9).await
    }

    pub async fn resize(&self, height: u16, width: u16) -> Result<()> {
        self.conn
            .call(Request::ResizeConsole(ResizeConsoleRequest {
                base: RequestBase::for_container(&self.container_id),
                process_id: self.pid,
                height,
                width,
            }))
            .await
            .map(drop)
    }

    /// Closes stdin (the process sees end-of-file once the guest relays it). Not an error when
    /// there is no stdin pipe or it was closed already.
    pub fn close_stdin(&self) {
        drop(self.take_stdin());
    }

    /// Closes every stdio stream still held. Streams that were never opened (a saved port of
    /// 0, a restore that did not re-open them) are simply skipped.
    pub fn close(&self) {
        let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        *io = ProcessIo::default();
    }
}
