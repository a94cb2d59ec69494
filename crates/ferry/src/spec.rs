//! OCI runtime specs for the containers `ferry run` creates, and the built-in busybox image.

use crate::control::ProcessSpec;
use oci_spec::runtime::{Process, Spec};
use std::path::{Path, PathBuf};

const DEFAULT_ENV: [&str; 2] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "TERM=xterm",
];

fn env_for(p: &ProcessSpec) -> Vec<String> {
    let mut env: Vec<String> = DEFAULT_ENV
        .iter()
        .filter(|d| {
            let key = d.split('=').next().unwrap_or("");
            !p.env.iter().any(|e| e.split('=').next() == Some(key))
        })
        .map(|s| s.to_string())
        .collect();
    env.extend(p.env.iter().cloned());
    env
}

fn process_json(p: &ProcessSpec) -> serde_json::Value {
    serde_json::json!({
        "terminal": p.tty,
        "user": {"uid": 0, "gid": 0},
        "args": p.args,
        "env": env_for(p),
        "cwd": p.cwd.clone().unwrap_or_else(|| "/".into()),
        "noNewPrivileges": true
    })
}

/// The spec of a new container: its own pid, mount, uts and ipc namespaces, the usual
/// pseudo-filesystems, the given root.
pub fn container_spec(id: &str, rootfs: &Path, p: &ProcessSpec) -> Result<Spec, String> {
    let spec = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": process_json(p),
        "root": {"path": rootfs, "readonly": false},
        "hostname": id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]
        }
    });
    serde_json::from_value(spec).map_err(|e| format!("building the OCI spec: {e}"))
}

/// The OCI process of an exec into a running container.
pub fn exec_process(p: &ProcessSpec) -> Result<Process, String> {
    serde_json::from_value(process_json(p)).map_err(|e| format!("building the OCI process: {e}"))
}

/// Builds (once) the busybox image from the host's busybox-static, and returns its rootfs.
/// Blocking; concurrent callers wait for the one build.
pub fn busybox_image(state_root: &Path) -> Result<PathBuf, String> {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let dir = crate::paths::image_dir(state_root, "busybox");
    let rootfs = dir.join("rootfs");
    if rootfs.join("bin/busybox").exists() {
        return Ok(rootfs);
    }
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .ok_or("the busybox image needs the host's busybox (apt-get install busybox-static), or pass --rootfs DIR")?;
    // Build beside, then rename: a half-built image is never used.
    let tmp = dir.join(format!("rootfs.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let io = |what: &str, e: std::io::Error| format!("building the busybox image ({what}): {e}");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root", "var/tmp"] {
        std::fs::create_dir_all(tmp.join(d)).map_err(|e| io("mkdir", e))?;
    }
    std::fs::copy(busybox, tmp.join("bin/busybox")).map_err(|e| io("copy busybox", e))?;
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| io("busybox --list", e))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if !applet.is_empty() && !applet.contains('/') && applet != "busybox" {
            std::os::unix::fs::symlink("busybox", tmp.join("bin").join(applet))
                .map_err(|e| io("symlink", e))?;
        }
    }
    std::fs::write(tmp.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| io("passwd", e))?;
    std::fs::write(tmp.join("etc/group"), "root:x:0:\n").map_err(|e| io("group", e))?;
    match std::fs::rename(&tmp, &rootfs) {
        Ok(()) => Ok(rootfs),
        // Someone else built it at the same time.
        Err(_) if rootfs.join("bin/busybox").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(rootfs)
        }
        Err(e) => Err(io("rename", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_env_overrides_defaults() {
        let p = ProcessSpec {
            args: vec!["sh".into()],
            env: vec!["PATH=/bin".into(), "A=1".into()],
            ..Default::default()
        };
        assert_eq!(env_for(&p), ["TERM=xterm", "PATH=/bin", "A=1"]);
        let spec = container_spec("c1", Path::new("/r"), &p).unwrap();
        assert_eq!(spec.hostname().as_deref(), Some("c1"));
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &["sh"]
        );
    }
}
