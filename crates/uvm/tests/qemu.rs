//! The QEMU backend end to end: build the image (Debian kernel + busybox + static ferry-gcs),
//! boot it under QEMU (TCG here), negotiate the bridge over virtio-serial, run a process in the
//! UVM, pause/resume over QMP, stop.
//!
//! Needs qemu-system-x86_64 and apt (apt-get download); says "skipped" loudly without them.
//! The image cache lives in cargo's target tmp dir, so only the first run downloads.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::{KillOnDrop, run_in_uvm, within};
use uvm::{QemuConfig, QemuUvm, UtilityVm};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_the_image_and_runs_a_process() {
    let test_start = Instant::now();
    if let Some(why) = support::skip_reason() {
        eprintln!("skipped: boots_the_image_and_runs_a_process {why}");
        return;
    }
    let img = support::image().await;

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
