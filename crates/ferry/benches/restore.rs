//! How long a restored host process takes to get every process's output flowing again:
//! from the start of `ferry uvm restore` until the log of every process has grown past what
//! it held at the save, for 1, 100 and 1000 live processes (embedded default).
//!
//! Run: `cargo bench -p ferry --bench restore` (root, busybox-static). `FERRY_BENCH_COUNTS`
//! overrides the process counts (comma-separated). Prints one JSON object.

use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod support;

use support::ferry;

/// Sizes of every stdout log under the UVM.
fn log_sizes(state: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for c in std::fs::read_dir(state.join("uvms/u/logs"))
        .unwrap()
        .flatten()
    {
        for f in std::fs::read_dir(c.path()).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "stdout") {
                out.push((f.path(), f.metadata().unwrap().len()));
            }
        }
    }
    out
}

fn measure(n: usize) -> f64 {
    // On tmpfs, as ferry's default state root (/run/ferry) is on a usual host: restore binds
    // thousands of Unix sockets, and on ext4 each bind allocates an inode, which gets slower
    // after every cycle of deleting and re-creating them (measured: 150 ms → 1 s for 2000).
    let base = std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let state = PathBuf::from(format!("{base}/frb-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    ferry(&state, &["uvm", "start", "u"]);
    // Writers printing a line every 100 ms: one container per 100 processes (an init and up to
    // 99 exec'd processes), started with the CLI as a user would.
    // The wait is `read -t` on a private FIFO, not `sleep`: busybox forks for `sleep`, and
    // 1000 shells forking ten times a second need several times what 2 cores have, so the
    // figure would measure the scheduler, not the restore.
    let writer =
        "f=/tmp/w$$; mkfifo $f; exec 3<>$f; while true; do echo tick; read -t 0.1 x <&3; done";
    let mut started = 0;
    let mut c = 0;
    while started < n {
        let id = format!("c{c}");
        ferry(
            &state,
            &["run", "u", "-d", "--id", &id, "--", "sh", "-c", writer],
        );
        started += 1;
        for _ in 1..100 {
            if started == n {
                break;
            }
            ferry(&state, &["exec", "u", &id, "-d", "--", "sh", "-c", writer]);
            started += 1;
        }
        c += 1;
    }
    let snap = ferry(&state, &["uvm", "save", "u"]);
    let at_save = log_sizes(&state);
    assert_eq!(at_save.len(), n);
    let start = Instant::now();
    ferry(&state, &["uvm", "restore", snap.trim()]);
    // A measurement, not a test: sample the logs until every one has grown.
    let mut pending: Vec<(PathBuf, u64)> = at_save;
    while !pending.is_empty() {
        pending.retain(|(p, size)| {
            std::fs::metadata(p)
                .map(|m| m.len() <= *size)
                .unwrap_or(true)
        });
        if start.elapsed() > Duration::from_secs(120) {
            panic!("{} of {n} streams never resumed", pending.len());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let secs = start.elapsed().as_secs_f64();
    ferry(&state, &["uvm", "stop", "u"]);
    let _ = std::fs::remove_dir_all(&state);
    secs
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the restore benchmark needs root (the local UVM uses namespaces)");
        println!("{}", json!({"skipped": "needs root"}));
        return;
    }
    let counts: Vec<usize> = std::env::var("FERRY_BENCH_COUNTS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 100, 1000]);
    let mut results = serde_json::Map::new();
    for n in counts {
        let secs = measure(n);
        eprintln!(
            "{n} processes: output flowing again {:.0} ms after restore started",
            secs * 1000.0
        );
        results.insert(n.to_string(), json!(secs * 1000.0));
    }
    let ok_1000 = results
        .get("1000")
        .and_then(|v| v.as_f64())
        .map(|ms| ms < 500.0);
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "restore_until_output_flows_ms": results,
            "target_1000_under_500ms": ok_1000,
        }))
        .unwrap()
    );
}
