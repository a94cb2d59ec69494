//! Live migration of a QEMU UVM between two QEMU processes on this machine (TCG, 256 MiB,
//! memory over a Unix socket): a process in the guest keeps counting through the migration;
//! a cancelled migration and one whose destination dies leave the source running.
//!
//! The three tests take turns (each boots its own source VM under emulation; two at once
//! would starve each other on small machines). Slow transfers come from a bandwidth cap in
//! the options, and every wait is on an event, never a fixed sleep.

mod support;

use bridge::message::ProcessParameters;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{KillOnDrop, run_in_uvm, within};
use tokio::sync::{mpsc, watch};
use uvm::migration::{
    CompressionSettings, InitializeOptions, MemoryTransferThrottleParams, MemoryTransport,
};
use uvm::{
    MemoryAddress, MigrationEvent, Outcome, Phase, QemuConfig, QemuMigrationPlan, QemuUvm,
    UtilityVm, UvmError,
};

/// One test at a time (see the module comment).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where the guest's counter lives.
const COUNTER: &str = "/tmp/counter";

/// A scratch directory with short paths (Unix sockets are limited to 108 bytes).
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = PathBuf::from(format!("/tmp/fm-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vm(img: &image::Image, dir: &Path, name: &str) -> QemuUvm {
    let mut config = QemuConfig::new(
        name,
        dir.join(name),
        img.vmlinux.clone(),
        img.initramfs.clone(),
    );
    config.memory_mib = 256;
    QemuUvm::new(config)
}

/// Boots the source and starts the counter in its guest; returns the connection and the
/// counter's pid in the guest.
async fn boot_source(
    img: &image::Image,
    dir: &Path,
) -> (QemuUvm, KillOnDrop, host::GuestConnection, u32) {
    let mut src = vm(img, dir, "src");
    let t = Instant::now();
    let started = within("boot", src.start()).await;
    let guard = KillOnDrop(src.properties().pid);
    let conn = started.unwrap_or_else(|e| panic!("boot failed: {e}"));
    eprintln!("source booted in {:?}", t.elapsed());
    // Every 10 ms, through a rename so a reader never sees a half-written number.
    let script = format!(
        "i=0; while true; do i=$((i+1)); echo $i > {COUNTER}.new; mv {COUNTER}.new {COUNTER}; sleep 0.01; done"
    );
    let params = ProcessParameters {
        command_args: vec!["sh".into(), "-c".into(), script],
        ..Default::default()
    };
    let running = within(
        "the counter to start",
        host::Command::new(params).start(&host::Container::uvm(&conn)),
    )
    .await
    .expect("start the counter");
    let pid = running.process().pid();
    // Its first write (the rename makes the file appear whole).
    let first = counter_above(&conn, 0).await;
    eprintln!("counter started (pid {pid} in the guest), at {first}");
    (src, guard, conn, pid)
}

/// After a migration given up: the destination is gone, and the source runs with its
/// guest's process still counting; then the source is stopped.
async fn only_the_source_runs(
    src: &mut QemuUvm,
    dst: &QemuUvm,
    conn: &host::GuestConnection,
    pid: u32,
) {
    assert!(!dst.is_running());
    assert!(!src.properties().paused);
    let before = counter_above(conn, 0).await;
    counter_above(conn, before).await;
    let (_, code) = run_in_uvm(conn, &format!("kill -0 {pid}")).await;
    assert_eq!(code, 0);
    within("stop", src.stop(Duration::from_secs(10)))
        .await
        .unwrap();
}

/// Reads the counter until it is above `floor` (each read is an exec in the guest).
async fn counter_above(conn: &host::GuestConnection, floor: u64) -> u64 {
    within("the counter to advance", async {
        loop {
            let (out, code) = run_in_uvm(conn, &format!("cat {COUNTER} 2>/dev/null")).await;
            if code == 0
                && let Ok(n) = out.trim().parse::<u64>()
                && n > floor
            {
                return n;
            }
        }
    })
    .await
}

fn options(max_bandwidth: u64) -> InitializeOptions {
    InitializeOptions {
        memory_transport: MemoryTransport::Unix as i32,
        max_bandwidth_bytes_per_second: Some(max_bandwidth),
        ..Default::default()
    }
}

/// Starts a destination listening on a socket in `dir`.
async fn start_destination(
    img: &image::Image,
    dir: &Path,
    name: &str,
    plan: &QemuMigrationPlan,
) -> (QemuUvm, KillOnDrop, MemoryAddress) {
    let mut dst = vm(img, dir, name);
    let address = MemoryAddress::unix(dir.join(format!("{name}.mig"))).unwrap();
    let t = Instant::now();
    let r = within(
        "the destination to listen",
        dst.start_incoming(plan, &address),
    )
    .await;
    let guard = KillOnDrop(dst.properties().pid);
    r.unwrap_or_else(|e| panic!("start_incoming failed: {e}"));
    assert!(dst.properties().paused);
    eprintln!("destination {name} listening in {:?}", t.elapsed());
    (dst, guard, address)
}

/// Collects events until a terminal one; `on_progress` runs once, at the first transfer
/// event that has moved bytes.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<MigrationEvent>,
    on_progress: impl FnOnce(),
) -> Vec<MigrationEvent> {
    let mut seen = Vec::new();
    let mut on_progress = Some(on_progress);
    while let Some(e) = rx.recv().await {
        if e.phase == Phase::TransferInProgress
            && e.bytes > 0
            && let Some(f) = on_progress.take()
        {
            f();
        }
        let last = matches!(e.phase, Phase::Failed | Phase::OfflineDone);
        seen.push(e);
        if last {
            break;
        }
    }
    seen
}

/// One line per event, for the log.
fn show(events: &[MigrationEvent]) {
    for e in events {
        eprintln!(
            "  {:?} {:?} bytes={} remaining={} pass={} rate_bps={} blackout_ms={:?} {}",
            e.phase,
            e.outcome,
            e.bytes,
            e.remaining,
            e.pass,
            e.rate_bps,
            e.blackout_ms,
            e.message.as_deref().unwrap_or("")
        );
    }
}

fn phases(events: &[MigrationEvent]) -> Vec<Phase> {
    let mut p: Vec<Phase> = events.iter().map(|e| e.phase).collect();
    p.dedup();
    p
}

macro_rules! skip_unless_qemu {
    ($name:literal) => {
        if let Some(why) = support::skip_reason() {
            eprintln!(concat!("skipped: ", $name, " {}"), why);
            return;
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_a_running_guest_and_its_process_keeps_counting() {
    skip_unless_qemu!("migrates_a_running_guest_and_its_process_keeps_counting");
    // Fast, as a real host would be.
    migrate_and_check("ok", options(10 << 30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_with_compression_over_multifd() {
    skip_unless_qemu!("migrates_with_compression_over_multifd");
    let o = InitializeOptions {
        compression_settings: Some(CompressionSettings {
            throttle_worker_count: Some(2),
        }),
        ..options(10 << 30)
    };
    migrate_and_check("zstd", o).await;
}

/// Migrates a guest whose process counts, resumes it on the destination, and checks that
/// the count went on and only the destination runs.
async fn migrate_and_check(test: &str, options: InitializeOptions) {
    let _turn = TURN.lock().await;
    let img = support::image().await;
    let dir = Scratch::new(test);
    let (mut src, mut src_guard, conn, pid) = boot_source(img, &dir.0).await;
    let before = counter_above(&conn, 0).await;

    // Both sides apply the same plan.
    let plan = QemuMigrationPlan::from_options(&options).unwrap();
    let (mut dst, mut dst_guard, address) = start_destination(img, &dir.0, "dst", &plan).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let (dtx, drx) = mpsc::unbounded_channel();
    let (_cancel, cancel_rx) = watch::channel(false);
    let t = Instant::now();
    let (out, incoming, events) = within("the migration", async {
        tokio::join!(
            src.migrate_out(&plan, &address, &tx, cancel_rx),
            dst.wait_incoming(&dtx),
            collect(rx, || {}),
        )
    })
    .await;
    let transfer = t.elapsed();
    out.unwrap_or_else(|e| panic!("migrate_out failed: {e}"));
    incoming.unwrap_or_else(|e| panic!("wait_incoming failed: {e}"));
    within("resume", dst.resume_incoming()).await.unwrap();
    let total = t.elapsed();

    show(&events);
    let p = phases(&events);
    assert_eq!(p.first(), Some(&Phase::SetupDone), "{p:?}");
    assert_eq!(
        &p[p.len() - 2..],
        &[Phase::BlackoutStarted, Phase::OfflineDone],
        "{p:?}"
    );
    let done = events.last().unwrap();
    assert_eq!(done.outcome, Some(Outcome::Success));
    let downtime = done.blackout_ms.expect("QEMU reports the downtime");
    assert!(done.bytes > 0 && done.total >= 256 << 20, "{done:?}");
    eprintln!(
        "MIGRATION 256 MiB ({test}): transfer {transfer:?}, to resumed {total:?}, QEMU downtime {downtime} ms, {} MB sent, {} passes",
        done.bytes / 1_000_000,
        done.pass
    );

    // Exactly one side runs: the source is paused, then gone.
    assert!(src.properties().paused);
    assert!(
        src.resume().await.is_err(),
        "a migrated-out source must not resume by accident"
    );
    within("finalize the source", src.finalize_source(false))
        .await
        .unwrap();
    assert!(!src.is_running());
    assert!(conn.closed_reason().is_some());
    src_guard.0 = None;

    let t = Instant::now();
    let conn2 = within("connect to the destination's guest", dst.connect_guest())
        .await
        .unwrap_or_else(|e| panic!("connect_guest failed: {e}"));
    eprintln!("destination guest connected in {:?}", t.elapsed());
    let after = counter_above(&conn2, before).await;
    let later = counter_above(&conn2, after).await;
    eprintln!("counter: {before} before, {after} then {later} after the migration");
    let (_, code) = run_in_uvm(&conn2, &format!("kill -0 {pid}")).await;
    assert_eq!(code, 0, "the counting process is gone after the migration");

    let mut dst_events = Vec::new();
    let mut drx = drx;
    while let Ok(e) = drx.try_recv() {
        dst_events.push(e.phase);
    }
    assert_eq!(
        dst_events
            .iter()
            .filter(|p| **p != Phase::TransferInProgress)
            .collect::<Vec<_>>(),
        vec![&Phase::OfflineDone, &Phase::BlackoutExited, &Phase::Done],
        "{dst_events:?}"
    );

    within("stop", dst.stop(Duration::from_secs(10)))
        .await
        .unwrap();
    dst_guard.0 = None;
    assert!(!address.to_string().is_empty() && !dir.0.join("dst.mig").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_migration_leaves_the_source_running() {
    skip_unless_qemu!("a_cancelled_migration_leaves_the_source_running");
    let _turn = TURN.lock().await;
    let img = support::image().await;
    let dir = Scratch::new("cancel");
    let (mut src, _src_guard, conn, pid) = boot_source(img, &dir.0).await;

    // 1 MiB/s: the transfer would take over a minute; it is cancelled once bytes move.
    let plan = QemuMigrationPlan::from_options(&options(1 << 20)).unwrap();
    let (mut dst, _dst_guard, address) = start_destination(img, &dir.0, "dst", &plan).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let (dtx, _drx) = mpsc::unbounded_channel();
    let (cancel, cancel_rx) = watch::channel(false);
    let t = Instant::now();
    let (out, incoming, events) = within("the cancelled migration", async {
        tokio::join!(
            src.migrate_out(&plan, &address, &tx, cancel_rx),
            dst.wait_incoming(&dtx),
            collect(rx, || {
                cancel.send_replace(true);
            }),
        )
    })
    .await;
    eprintln!("cancelled migration returned in {:?}", t.elapsed());
    match out {
        Err(UvmError::Migration { outcome, .. }) => assert_eq!(outcome, Outcome::Cancelled),
        other => panic!("expected a cancelled migration, got {other:?}"),
    }
    show(&events);
    let p = phases(&events);
    assert_eq!(
        &p[p.len() - 2..],
        &[Phase::RecoveryDone, Phase::Failed],
        "{p:?}"
    );
    assert!(!p.contains(&Phase::OfflineDone), "{p:?}");
    let n = events.len();
    assert_eq!(events[n - 2].outcome, Some(Outcome::Success));
    assert_eq!(events[n - 1].outcome, Some(Outcome::Cancelled));

    // The destination gave up and is gone; the source runs, and its guest still answers.
    assert!(incoming.is_err(), "{incoming:?}");
    only_the_source_runs(&mut src, &dst, &conn, pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_dies_mid_transfer_leaves_the_source_running() {
    skip_unless_qemu!("a_destination_that_dies_mid_transfer_leaves_the_source_running");
    let _turn = TURN.lock().await;
    let img = support::image().await;
    let dir = Scratch::new("kill");
    let (mut src, _src_guard, conn, pid) = boot_source(img, &dir.0).await;

    let plan = QemuMigrationPlan::from_options(&options(1 << 20)).unwrap();
    let (mut dst, _dst_guard, address) = start_destination(img, &dir.0, "dst", &plan).await;
    let dst_pid = dst.properties().pid.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (dtx, _drx) = mpsc::unbounded_channel();
    let (_cancel, cancel_rx) = watch::channel(false);
    let t = Instant::now();
    let (out, incoming, events) = within("the failing migration", async {
        tokio::join!(
            src.migrate_out(&plan, &address, &tx, cancel_rx),
            dst.wait_incoming(&dtx),
            collect(rx, || {
                // SAFETY: kill with the pid of the destination QEMU this test started.
                unsafe { libc::kill(dst_pid as i32, libc::SIGKILL) };
            }),
        )
    })
    .await;
    eprintln!("failed migration returned in {:?}", t.elapsed());
    match out {
        Err(UvmError::Migration { outcome, message }) => {
            assert_eq!(outcome, Outcome::DestinationFailed, "{message}")
        }
        other => panic!("expected a failed migration, got {other:?}"),
    }
    match incoming {
        Err(UvmError::Migration { outcome, .. }) => {
            assert_eq!(outcome, Outcome::DestinationFailed)
        }
        other => panic!("expected the destination to fail, got {other:?}"),
    }
    show(&events);
    let p = phases(&events);
    assert_eq!(
        &p[p.len() - 2..],
        &[Phase::RecoveryDone, Phase::Failed],
        "{p:?}"
    );
    assert_eq!(events[events.len() - 2].outcome, Some(Outcome::Success));

    only_the_source_runs(&mut src, &dst, &conn, pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackout_over_the_threshold_is_cancelled_and_the_source_resumes() {
    skip_unless_qemu!("a_blackout_over_the_threshold_is_cancelled_and_the_source_resumes");
    let _turn = TURN.lock().await;
    let img = support::image().await;
    let dir = Scratch::new("blackout");
    let (mut src, _src_guard, conn, pid) = boot_source(img, &dir.0).await;
    // A guest rewriting 16 MiB in a loop: the pages it dirties during the last pass take
    // milliseconds to copy while it is stopped (an idle guest's blackout can round to 0 ms).
    let dirtier = ProcessParameters {
        command_args: vec![
            "sh".into(),
            "-c".into(),
            "dd if=/dev/urandom of=/tmp/a bs=1M count=16 2>/dev/null; touch /tmp/ready; \
             while true; do cp /tmp/a /tmp/b; done"
                .into(),
        ],
        ..Default::default()
    };
    let _dirtier = within(
        "the dirtier to start",
        host::Command::new(dirtier).start(&host::Container::uvm(&conn)),
    )
    .await
    .expect("start the dirtier");
    within("the dirtier's data", async {
        while run_in_uvm(&conn, "test -e /tmp/ready").await.1 != 0 {}
    })
    .await;

    // At 32 MiB/s those pages take milliseconds to copy while the guest is stopped (at
    // 10 GiB/s the fresh-clone CI saw QEMU report 0 ms, dirtier and all): over 1 ms, then.
    // Whether ferry catches it while the VM is stopped or from QEMU's reported downtime, the
    // migration is cancelled and the source runs again.
    let o = InitializeOptions {
        memory_transfer_throttle_params: Some(MemoryTransferThrottleParams {
            blackout_time_threshold_for_cancelling_migration: Some(1),
            ..Default::default()
        }),
        cancel_if_blackout_threshold_exceeds: true,
        ..options(32 << 20)
    };
    let plan = QemuMigrationPlan::from_options(&o).unwrap();
    let (mut dst, _dst_guard, address) = start_destination(img, &dir.0, "dst", &plan).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (dtx, _drx) = mpsc::unbounded_channel();
    let (_cancel, cancel_rx) = watch::channel(false);
    let (out, incoming) = within("the over-long migration", async {
        tokio::join!(
            src.migrate_out(&plan, &address, &tx, cancel_rx),
            dst.wait_incoming(&dtx),
        )
    })
    .await;
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    show(&events);
    match out {
        Err(UvmError::Migration { outcome, message }) => {
            assert_eq!(outcome, Outcome::Cancelled);
            assert!(message.contains("threshold of 1 ms"), "{message}");
        }
        other => panic!("expected a cancelled migration, got {other:?}"),
    }
    let p = phases(&events);
    assert!(p.contains(&Phase::BlackoutStarted), "{p:?}");
    assert!(!p.contains(&Phase::OfflineDone), "{p:?}");
    assert_eq!(
        &p[p.len() - 2..],
        &[Phase::RecoveryDone, Phase::Failed],
        "{p:?}"
    );

    // The destination may hold the whole state by now; it is discarded without running.
    eprintln!("destination: {incoming:?}");
    if incoming.is_ok() {
        within(
            "discard the destination",
            dst.finalize_live_migration(false),
        )
        .await
        .unwrap();
    }
    only_the_source_runs(&mut src, &dst, &conn, pid).await;
}
