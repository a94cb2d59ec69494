//! Collects every child that exits (the agent may be PID 1 in the UVM, and is a child
//! subreaper otherwise, so orphans land here too) and hands each exit status to whoever
//! registered for that pid.

use nix::sys::wait::{WaitPidFlag, waitpid};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Exits of pids nobody has registered for yet are kept this long: a child can exit before
/// the spawner has registered it.
const EARLY_EXIT_TTL: Duration = Duration::from_secs(30);
const MAX_EARLY_EXITS: usize = 4096;

#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    waiting: HashMap<u32, oneshot::Sender<i32>>,
    early: HashMap<u32, (i32, Instant)>,
}

impl Reaper {
    /// Registers interest in `pid`'s exit code.
    pub fn register(&self, pid: u32) -> oneshot::Receiver<i32> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.early.remove(&pid) {
            Some((code, at)) if at.elapsed() < EARLY_EXIT_TTL => {
                let _ = tx.send(code);
            }
            _ => {
                inner.waiting.insert(pid, tx);
            }
        }
        rx
    }

    /// Reaps every exited child without blocking.
    pub fn reap_all(&self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => return,
                Ok(status) => {
                    let (Some(pid), Some(code)) = (status.pid(), super::exit_code(status)) else {
                        continue;
                    };
                    self.deliver(pid.as_raw() as u32, code);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                // ECHILD: no children left.
                Err(_) => return,
            }
        }
    }

    fn deliver(&self, pid: u32, code: i32) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = inner.waiting.remove(&pid) {
            let _ = tx.send(code);
            return;
        }
        tracing::debug!(pid, code, "reaped a process nobody registered (yet)");
        if inner.early.len() >= MAX_EARLY_EXITS {
            inner
                .early
                .retain(|_, (_, at)| at.elapsed() < EARLY_EXIT_TTL);
        }
        if inner.early.len() < MAX_EARLY_EXITS {
            inner.early.insert(pid, (code, Instant::now()));
        }
    }

    /// Reaps on every SIGCHLD, forever.
    pub async fn run(self: std::sync::Arc<Self>) -> std::io::Result<()> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        // Children may have exited before the handler was installed.
        self.reap_all();
        while sigchld.recv().await.is_some() {
            self.reap_all();
        }
        Ok(())
    }
}
