//! The UVM a shim owns, on either backend, and how the shim is told which one to start.

use crate::snapshot::QemuState;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;
use uvm::{Accel, LocalUvm, QemuConfig, QemuUvm, UtilityVm, UvmProperties};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The guest agent in its own namespaces on this host (no hypervisor).
    Local,
    /// A real VM under QEMU (KVM where it works, TCG otherwise); movable with `ferry migrate`.
    Qemu,
}

/// How to start a QEMU UVM (ignored by the local backend).
#[derive(Args, Debug, Clone)]
pub struct QemuArgs {
    /// Guest memory in MiB (qemu backend).
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(64..=1 << 20))]
    pub memory: u32,
    /// Virtual CPUs (qemu backend).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,
    /// Accelerator (qemu backend): auto picks KVM only where it can boot a stock kernel.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub accel: String,
    /// Boot kernel (qemu backend; default: the image `ferry image build` makes).
    #[arg(long, requires = "initrd", value_name = "VMLINUX")]
    pub kernel: Option<PathBuf>,
    /// Its initramfs (qemu backend; default: the image `ferry image build` makes).
    #[arg(long, requires = "kernel", value_name = "CPIO")]
    pub initrd: Option<PathBuf>,
}

impl QemuArgs {
    /// The same options, for the shim's command line.
    pub fn shim_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--memory={}", self.memory),
            format!("--cpus={}", self.cpus),
            format!("--accel={}", self.accel),
        ];
        if let (Some(k), Some(i)) = (&self.kernel, &self.initrd) {
            args.push(format!("--kernel={}", k.display()));
            args.push(format!("--initrd={}", i.display()));
        }
        args
    }

    /// The QEMU configuration for a UVM whose directory is `dir`, with a built image.
    pub fn config(&self, name: &str, dir: PathBuf, kernel: PathBuf, initrd: PathBuf) -> QemuConfig {
        let mut c = QemuConfig::new(name, dir, kernel, initrd);
        c.memory_mib = self.memory;
        c.cpus = self.cpus;
        c.accel = self.accel.parse().unwrap_or(Accel::Auto);
        if let Ok(level) = std::env::var("FERRY_GCS_LOG") {
            c.gcs_log_level = level;
        }
        c
    }
}

/// What a snapshot records of a QEMU UVM, made back into a configuration.
pub fn qemu_config(name: &str, dir: PathBuf, q: &QemuState) -> QemuConfig {
    let mut c = QemuConfig::new(name, dir, q.kernel.clone(), q.initrd.clone());
    c.memory_mib = q.memory_mib;
    c.cpus = q.cpus;
    c.accel = q.accel.parse().unwrap_or(Accel::Auto);
    c.port_name = q.port_name.clone();
    c.qemu = q.qemu.clone();
    c
}

/// Boxed: the two differ much in size, and one lives per shim.
/// What a snapshot records of a QEMU UVM.
pub fn qemu_state(u: &QemuUvm) -> QemuState {
    let c = u.config();
    QemuState {
        kernel: c.kernel.clone(),
        initrd: c.initrd.clone(),
        memory_mib: c.memory_mib,
        cpus: c.cpus,
        accel: u.accel().name().to_owned(),
        port_name: c.port_name.clone(),
        qemu: c.qemu.clone(),
        session_hello: u.session_hello(),
    }
}

pub enum Backend {
    Local(Box<LocalUvm>),
    Qemu(Box<QemuUvm>),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Local(u) => u.backend_name(),
            Backend::Qemu(u) => u.backend_name(),
        }
    }

    pub async fn stop(&mut self, grace: Duration) -> uvm::Result<()> {
        match self {
            Backend::Local(u) => u.stop(grace).await,
            Backend::Qemu(u) => u.stop(grace).await,
        }
    }

    pub fn properties(&self) -> UvmProperties {
        match self {
            Backend::Local(u) => u.properties(),
            Backend::Qemu(u) => u.properties(),
        }
    }

    /// The process a new shim re-attaches to: the agent (local) or QEMU.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Backend::Local(u) => u.agent_pid(),
            Backend::Qemu(u) => u.properties().pid,
        }
    }

    /// What a snapshot must hold to find this UVM again (None for the local backend).
    pub fn qemu_state(&self) -> Option<QemuState> {
        match self {
            Backend::Local(_) => None,
            Backend::Qemu(u) => Some(qemu_state(u)),
        }
    }
}
