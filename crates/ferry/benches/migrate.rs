//! Live migration on the QEMU backend, each beside raw QEMU migration of the same kind of VM
//! with the same parameters in the same run:
//!
//! * raw: QEMU's own migration driven over QMP (`migrate-incoming`, `migrate`,
//!   `query-migrate`, `cont`) by the `uvm` crate alone: no host state, no reconnect;
//! * ferry: `ferry migrate` between two ferry hosts (state directories), host state included.
//!
//! Per configuration (guest memory 256 MiB and 1 GiB; idle, or with a process rewriting
//! 32 MiB of random data in a loop) both VMs are booted with their workload, then migrated in
//! turns (raw, ferry, ferry, raw, ...), each after running alone for [`SETTLE`] while the
//! other is stopped: on this noisy machine a ratio of two phases run a minute apart measured
//! the machine more than ferry. Reported: total time (from asking the destination to listen
//! to the guest running there), the transfer part of it (from the source starting to send
//! memory: the destination's QEMU start excluded), QEMU's downtime, and ferry's added
//! blackout: from the guest resuming on the destination to the first byte of a container's
//! output reaching the destination host (a counter printing every 10 ms), over
//! `FERRY_BENCH_RUNS` (16; made even) migrations each: means of the times (see [`stats`]),
//! medians of the downtime and the blackout.
//!
//! Run: `cargo bench -p ferry --bench migrate` (needs qemu-system-x86_64 and apt for the
//! image); `FERRY_BENCH_ONLY=1024-dirty` (comma-separated, of 256/1024 and idle/dirty) runs a
//! subset. Prints one JSON object on stdout.

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

/// Before each migration the VM about to move runs this long (the one not measured is
/// stopped meanwhile: on 2 cores a second running TCG guest, dirtier and all, would weigh on
/// the first).
const SETTLE: Duration = Duration::from_secs(1);

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Times are compared by their means. Migration times here are bimodal, for raw QEMU and
/// ferry alike: about half the migrations take twice as long as the others (with [`SETTLE`]
/// at 1 s, the slow ones were those of a VM moved again right after its own last move).
/// Taken in turns (raw, ferry, ferry, raw, ...), an even number of migrations gives each side
/// as many of each kind; a mean weighs them alike, where a median of a few lands in one mode
/// or the other.
fn stats(totals: Vec<f64>, transfers: Vec<f64>, downtimes: Vec<f64>) -> Value {
    json!({
        "total_ms": mean(&totals),
        "transfer_ms": mean(&transfers),
        "total_median_ms": median(totals),
        "downtime_ms": median(downtimes),
    })
}

/// Raw QEMU: a VM with the workload, migrated by the `uvm` crate alone, paused between its
/// migrations.
struct Raw {
    work: PathBuf,
    img: image::Image,
    mib: u32,
    vm: QemuUvm,
    moves: usize,
    // The first connection and the workload's handles (the guest runs the workload whether
    // or not they still connect).
    _conn: Option<host::GuestConnection>,
    _counter: Option<host::Process>,
    _dirtier: Option<(host::Running, tokio::io::BufReader<tokio::io::DuplexStream>)>,
    totals: Vec<f64>,
    transfers: Vec<f64>,
    downtimes: Vec<f64>,
}

impl Raw {
    /// The configuration of its `n`th QEMU (0: the first, booted; then one per move).
    fn config(img: &image::Image, work: &Path, mib: u32, n: usize) -> QemuConfig {
        let mut c = QemuConfig::new(
            "raw",
            work.join(format!("raw{n}")),
            img.vmlinux.clone(),
            img.initramfs.clone(),
        );
        c.memory_mib = mib;
        c
    }

    /// Boots the VM, starts the counter (and the dirtier, past its setup), and pauses it.
    async fn boot(img: &image::Image, work: &Path, mib: u32, dirty: bool) -> Raw {
        let mut raw = Raw {
            work: work.to_path_buf(),
            img: img.clone(),
            mib,
            vm: QemuUvm::new(Raw::config(img, work, mib, 0)),
            moves: 0,
            _conn: None,
            _counter: None,
            _dirtier: None,
            totals: Vec::new(),
            transfers: Vec::new(),
            downtimes: Vec::new(),
        };
        let conn = uvm::UtilityVm::start(&mut raw.vm).await.expect("boot");
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
        let counter = uvm_c.create_process(quiet(COUNTER), none).await.unwrap();
        raw._counter = Some(counter);
        if dirty {
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
            raw._dirtier = Some((running, r));
        }
        raw._conn = Some(conn);
        uvm::UtilityVm::pause(&mut raw.vm).await.expect("pause");
        raw
    }

    /// Runs the VM for [`SETTLE`], migrates it to a new QEMU, and pauses it there.
    async fn migrate_once(&mut self) {
        let plan = QemuMigrationPlan::from_bytes(&options()).unwrap();
        uvm::UtilityVm::resume(&mut self.vm).await.expect("resume");
        tokio::time::sleep(SETTLE).await;
        self.moves += 1;
        let n = self.moves;
        let mut dst = QemuUvm::new(Raw::config(&self.img, &self.work, self.mib, n));
        let addr = MemoryAddress::unix(self.work.join(format!("raw{n}/mem.sock"))).unwrap();
        std::fs::create_dir_all(self.work.join(format!("raw{n}"))).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<MigrationEvent>();
        let (_cancel_tx, cancel) = tokio::sync::watch::channel(false);
        let t = Instant::now();
        dst.start_incoming(&plan, &addr).await.expect("incoming");
        let transfer = Instant::now();
        // Either side failing ends both (a guest that died leaves the other side waiting).
        tokio::try_join!(
            self.vm.migrate_out(&plan, &addr, &tx, cancel),
            dst.wait_incoming(&tx)
        )
        .expect("raw migration");
        dst.resume_incoming().await.expect("resume");
        self.totals.push(t.elapsed().as_secs_f64() * 1e3);
        self.transfers.push(transfer.elapsed().as_secs_f64() * 1e3);
        self.vm
            .finalize_source(false)
            .await
            .expect("quit the source");
        while let Ok(ev) = rx.try_recv() {
            if ev.phase == Phase::OfflineDone
                && let Some(ms) = ev.blackout_ms
            {
                self.downtimes.push(ms as f64);
            }
        }
        self.vm = dst;
        uvm::UtilityVm::pause(&mut self.vm).await.expect("pause");
        eprintln!(
            "  raw #{n}: total {:.0} ms, transfer {:.0} ms",
            self.totals[n - 1],
            self.transfers[n - 1]
        );
    }

    async fn finish(mut self) -> Value {
        let _ = uvm::UtilityVm::stop(&mut self.vm, Duration::from_secs(2)).await;
        stats(self.totals, self.transfers, self.downtimes)
    }
}

/// ferry: a UVM with a printing counter (and the dirtier) in containers, moved back and
/// forth between two ferry hosts (state directories); its QEMU is stopped (SIGSTOP: ferry
/// has no pause command) between its migrations.
struct Ferry {
    states: [PathBuf; 2],
    moves: usize,
    totals: Vec<f64>,
    transfers: Vec<f64>,
    downtimes: Vec<f64>,
    blackouts: Vec<f64>,
}

impl Ferry {
    fn here(&self) -> &Path {
        &self.states[self.moves % 2]
    }

    /// Signals the UVM's QEMU on the host that runs it.
    fn signal_qemu(&self, sig: nix::sys::signal::Signal) {
        let info: Value =
            serde_json::from_str(&ferry(self.here(), &["uvm", "inspect", "b"])).unwrap();
        let pid = info["uvm"]["pid"].as_i64().expect("the UVM's QEMU pid") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal QEMU");
    }

    fn boot(cache: &Path, work: &Path, mib: u32, dirty: bool) -> Ferry {
        let states = [work.join("host0"), work.join("host1")];
        for s in &states {
            std::fs::create_dir_all(s.join("images")).unwrap();
            let _ = std::os::unix::fs::symlink(cache, s.join("images/uvm"));
        }
        let mem = mib.to_string();
        let f = Ferry {
            states,
            moves: 0,
            totals: Vec::new(),
            transfers: Vec::new(),
            downtimes: Vec::new(),
            blackouts: Vec::new(),
        };
        let here = f.here();
        ferry(
            here,
            &["uvm", "start", "b", "--backend", "qemu", "--memory", &mem],
        );
        ferry(
            here,
            &["run", "b", "-d", "--id", "count", "--", "sh", "-c", COUNTER],
        );
        if dirty {
            ferry(
                here,
                &["run", "b", "-d", "--id", "dirty", "--", "sh", "-c", DIRTIER],
            );
            // Bounded wait for the dirtier's setup (it prints once).
            let t = Instant::now();
            while !ferry(here, &["logs", "b", "dirty"]).contains("ready") {
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "the dirtier never got ready"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        f.signal_qemu(nix::sys::signal::Signal::SIGSTOP);
        f
    }

    /// Runs the UVM for [`SETTLE`], migrates it to the other host, waits for its first output
    /// there, and stops it.
    fn migrate_once(&mut self) {
        self.signal_qemu(nix::sys::signal::Signal::SIGCONT);
        std::thread::sleep(SETTLE);
        let bw = BANDWIDTH.to_string();
        let (from, to) = (
            self.here().to_path_buf(),
            self.states[(self.moves + 1) % 2].clone(),
        );
        let to_s = to.to_str().unwrap();
        let out = ferry(
            &from,
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
        self.moves += 1;
        for line in out.lines() {
            let v: Value = serde_json::from_str(line).unwrap_or_default();
            if v["phase"] == "offline_done"
                && let Some(ms) = v["blackout_ms"].as_f64()
            {
                self.downtimes.push(ms);
            }
            if let Some(ms) = v["total_ms"].as_f64() {
                self.totals.push(ms);
                self.transfers
                    .push(v["transfer_ms"].as_f64().unwrap_or(f64::NAN));
            }
        }
        // The destination times the first output after the resume; bounded wait for it.
        let t = Instant::now();
        loop {
            let info: Value = serde_json::from_str(&ferry(&to, &["uvm", "inspect", "b"])).unwrap();
            if let Some(ms) = info["last_migration"]["added_blackout_ms"].as_f64() {
                self.blackouts.push(ms);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no first output: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.signal_qemu(nix::sys::signal::Signal::SIGSTOP);
        let last = |v: &[f64]| v.last().copied().unwrap_or(f64::NAN);
        eprintln!(
            "  ferry #{}: total {:.0} ms, transfer {:.0} ms, added blackout {:.0} ms",
            self.moves,
            last(&self.totals),
            last(&self.transfers),
            last(&self.blackouts)
        );
    }

    fn finish(self) -> Value {
        self.signal_qemu(nix::sys::signal::Signal::SIGCONT);
        ferry(self.here(), &["uvm", "stop", "b"]);
        let mut v = stats(self.totals, self.transfers, self.downtimes);
        v["added_blackout_ms"] = json!(median(self.blackouts));
        v
    }
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
        .unwrap_or(16usize)
        // Even: see `stats`.
        .next_multiple_of(2);
    let base = std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
    let work = PathBuf::from(base).join(format!("ferry-migrate-bench-{}", std::process::id()));
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ferry-bench-images");
    let img = image(&cache);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut results = Vec::new();
    // A subset, e.g. FERRY_BENCH_ONLY=1024-dirty (or 256-idle,1024-idle).
    let only = std::env::var("FERRY_BENCH_ONLY").unwrap_or_default();
    for mib in [256u32, 1024] {
        for dirty in [false, true] {
            let name = format!("{mib}-{}", if dirty { "dirty" } else { "idle" });
            if !only.is_empty() && !only.split(',').any(|o| o.trim() == name) {
                continue;
            }
            let dir = work.join(format!("{mib}-{dirty}"));
            let mut raw = rt.block_on(Raw::boot(&img, &dir, mib, dirty));
            let mut f = Ferry::boot(&cache, &dir, mib, dirty);
            // Interleaved (and in turns first), so that the machine's moods weigh on both.
            for n in 0..runs {
                if n % 2 == 0 {
                    rt.block_on(raw.migrate_once());
                    f.migrate_once();
                } else {
                    f.migrate_once();
                    rt.block_on(raw.migrate_once());
                }
            }
            let raw = rt.block_on(raw.finish());
            let f = f.finish();
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
