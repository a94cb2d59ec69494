//! What the QEMU tests share: the image (Debian kernel + busybox + static ferry-gcs, cached in
//! cargo's target tmp dir so only the first run downloads), skipping loudly on hosts without
//! QEMU or apt, bounded waits, and running commands in the UVM.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use bridge::message::ProcessParameters;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Bound on everything a test waits for (boot included); a hang fails instead of blocking.
pub const PATIENCE: Duration = Duration::from_secs(90);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why the QEMU tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !have("qemu-system-x86_64", "--version") {
        return Some("needs qemu-system-x86_64 (apt-get install qemu-system-x86)".into());
    }
    if !have("apt-get", "--version") || !have("dpkg-deb", "--version") {
        return Some("needs apt-get download and dpkg-deb (a Debian host)".into());
    }
    let apt_knows_kernel = Command::new("apt-cache")
        .args(["show", "--no-all-versions", image::DEFAULT_KERNEL_PACKAGE])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !apt_knows_kernel {
        return Some(format!(
            "apt knows no {} (run apt-get update)",
            image::DEFAULT_KERNEL_PACKAGE
        ));
    }
    None
}

/// Builds (or finds up to date) the static agent with the project's script.
pub fn static_gcs() -> PathBuf {
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/build-static-gcs.sh"))
        .current_dir(workspace_root())
        .output()
        .expect("run scripts/build-static-gcs.sh");
    assert!(
        out.status.success(),
        "scripts/build-static-gcs.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(stdout.lines().next().expect("the script prints the path"))
}

/// The image, built or taken from the cache once per test binary (checking the cache hashes
/// the kernel package, seconds under load).
pub async fn image() -> &'static image::Image {
    static IMAGE: tokio::sync::OnceCell<image::Image> = tokio::sync::OnceCell::const_new();
    IMAGE.get_or_init(build_image).await
}

async fn build_image() -> image::Image {
    let t = Instant::now();
    let gcs = static_gcs();
    eprintln!("static ferry-gcs ready in {:?}", t.elapsed());
    let t = Instant::now();
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ferry-uvm-images");
    let opts = image::BuildOptions::new(cache.clone(), gcs);
    let img = tokio::task::spawn_blocking(move || image::build(&opts))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("image build failed: {e}"));
    eprintln!(
        "image {} ({}) in {:?}{}",
        img.key,
        img.kernel_release,
        t.elapsed(),
        if img.reused { " (cached)" } else { "" }
    );
    // Images of earlier agent builds would pile up in target/.
    image::prune(&cache, &img.key).unwrap();
    img
}

/// Kills QEMU if the test fails half-way (the VM is deliberately not tied to its starter).
pub struct KillOnDrop(pub Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill with a pid (QEMU, which this test started) and a signal number.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?} waiting for {what}"))
}

/// Runs `sh -c script` in the UVM itself; returns (stdout, exit code).
pub async fn run_in_uvm(conn: &host::GuestConnection, script: &str) -> (String, i32) {
    let (w, mut r) = tokio::io::duplex(64 * 1024);
    let params = ProcessParameters {
        command_args: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let running = host::Command::new(params)
        .stdout(w)
        .start(&host::Container::uvm(conn))
        .await
        .expect("start the process");
    let reader = tokio::spawn(async move {
        let mut s = String::new();
        r.read_to_string(&mut s).await.map(|_| s)
    });
    let code = running.wait().await.expect("wait for the process");
    (reader.await.unwrap().unwrap(), code)
}
