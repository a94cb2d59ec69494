//! Live migration on the QEMU backend, each beside raw QEMU migration of the same kind of VM
//! with the same parameters in the same run:
//!
//! * raw: QEMU's own migration driven over QMP (`migrate-incoming`, `migrate`,
//!   `query-migrate`, `cont`) by the `uvm` crate alone: no host state, no reconnect;
//! * ferry: `ferry migrate` between two ferry hosts (state directories), host state included.
//!
//! Per configuration (guest memory 256 MiB and 1 GiB; idle, or with a process rewriting
//! 32 MiB of random data in a loop) it reports total time (from asking the destination to
//! listen to the guest running there), the transfer part of it (from the source starting to
//! send memory to the guest running there: the destination's QEMU start excluded), QEMU's
//! downtime, and ferry's added blackout: from the
//! guest resuming on the destination to the first byte of a container's output reaching the
//! destination host (a counter printing every 10 ms). Medians of `FERRY_BENCH_RUNS` (3).
//!
//! Run: `cargo bench -p ferry --bench migrate` (needs qemu-system-x86_64 and apt for the
//! image). Prints one JSON object on stdout.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use uvm::migration::{InitializeOptions, MemoryTransport};
use uvm::{MemoryAddress, MigrationEvent, Phase, QemuConfig, QemuMigrationPlan, QemuUvm};

mod support;

use support::ferry;
/// Both sides: QEMU's bandwidth cap lifted (its default throttles a local socket).
const BANDWIDTH: u64 = 10 << 30;
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i; usleep 10000; done";
const DIRTIER: &str = "dd if=/dev/urandom of=/tmp/a bs=1M count=32 2>/dev/null; echo ready; \
     while true; do cp /tmp/a /tmp/b; done";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn image(cache: &Path) -> image::Image {
    let out = Command::new("bash")
        .arg(root().join("scripts/build-static-gcs.sh"))
        .output()
        .expect("build the static agent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gcs = String::from_utf8(out.stdout).unwrap();
    let gcs = PathBuf::from(gcs.lines().next().unwrap());
    image::build(&image::BuildOptions::new(cache.to_path_buf(), gcs)).expect("image build")
}

fn options() -> Vec<u8> {
    uvm::migration::encode(&InitializeOptions {
        memory_transport: MemoryTransport::Unix as i32,
        max_bandwidth_bytes_per_second: Some(BANDWIDTH),
        ..Default::default()
    })
}

/// Raw QEMU: boots a VM with the workload, then migrates it back and forth `runs` times.
async fn raw(img: &image::Image, work: &Path, mib: u32, dirty: bool, runs: usize) -> Value {
    let config = |n: usize| {
        let mut c = QemuConfig::new(
            "raw",
            work.join(format!("raw{n}")),
            img.vmlinux.clone(),
            img.initramfs.clone(),
        );
        c.memory_mib = mib;
        c
    };
    let mut src = QemuUvm::new(config(0));
    let conn = uvm::UtilityVm::start(&mut src).await.expect("boot");
    let uvm_c = host::Container::uvm(&conn);
    let quiet = |s: &str| bridge::message::ProcessParameters {
        command_args: vec!["sh".into(), "-c".into(), format!("({s}) >/dev/null")],
        ..Default::default()
    };
    let none = host::Pipes {
        stdin: false,
        stdout: false,
        stderr: false,
    };
    let _counter = uvm_c.create_process(quiet(COUNTER), none).await.unwrap();
    // Started, and past its setup, before the first migration; kept until the end.
    let _dirtier = if dirty {
        let (w, r) = tokio::io::duplex(1024);
        let params = bridge::message::ProcessParameters {
            command_args: vec!["sh".into(), "-c".into(), DIRTIER.into()],
            ..Default::default()
        };
        let running = host::Command::new(params)
            .stdout(w)
            .start(&uvm_c)
            .await
            .unwrap();
        let mut line = String::new();
        let mut r = tokio::io::BufReader::new(r);
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "ready\n");
        Some((running, r))
    } else {
        None
    };
    let plan = QemuMigrationPlan::from_bytes(&options()).unwrap();
    let (mut totals, mut transfers, mut downtimes) = (Vec::new(), Vec::new(), Vec::new());
    for n in 1..=runs {
        let mut dst = QemuUvm::new(config(n));
        let addr = MemoryAddress::unix(work.join(format!("raw{n}/mem.sock"))).unwrap();
        std::fs::create_dir_all(work.join(format!("raw{n}"))).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<MigrationEvent>();
        let (_cancel_tx, cancel) = tokio::sync::watch::channel(false);
        let t = Instant::now();
        dst.start_incoming(&plan, &addr).await.expect("incoming");
        let transfer = Instant::now();
        // Either side failing ends both (a guest that died leaves the other side waiting).
        tokio::try_join!(
            src.migrate_out(&plan, &addr, &tx, cancel),
            dst.wait_incoming(&tx)
        )
        .expect("raw migration");
        dst.resume_incoming().await.expect("resume");
        totals.push(t.elapsed().as_secs_f64() * 1e3);
        transfers.push(transfer.elapsed().as_secs_f64() * 1e3);
        src.finalize_source(false).await.expect("quit the source");
        while let Ok(ev) = rx.try_recv() {
            if ev.phase == Phase::OfflineDone
                && let Some(ms) = ev.blackout_ms
            {
                downtimes.push(ms as f64);
            }
        }
        src = dst;
    }
    let _ = uvm::UtilityVm::stop(&mut src, Duration::from_secs(2)).await;
    json!({
        "total_ms": median(totals),
        "transfer_ms": median(transfers),
        "downtime_ms": median(downtimes),
    })
}

/// ferry: a UVM with a printing counter (and the dirtier) in containers, moved back and
/// forth between two ferry hosts `runs` times.
fn ferry_runs(cache: &Path, work: &Path, mib: u32, dirty: bool, runs: usize) -> Value {
    let states: Vec<PathBuf> = (0..2).map(|i| work.join(format!("host{i}"))).collect();
    for s in &states {
        std::fs::create_dir_all(s.join("images")).unwrap();
        let _ = std::os::unix::fs::symlink(cache, s.join("images/uvm"));
    }
    let mem = mib.to_string();
    ferry(
        &states[0],
        &["uvm", "start", "b", "--backend", "qemu", "--memory", &mem],
    );
    ferry(
        &states[0],
        &["run", "b", "-d", "--id", "count", "--", "sh", "-c", COUNTER],
    );
    if dirty {
        ferry(
            &states[0],
            &["run", "b", "-d", "--id", "dirty", "--", "sh", "-c", DIRTIER],
        );
        // Bounded wait for the dirtier's setup (it prints once).
        let t = Instant::now();
        while !ferry(&states[0], &["logs", "b", "dirty"]).contains("ready") {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the dirtier never got ready"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let bw = BANDWIDTH.to_string();
    let (mut totals, mut transfers, mut downtimes, mut blackouts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for n in 0..runs {
        let (from, to) = (&states[n % 2], &states[(n + 1) % 2]);
        let to_s = to.to_str().unwrap();
        let out = ferry(
            from,
            &[
                "migrate",
                "b",
                "--to",
                to_s,
                "--max-bandwidth",
                &bw,
                "--json",
            ],
        );
        for line in out.lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_default();
            if v["phase"] == "offline_done"
                && let Some(ms) = v["blackout_ms"].as_f64()
            {
                downtimes.push(ms);
            }
            if let Some(ms) = v["total_ms"].as_f64() {
                totals.push(ms);
                transfers.push(v["transfer_ms"].as_f64().unwrap_or(f64::NAN));
            }
        }
        // The destination times the first output after the resume; bounded wait for it.
        let t = Instant::now();
        loop {
            let info: Value = serde_json::from_str(&ferry(to, &["uvm", "inspect", "b"])).unwrap();
            if let Some(ms) = info["last_migration"]["added_blackout_ms"].as_f64() {
                blackouts.push(ms);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no first output: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    ferry(&states[runs % 2], &["uvm", "stop", "b"]);
    json!({
        "total_ms": median(totals),
        "transfer_ms": median(transfers),
        "downtime_ms": median(downtimes),
        "added_blackout_ms": median(blackouts),
    })
}

fn main() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: the migration benchmark needs qemu-system-x86_64");
        return;
    }
    let runs: usize = std::env::var("FERRY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let base = std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
    let work = PathBuf::from(base).join(format!("ferry-migrate-bench-{}", std::process::id()));
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ferry-bench-images");
    let img = image(&cache);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut results = Vec::new();
    for mib in [256u32, 1024] {
        for dirty in [false, true] {
            let dir = work.join(format!("{mib}-{dirty}"));
            let raw = rt.block_on(raw(&img, &dir, mib, dirty, runs));
            let f = ferry_runs(&cache, &dir, mib, dirty, runs);
            let ratio = |k: &str| {
                let r = f[k].as_f64().unwrap_or(f64::NAN) / raw[k].as_f64().unwrap_or(f64::NAN);
                (r * 100.0).round() / 100.0
            };
            let (total, transfer) = (ratio("total_ms"), ratio("transfer_ms"));
            eprintln!(
                "{mib} MiB dirty={dirty}: raw {raw} ferry {f} total {total} transfer {transfer}"
            );
            results.push(json!({
                "memory_mib": mib,
                "load": if dirty { "dirtying 32 MiB in a loop" } else { "idle" },
                "raw_qemu": raw,
                "ferry": f,
                "total_ratio": total,
                "transfer_ratio": transfer,
            }));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"runs": runs, "results": results})).unwrap()
    );
}
