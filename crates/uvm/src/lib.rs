//! Utility VM backends: local namespaces, and QEMU.
//!
//! A backend boots a UVM whose guest agent dials back to the host, and hands over the
//! negotiated [`host::GuestConnection`]. The lifecycle is a small vocabulary ([`UtilityVm`]);
//! the live-migration calls mirror the wrappers hcsshim's UtilityVM gained for save/restore and
//! are refused by backends that cannot migrate.

pub mod local;
pub mod qemu;
pub mod qmp;

pub use local::{LocalConfig, LocalUvm};
pub use qemu::{Accel, QemuConfig, QemuUvm};

use host::GuestConnection;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum UvmError {
    #[error("{0}")]
    NotSupported(String),
    #[error("cannot start the utility VM: {0}")]
    Start(String),
    #[error("the utility VM is not running")]
    NotRunning,
    #[error("the utility VM is already running")]
    AlreadyRunning,
    #[error(transparent)]
    Guest(#[from] host::HostError),
    #[error("QEMU (QMP): {0}")]
    Qmp(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl UvmError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> UvmError {
        UvmError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = UvmError> = std::result::Result<T, E>;

/// What a UVM reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct UvmProperties {
    pub name: String,
    pub backend: &'static str,
    pub running: bool,
    pub paused: bool,
    /// The agent's process id on the host (the local backend) or the VMM's.
    pub pid: Option<u32>,
    pub state_dir: PathBuf,
    pub transport: String,
    /// Seconds since the epoch.
    pub started_at: Option<u64>,
}

/// The lifecycle every backend implements.
#[allow(async_fn_in_trait)]
pub trait UtilityVm {
    /// Boots the UVM and returns the negotiated connection to its agent.
    async fn start(&mut self) -> Result<GuestConnection>;
    /// Stops it: the agent is asked to shut down, and killed after `grace`.
    async fn stop(&mut self, grace: Duration) -> Result<()>;
    async fn pause(&mut self) -> Result<()>;
    async fn resume(&mut self) -> Result<()>;
    fn properties(&self) -> UvmProperties;

    fn backend_name(&self) -> &'static str;

    fn migration_unsupported(&self) -> UvmError {
        UvmError::NotSupported(format!(
            "live migration is not supported by the {} backend (use the qemu backend)",
            self.backend_name()
        ))
    }

    /// Destination: start in "incoming" mode with the (protobuf-encoded) InitializeOptions.
    async fn start_with_migration_options(&mut self, _options: &[u8]) -> Result<()> {
        Err(self.migration_unsupported())
    }
    /// Source: set up a migration with the (protobuf-encoded) InitializeOptions.
    async fn initialize_live_migration_on_source(&mut self, _options: &[u8]) -> Result<()> {
        Err(self.migration_unsupported())
    }
    async fn start_live_migration_on_source(&mut self) -> Result<()> {
        Err(self.migration_unsupported())
    }
    async fn start_live_migration_transfer(&mut self, _timeout: Duration) -> Result<()> {
        Err(self.migration_unsupported())
    }
    /// Resume the UVM on this side (`resume`) or stop it.
    async fn finalize_live_migration(&mut self, _resume: bool) -> Result<()> {
        Err(self.migration_unsupported())
    }
}
