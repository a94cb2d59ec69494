//! What the containerd shim makes of its configuration: which backend runs a sandbox's UVM,
//! and where ferry keeps its state.
//!
//! Two sources, the second overriding the first as a whole:
//! * a JSON file, `$FERRY_CONTAINERD_CONFIG` or [`DEFAULT_CONFIG`] (absent: defaults);
//! * the task's runtime options, when containerd passes an `Any` of type [`OPTIONS_TYPE_URL`]
//!   whose value is the same JSON (for example from a CRI runtime handler's options).
//!
//! Unknown keys and values out of range are errors that name them: a typo must not silently
//! run a sandbox on another backend.

use crate::shim::backend::{BackendKind, QemuArgs};
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/ferry/containerd-shim.json";
pub const CONFIG_ENV: &str = "FERRY_CONTAINERD_CONFIG";
pub const OPTIONS_TYPE_URL: &str = "io.containerd.ferry.v1.Options";
/// containerd's generic runtime options (`ctr run --runtime-config-path`, a CRI runtime
/// handler's `ConfigPath`): they name a configuration file, or carry one.
pub const RUNTIME_OPTIONS_TYPE_URL: &str = "runtimeoptions.v1.Options";

/// `runtimeoptions.v1.Options` (containerd's `pkg/runtimeoptions/v1`).
#[derive(Clone, PartialEq, prost::Message)]
struct RuntimeOptions {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(string, tag = "2")]
    config_path: String,
    #[prost(string, tag = "3")]
    config_body: String,
}
/// Largest configuration accepted (file or options).
const MAX_CONFIG: u64 = 64 * 1024;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Local,
    Qemu,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    #[serde(default)]
    pub backend: Backend,
    /// ferry's state directory (default: `$FERRY_STATE_DIR`, else ferry's default).
    pub state_dir: Option<PathBuf>,
    /// Guest memory in MiB (qemu).
    pub memory_mib: Option<u32>,
    /// Virtual CPUs (qemu).
    pub cpus: Option<u32>,
    /// `auto`, `kvm` or `tcg` (qemu).
    pub accel: Option<String>,
    /// Kernel and initramfs (qemu; default: the image ferry builds).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Captured output kept per stream, MiB (default 64).
    pub log_limit_mib: Option<u64>,
    /// Create the task as the destination of migration session S: nothing starts here; the
    /// task arrives with its sandbox (Migration service) and its start attaches to it.
    pub incoming_session: Option<String>,
}

impl RuntimeConfig {
    /// The configuration file's contents, or defaults when there is none.
    pub fn load_file() -> Result<RuntimeConfig, String> {
        let (path, explicit) = match std::env::var_os(CONFIG_ENV) {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        if !explicit && !path.exists() {
            return Ok(RuntimeConfig::default());
        }
        RuntimeConfig::load_path(&path)
    }

    /// A configuration file's contents.
    pub fn load_path(path: &Path) -> Result<RuntimeConfig, String> {
        match std::fs::metadata(path) {
            Err(e) => return Err(format!("ferry runtime config {}: {e}", path.display())),
            Ok(m) if m.len() > MAX_CONFIG => {
                return Err(format!(
                    "ferry runtime config {}: {} bytes, more than {MAX_CONFIG}",
                    path.display(),
                    m.len()
                ));
            }
            Ok(_) => {}
        }
        let text = std::fs::read(path)
            .map_err(|e| format!("ferry runtime config {}: {e}", path.display()))?;
        RuntimeConfig::parse(&text, &path.display().to_string())
    }

    /// Applies the task's runtime options (`type_url`, `value`) over `self`.
    pub fn with_options(self, type_url: &str, value: &[u8]) -> Result<RuntimeConfig, String> {
        if type_url.is_empty() && value.is_empty() {
            return Ok(self);
        }
        if value.len() as u64 > MAX_CONFIG {
            return Err(format!(
                "runtime options of {} bytes, more than {MAX_CONFIG}",
                value.len()
            ));
        }
        match type_url {
            OPTIONS_TYPE_URL => RuntimeConfig::parse(value, "runtime options"),
            RUNTIME_OPTIONS_TYPE_URL => {
                let o = <RuntimeOptions as prost::Message>::decode(value)
                    .map_err(|e| format!("runtime options ({type_url}): {e}"))?;
                if !o.config_body.is_empty() {
                    RuntimeConfig::parse(o.config_body.as_bytes(), "runtime config body")
                } else if !o.config_path.is_empty() {
                    RuntimeConfig::load_path(Path::new(&o.config_path))
                } else {
                    Ok(self)
                }
            }
            _ => Err(format!(
                "unknown runtime options type {type_url:?}: the ferry runtime takes {RUNTIME_OPTIONS_TYPE_URL:?} (a config path) or {OPTIONS_TYPE_URL:?} (JSON, the keys of {DEFAULT_CONFIG})"
            )),
        }
    }

    fn parse(text: &[u8], what: &str) -> Result<RuntimeConfig, String> {
        let c: RuntimeConfig =
            serde_json::from_slice(text).map_err(|e| format!("ferry {what}: {e}"))?;
        c.check().map_err(|e| format!("ferry {what}: {e}"))?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        if let Some(m) = self.memory_mib
            && !(64..=1 << 20).contains(&m)
        {
            return Err(format!("memory_mib {m} is outside 64..=1048576"));
        }
        if let Some(c) = self.cpus
            && !(1..=64).contains(&c)
        {
            return Err(format!("cpus {c} is outside 1..=64"));
        }
        if let Some(a) = &self.accel
            && !["auto", "kvm", "tcg"].contains(&a.as_str())
        {
            return Err(format!("accel {a:?} is not one of auto, kvm, tcg"));
        }
        if let Some(l) = self.log_limit_mib
            && !(1..=1 << 20).contains(&l)
        {
            return Err(format!("log_limit_mib {l} is outside 1..=1048576"));
        }
        if let Some(s) = &self.incoming_session
            && !super::migration::valid_session_id(s)
        {
            return Err(format!(
                "incoming_session {s:?}: 1 to {} of [A-Za-z0-9._-]",
                super::migration::MAX_SESSION_ID
            ));
        }
        if self.incoming_session.is_some() && self.backend != Backend::Qemu {
            return Err("incoming_session needs backend \"qemu\" (only VMs move)".into());
        }
        if self.kernel.is_some() != self.initrd.is_some() {
            return Err("kernel and initrd go together".into());
        }
        for p in [&self.kernel, &self.initrd, &self.state_dir]
            .into_iter()
            .flatten()
        {
            if !p.is_absolute() {
                return Err(format!("{} is not an absolute path", p.display()));
            }
        }
        Ok(())
    }

    pub fn state_root(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(crate::paths::state_root)
    }

    pub fn backend_kind(&self) -> BackendKind {
        match self.backend {
            Backend::Local => BackendKind::Local,
            Backend::Qemu => BackendKind::Qemu,
        }
    }

    pub fn qemu_args(&self) -> QemuArgs {
        QemuArgs {
            memory: self.memory_mib.unwrap_or(256),
            cpus: self.cpus.unwrap_or(1),
            accel: self.accel.clone().unwrap_or_else(|| "auto".into()),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
        }
    }

    pub fn log_limit_mib(&self) -> u64 {
        self.log_limit_mib.unwrap_or(64)
    }
}

/// The UVM name of a sandbox: `<namespace>-<id>` when that is a valid ferry name, else a
/// stable digest of both (containerd ids may be longer than ferry's 32 characters).
pub fn uvm_name(namespace: &str, id: &str) -> String {
    let plain = format!("{namespace}-{id}");
    if crate::paths::validate_uvm_name(&plain).is_ok() {
        return plain;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{namespace}/{id}").as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("ctrd-{hex}")
}

/// Where a bundle's root filesystem is mounted.
pub fn bundle_rootfs(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = RuntimeConfig::parse(br#"{"backnd":"qemu"}"#, "x").unwrap_err();
        assert!(e.contains("backnd"), "{e}");
        let e = RuntimeConfig::parse(br#"{"backend":"firecracker"}"#, "x").unwrap_err();
        assert!(e.contains("firecracker"), "{e}");
        let e = RuntimeConfig::parse(br#"{"cpus":0}"#, "x").unwrap_err();
        assert!(e.contains("cpus 0"), "{e}");
        let e = RuntimeConfig::parse(br#"{"kernel":"/k"}"#, "x").unwrap_err();
        assert!(e.contains("together"), "{e}");
        let c = RuntimeConfig::parse(br#"{"backend":"qemu","memory_mib":512}"#, "x").unwrap();
        assert_eq!(c.backend, Backend::Qemu);
        assert_eq!(c.qemu_args().memory, 512);
    }

    #[test]
    fn options_of_another_runtime_are_refused() {
        let base = RuntimeConfig::default();
        assert_eq!(base.clone().with_options("", b"").unwrap(), base);
        let e = base
            .clone()
            .with_options("containerd.runc.v1.Options", b"\x08\x01")
            .unwrap_err();
        assert!(e.contains("containerd.runc.v1.Options"), "{e}");
        let c = base
            .clone()
            .with_options(OPTIONS_TYPE_URL, br#"{"backend":"qemu"}"#)
            .unwrap();
        assert_eq!(c.backend, Backend::Qemu);
        // ctr run --runtime-config-path: containerd's generic options carrying a body.
        let o = RuntimeOptions {
            type_url: String::new(),
            config_path: String::new(),
            config_body: r#"{"backend":"qemu","cpus":99}"#.into(),
        };
        let e = base
            .clone()
            .with_options(RUNTIME_OPTIONS_TYPE_URL, &prost::Message::encode_to_vec(&o))
            .unwrap_err();
        assert!(e.contains("cpus 99"), "{e}");
        let e = base
            .with_options(RUNTIME_OPTIONS_TYPE_URL, b"\xff\xff")
            .unwrap_err();
        assert!(e.contains("runtimeoptions.v1.Options"), "{e}");
    }

    #[test]
    fn uvm_names_are_valid_and_stable() {
        assert_eq!(uvm_name("default", "web"), "default-web");
        let long = "a".repeat(64);
        let n = uvm_name("k8s.io", &long);
        assert!(crate::paths::validate_uvm_name(&n).is_ok(), "{n}");
        assert_eq!(n, uvm_name("k8s.io", &long));
        assert_ne!(n, uvm_name("default", &long));
    }
}
