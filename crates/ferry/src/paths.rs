//! Where ferry keeps its state. Everything lives under one directory, `$FERRY_STATE_DIR` when
//! set (so several independent installations can run side by side), else `/run/ferry` for root
//! and `$XDG_RUNTIME_DIR/ferry` (or `/tmp/ferry-<uid>`) for others.
//!
//! ```text
//! <state>/uvms/<name>/control.sock   the shim's control socket (0600)
//!                     shim.log       the shim's log
//!                     gcs.log        the guest agent's log
//!                     vm.sock*       hybrid-vsock sockets between shim and agent
//!                     logs/<container>/<pid>.{stdout,stderr}   captured output
//! <state>/images/busybox/rootfs      the built-in image
//! ```

use std::path::{Path, PathBuf};

pub fn state_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_STATE_DIR") {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/ferry");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("ferry"),
        None => PathBuf::from(format!("/tmp/ferry-{}", nix::unistd::geteuid())),
    }
}

#[derive(Debug, Clone)]
pub struct UvmPaths {
    pub dir: PathBuf,
}

impl UvmPaths {
    pub fn new(root: &Path, name: &str) -> UvmPaths {
        UvmPaths {
            dir: root.join("uvms").join(name),
        }
    }

    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }

    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Written when the UVM migrated away from this host: where it went.
    pub fn migrated(&self) -> PathBuf {
        self.dir.join("migrated")
    }
}

pub fn uvms_dir(root: &Path) -> PathBuf {
    root.join("uvms")
}

pub fn image_dir(root: &Path, image: &str) -> PathBuf {
    root.join("images").join(image)
}

/// UVM names become directory and socket path components: same rules as container ids, and
/// short enough to keep socket paths under the Unix limit.
pub fn validate_uvm_name(name: &str) -> Result<(), String> {
    const MAX: usize = 32;
    if name.len() > MAX {
        return Err(format!("UVM name {name:?} is longer than {MAX} characters"));
    }
    bridge::validate_container_id(name)
        .map_err(|e| e.to_string().replace("container id", "UVM name"))
}
