//! Utility VM backends: local namespaces, and QEMU.
//!
//! A backend boots a UVM whose guest agent dials back to the host, and hands over the
//! negotiated [`host::GuestConnection`]. The lifecycle is a small vocabulary ([`UtilityVm`]);
//! the live-migration calls mirror the wrappers hcsshim's UtilityVM gained for save/restore and
//! are refused by backends that cannot migrate.

pub mod local;
pub mod migration;
pub mod qemu;
pub mod qmp;

pub use local::{LocalConfig, LocalUvm};
pub use migration::{
    InitializeOptions, MemoryAddress, MigrationEvent, Origin, Outcome, Phase, QemuMigrationPlan,
};
pub use qemu::{Accel, QemuConfig, QemuUvm};

use host::GuestConnection;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc::UnboundedSender, watch};

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
    /// Migration options or an address that cannot be used (the message names the field).
    #[error("{0}")]
    Options(String),
    /// A live migration that did not complete; `outcome` says why (the events said more).
    #[error("live migration failed ({outcome}): {message}")]
    Migration {
        outcome: migration::Outcome,
        message: String,
    },
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

    /// Destination: boots in "incoming" mode with the options (decode protobuf bytes with
    /// [`migration::decode`]) and listens on `address`; the guest does not run yet.
    async fn start_with_migration_options(
        &mut self,
        _options: &InitializeOptions,
        _address: &MemoryAddress,
    ) -> Result<()> {
        Err(self.migration_unsupported())
    }
    /// Destination: waits until the source's state has arrived (the VM stays paused).
    async fn wait_live_migration_incoming(
        &mut self,
        _events: &UnboundedSender<MigrationEvent>,
    ) -> Result<()> {
        Err(self.migration_unsupported())
    }
    /// Source: checks the options and keeps them for the transfer.
    async fn initialize_live_migration_on_source(
        &mut self,
        _options: &InitializeOptions,
    ) -> Result<()> {
        Err(self.migration_unsupported())
    }
    /// Source: transfers the UVM to the destination listening on `address`. Ok: the VM is
    /// paused here and complete there; Err: the migration was abandoned and the source runs.
    async fn start_live_migration_transfer(
        &mut self,
        _address: &MemoryAddress,
        _events: &UnboundedSender<MigrationEvent>,
        _cancel: watch::Receiver<bool>,
    ) -> Result<()> {
        Err(self.migration_unsupported())
    }
    /// After a completed transfer: resume the UVM on this side (`resume`) or stop it. Exactly
    /// one side may resume: the destination normally, the source only if the destination
    /// never ran.
    async fn finalize_live_migration(&mut self, _resume: bool) -> Result<()> {
        Err(self.migration_unsupported())
    }
}
