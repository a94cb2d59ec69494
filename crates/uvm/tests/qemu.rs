//! The QEMU backend end to end: build the image (Debian kernel + busybox + static ferry-gcs),
//! boot it under QEMU (TCG here), negotiate the bridge over virtio-serial, run a process in the
//! UVM, pause/resume over QMP, stop.
//!
//! Needs qemu-system-x86_64 and apt (apt-get download); says "skipped" loudly without them.
//! The image cache lives in cargo's target tmp dir, so only the first run downloads.

use bridge::message::ProcessParameters;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use uvm::{QemuConfig, QemuUvm, UtilityVm};

/// Bound on everything the test waits for (boot included); a hang fails instead of blocking.
const PATIENCE: Duration = Duration::from_secs(90);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds (or finds up to date) the static agent with the project's script.
fn static_gcs() -> PathBuf {
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

/// Kills QEMU if the test fails half-way (the VM is deliberately not tied to its starter).
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill with a pid (QEMU, which this test started) and a signal number.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?} waiting for {what}"))
}

/// Runs `sh -c script` in the UVM itself; returns (stdout, exit code).
async fn run_in_uvm(conn: &host::GuestConnection, script: &str) -> (String, i32) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_the_image_and_runs_a_process() {
    let test_start = Instant::now();
    if !have("qemu-system-x86_64", "--version") {
        eprintln!(
            "skipped: boots_the_image_and_runs_a_process needs qemu-system-x86_64 (apt-get install qemu-system-x86)"
        );
        return;
    }
    if !have("apt-get", "--version") || !have("dpkg-deb", "--version") {
        eprintln!(
            "skipped: boots_the_image_and_runs_a_process needs apt-get download and dpkg-deb (a Debian host)"
        );
        return;
    }
    let apt_knows_kernel = Command::new("apt-cache")
        .args(["show", "--no-all-versions", image::DEFAULT_KERNEL_PACKAGE])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !apt_knows_kernel {
        eprintln!(
            "skipped: boots_the_image_and_runs_a_process: apt knows no {} (run apt-get update)",
            image::DEFAULT_KERNEL_PACKAGE
        );
        return;
    }

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

    // Short: Unix socket paths are limited to 108 bytes.
    let state = PathBuf::from(format!("/tmp/fq-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut config = QemuConfig::new(
        "qt",
        state.clone(),
        img.vmlinux.clone(),
        img.initramfs.clone(),
    );
    config.connect_timeout = Duration::from_secs(60);
    let mut vm = QemuUvm::new(config);
    let t = Instant::now();
    let started = within("boot", vm.start()).await;
    let mut guard = KillOnDrop(vm.properties().pid);
    let conn = started.unwrap_or_else(|e| panic!("boot failed: {e}"));
    let boot = t.elapsed();
    eprintln!("boot to negotiated bridge: {boot:?}");

    let props = vm.properties();
    assert!(props.running && props.pid.is_some());
    assert_eq!(props.backend, "qemu");

    let t = Instant::now();
    let (out, code) = within(
        "a process in the UVM",
        run_in_uvm(&conn, "echo hello; uname -r; exit 3"),
    )
    .await;
    eprintln!("process round trip: {:?}", t.elapsed());
    assert_eq!(code, 3);
    assert_eq!(out, format!("hello\n{}\n", img.kernel_release), "{out:?}");

    // Paused and resumed over QMP, the guest still answers.
    within("pause", vm.pause()).await.unwrap();
    assert!(vm.properties().paused);
    within("resume", vm.resume()).await.unwrap();
    let (out, code) = within("a process after resume", run_in_uvm(&conn, "echo again")).await;
    assert_eq!((out.as_str(), code), ("again\n", 0));

    // A new host connection (what follows a migration): the guest sees its port end, starts
    // a new multiplexer session and dials the bridge again; the old connection is closed.
    let t = Instant::now();
    let conn2 = within("reconnect", vm.reconnect()).await.unwrap();
    eprintln!("host reconnect to negotiated bridge: {:?}", t.elapsed());
    assert!(conn.closed_reason().is_some());
    let (out, code) = within(
        "a process after reconnect",
        run_in_uvm(&conn2, "echo reconnected"),
    )
    .await;
    assert_eq!((out.as_str(), code), ("reconnected\n", 0));

    let t = Instant::now();
    within("stop", vm.stop(Duration::from_secs(10)))
        .await
        .unwrap();
    eprintln!("stop: {:?}", t.elapsed());
    assert!(!vm.is_running());
    guard.0 = None;
    let console = std::fs::read_to_string(state.join("console.log")).unwrap_or_default();
    assert!(
        console.contains("powering off"),
        "the agent did not power the VM off:\n{console}"
    );
    let _ = std::fs::remove_dir_all(&state);
    eprintln!("whole test: {:?}", test_start.elapsed());
}
