//! Processes the agent started: how they are spawned, reaped, and wired to the host.

pub mod reaper;
pub mod spawn;
pub mod stdio;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::sync::watch;

/// The exit code the host sees: the status for a normal exit, 128+N for death by signal N (as
/// hcsshim's GCS and runc report it).
pub fn exit_code(status: nix::sys::wait::WaitStatus) -> Option<i32> {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// One process the agent started, in the UVM or in a container.
pub struct ProcessEntry {
    pub pid: u32,
    pub container_id: String,
    /// argv[0], for process listings.
    pub image_name: String,
    /// The command line and terminal flag, for process listings.
    pub args: Vec<String>,
    pub terminal: bool,
    /// The ports its resumable stdio streams re-dial (None for raw streams).
    pub resumable_ports: Option<bridge::message::StdioPorts>,
    /// The container's init process (its exit ends the container).
    pub is_init: bool,
    /// The exit code, published once the process has exited *and* its output has been
    /// relayed, so that a host never sees an exit before the output that preceded it.
    pub exit: watch::Sender<Option<i32>>,
    /// The pseudo-terminal master, for resizing.
    pub pty: Option<Arc<OwnedFd>>,
    /// Set to give up on delivering this process's resumable stdio (its container is deleted,
    /// the UVM shuts down).
    pub abandon: watch::Sender<bool>,
}

impl ProcessEntry {
    pub fn exit_code(&self) -> Option<i32> {
        *self.exit.borrow()
    }
}
