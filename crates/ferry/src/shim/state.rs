//! What the shim knows about the containers and processes in its UVM.

use super::output::OutputLog;
use host::InputPipe;
use host::{Container, Process};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// How long output may keep flowing after the exit before the exit is reported anyway.
const OUTPUT_GRACE: Duration = Duration::from_secs(10);

pub type ExitState = Option<Result<i32, String>>;

/// One process started through this shim.
pub struct ProcRec {
    pub pid: u32,
    pub container: String,
    pub args: Vec<String>,
    pub tty: bool,
    pub is_init: bool,
    pub process: Arc<Process>,
    /// The stdin pipe, while no client holds it.
    pub stdin: tokio::sync::Mutex<Option<InputPipe>>,
    /// Where the stdin stream stands, readable even while a client holds the pipe (for
    /// snapshots: bytes sent but not yet acknowledged must survive a handoff).
    pub stdin_state: Option<host::stdio::StdinHandle>,
    pub stdout: Option<Arc<OutputLog>>,
    pub stderr: Option<Arc<OutputLog>>,
    /// Set once the process has exited and its output is all captured.
    pub exit: watch::Receiver<ExitState>,
}

#[derive(Serialize)]
pub struct ProcInfo {
    pub pid: u32,
    pub container: String,
    pub command: Vec<String>,
    pub tty: bool,
    pub init: bool,
    pub status: &'static str,
    pub exit_code: Option<i32>,
}

/// Where a process's output is captured.
pub struct Logs<'a> {
    dir: &'a std::path::Path,
    limit: u64,
    /// Continue existing logs (a restore) instead of starting new ones.
    append: bool,
    /// A client is about to attach: keep every byte for it (see [`OutputLog::release_hold`]).
    hold: bool,
    /// stdout and stderr logs whose capture a restore started before the process was
    /// adopted (its output flows again before the agent has negotiated).
    captured: [Option<Arc<OutputLog>>; 2],
}

impl<'a> Logs<'a> {
    /// New logs of `limit` bytes each under `dir`; with `attaching`, held for a client.
    pub fn new(dir: &'a std::path::Path, limit: u64, attaching: bool) -> Logs<'a> {
        Logs {
            dir,
            limit,
            append: false,
            hold: attaching,
            captured: [None, None],
        }
    }

    /// The existing logs under `dir`, continued (new ones, if missing, of `limit` bytes).
    pub fn existing(dir: &'a std::path::Path, limit: u64) -> Logs<'a> {
        Logs {
            dir,
            limit,
            append: true,
            hold: false,
            captured: [None, None],
        }
    }

    /// The log of `pid`'s stream `name` (stdout or stderr) under this directory: `pipe`
    /// captured into it, or without a pipe, when continuing, the file already there.
    pub fn open(
        &self,
        pid: u32,
        name: &str,
        pipe: Option<host::OutputPipe>,
    ) -> std::io::Result<Option<Arc<OutputLog>>> {
        let path = super::output::log_path(self.dir, pid, name);
        Ok(match pipe {
            Some(pipe) => Some(OutputLog::capture(
                &path,
                pipe,
                self.append,
                self.limit,
                self.hold,
            )?),
            None if self.append && path.exists() => Some(OutputLog::existing(&path)),
            None => None,
        })
    }

    /// With the stdout and stderr logs a restore is capturing already (instead of capturing
    /// the process's pipes).
    pub fn captured(
        mut self,
        stdout: Option<Arc<OutputLog>>,
        stderr: Option<Arc<OutputLog>>,
    ) -> Self {
        self.captured = [stdout, stderr];
        self
    }
}

impl ProcRec {
    /// Takes over a just-started process: captures its output into `logs` and watches for
    /// its exit.
    pub fn start(
        process: Process,
        container: &str,
        args: Vec<String>,
        tty: bool,
        is_init: bool,
        logs: Logs<'_>,
    ) -> std::io::Result<Arc<ProcRec>> {
        Self::build(process, container, args, tty, is_init, logs, None)
    }

    /// A process from a snapshot: its logs continue where they are; a known exit code stays.
    pub fn restore(
        process: Process,
        container: &str,
        args: Vec<String>,
        tty: bool,
        is_init: bool,
        logs: Logs<'_>,
        exit_code: Option<i32>,
    ) -> std::io::Result<Arc<ProcRec>> {
        Self::build(process, container, args, tty, is_init, logs, exit_code)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        process: Process,
        container: &str,
        args: Vec<String>,
        tty: bool,
        is_init: bool,
        mut logs: Logs<'_>,
        exit_code: Option<i32>,
    ) -> std::io::Result<Arc<ProcRec>> {
        let pid = process.pid();
        std::fs::create_dir_all(logs.dir)?;
        let [early_stdout, early_stderr] = std::mem::take(&mut logs.captured);
        let stdout = match early_stdout {
            Some(l) => Some(l),
            None => logs.open(pid, "stdout", process.take_stdout())?,
        };
        let stderr = match early_stderr {
            Some(l) => Some(l),
            None => logs.open(pid, "stderr", process.take_stderr())?,
        };
        let stdin = process.take_stdin();
        let stdin_state = stdin.as_ref().and_then(|s| s.state_handle());
        // Once the process has exited nobody reads its stdin: the delivery ends then, or it
        // would keep the port listened on (and its buffer) for as long as the shim lives.
        let stdin_delivery = stdin.as_ref().and_then(|s| s.delivery_abort_handle());
        let process = Arc::new(process);
        let (tx, exit) = watch::channel(exit_code.map(Ok));
        if exit_code.is_some() {
            if let Some(d) = stdin_delivery {
                d.abort();
            }
        } else {
            let (p, out, err) = (process.clone(), stdout.clone(), stderr.clone());
            tokio::spawn(async move {
                let code = p.wait().await.map_err(|e| e.to_string());
                if let (Ok(_), Some(d)) = (&code, stdin_delivery) {
                    d.abort();
                }
                let captured = async {
                    for log in [out, err].into_iter().flatten() {
                        log.finished().await;
                    }
                };
                if tokio::time::timeout(OUTPUT_GRACE, captured).await.is_err() {
                    tracing::warn!(
                        pid = p.pid(),
                        "output still open {OUTPUT_GRACE:?} after the exit; reporting the exit"
                    );
                }
                tracing::info!(
                    pid = p.pid(),
                    container = p.container_id(),
                    ?code,
                    "process exited"
                );
                let _ = tx.send(Some(code));
            });
        }
        Ok(Arc::new(ProcRec {
            pid,
            container: container.to_string(),
            args,
            tty,
            is_init,
            process,
            stdin: tokio::sync::Mutex::new(stdin),
            stdin_state,
            stdout,
            stderr,
            exit,
        }))
    }

    pub fn exit_state(&self) -> ExitState {
        self.exit.borrow().clone()
    }

    pub async fn wait(&self) -> Result<i32, String> {
        let mut rx = self.exit.clone();
        match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => e.clone().unwrap_or_else(|| Err("no exit".into())),
            Err(_) => Err("the shim lost track of the process".into()),
        }
    }

    pub fn info(&self) -> ProcInfo {
        let exit = self.exit_state();
        ProcInfo {
            pid: self.pid,
            container: self.container.clone(),
            command: self.args.clone(),
            tty: self.tty,
            init: self.is_init,
            status: match exit {
                None => "running",
                Some(Ok(_)) => "exited",
                Some(Err(_)) => "unknown",
            },
            exit_code: exit.and_then(|e| e.ok()),
        }
    }
}

pub struct ContainerRec {
    pub id: String,
    pub container: Arc<Container>,
    pub init: Arc<ProcRec>,
    pub procs: BTreeMap<u32, Arc<ProcRec>>,
    pub rootfs: PathBuf,
    pub created: SystemTime,
}

#[derive(Serialize)]
pub struct ContainerInfo {
    pub id: String,
    pub pid: u32,
    pub status: &'static str,
    pub exit_code: Option<i32>,
    pub command: Vec<String>,
    pub rootfs: PathBuf,
    pub processes: usize,
    pub created: u64,
}

impl ContainerRec {
    pub fn info(&self) -> ContainerInfo {
        let init = self.init.info();
        ContainerInfo {
            id: self.id.clone(),
            pid: self.init.pid,
            status: init.status,
            exit_code: init.exit_code,
            command: self.init.args.clone(),
            rootfs: self.rootfs.clone(),
            processes: self.procs.len(),
            created: self
                .created
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}
