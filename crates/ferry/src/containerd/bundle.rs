//! The OCI bundle containerd hands over: its `config.json` becomes the process ferry runs, its
//! root filesystem is mounted where the bundle says.
//!
//! What ferry takes from the spec today: the process (args, env, cwd, terminal) and the root.
//! The guest builds the rest of the container's spec itself (namespaces, the usual
//! pseudo-filesystems), as for `ferry run`; mounts, users other than root and resource limits
//! in the bundle are not applied yet, and a spec asking for them is logged, not refused.

use crate::control::ProcessSpec;
use oci_spec::runtime::{Process, Spec};
use std::path::{Path, PathBuf};

/// Largest `config.json` read.
const MAX_SPEC: u64 = 4 << 20;

/// Reads and checks `<bundle>/config.json`; returns the process to run and the root directory.
pub fn load(bundle: &Path) -> Result<(ProcessSpec, PathBuf), String> {
    let path = bundle.join("config.json");
    let meta = std::fs::metadata(&path).map_err(|e| format!("bundle {}: {e}", path.display()))?;
    if meta.len() > MAX_SPEC {
        return Err(format!(
            "bundle {}: {} bytes, more than {MAX_SPEC}",
            path.display(),
            meta.len()
        ));
    }
    let text = std::fs::read(&path).map_err(|e| format!("bundle {}: {e}", path.display()))?;
    let spec: Spec = serde_json::from_slice(&text)
        .map_err(|e| format!("bundle {}: invalid OCI runtime spec: {e}", path.display()))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| format!("bundle {}: the spec has no process", path.display()))?;
    let p = process_spec(process).map_err(|e| format!("bundle {}: {e}", path.display()))?;
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    let root = if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    };
    Ok((p, root))
}

/// The process of an exec: the JSON of an OCI `Process`, as containerd sends it.
pub fn exec_process(json: &[u8]) -> Result<ProcessSpec, String> {
    if json.len() as u64 > MAX_SPEC {
        return Err(format!(
            "exec process spec of {} bytes, more than {MAX_SPEC}",
            json.len()
        ));
    }
    let process: Process =
        serde_json::from_slice(json).map_err(|e| format!("invalid OCI process spec: {e}"))?;
    process_spec(&process)
}

fn process_spec(process: &Process) -> Result<ProcessSpec, String> {
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err("the process has no args (nothing to run)".into());
    }
    let user = process.user();
    if user.uid() != 0 || user.gid() != 0 {
        tracing::warn!(
            uid = user.uid(),
            gid = user.gid(),
            "ferry runs container processes as root today; the spec's user is not applied"
        );
    }
    Ok(ProcessSpec {
        args,
        env: process.env().clone().unwrap_or_default(),
        cwd: Some(process.cwd().display().to_string()),
        tty: process.terminal().unwrap_or(false),
        stdin: false,
        console: process
            .console_size()
            .as_ref()
            .map(|b| (b.height() as u16, b.width() as u16)),
        detach: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(config: &str) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        std::fs::write(d.path().join("config.json"), config).unwrap();
        d
    }

    /// A directory removed on drop (no tempfile dependency for two tests).
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("ferry-bundle-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_bundle_gives_its_process_and_root() {
        let d = bundle_with(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "process":{"args":["sh","-c","echo hi"],"env":["A=1"],"cwd":"/tmp","terminal":true,
                           "user":{"uid":0,"gid":0}}}"#,
        );
        let (p, root) = load(d.path()).unwrap();
        assert_eq!(p.args, ["sh", "-c", "echo hi"]);
        assert_eq!(p.env, ["A=1"]);
        assert_eq!(p.cwd.as_deref(), Some("/tmp"));
        assert!(p.tty);
        assert_eq!(root, d.path().join("rootfs"));
    }

    #[test]
    fn broken_bundles_are_named_errors() {
        let d = bundle_with("{not json");
        let e = load(d.path()).unwrap_err();
        assert!(e.contains("invalid OCI runtime spec"), "{e}");
        let d = bundle_with(
            r#"{"ociVersion":"1.0.2","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
        );
        let e = load(d.path()).unwrap_err();
        assert!(e.contains("no args"), "{e}");
        let d = bundle_with(r#"{"ociVersion":"1.0.2"}"#);
        let e = load(d.path()).unwrap_err();
        assert!(e.contains("no process"), "{e}");
        let e = load(Path::new("/nonexistent-bundle")).unwrap_err();
        assert!(e.contains("/nonexistent-bundle/config.json"), "{e}");
    }

    #[test]
    fn exec_specs_are_checked() {
        let p = exec_process(br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0}}"#).unwrap();
        assert_eq!(p.args, ["ls"]);
        assert!(exec_process(b"[]").is_err());
    }
}
