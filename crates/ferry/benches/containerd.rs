//! `ctr run` to first output: how long containerd takes, from the `ctr run` command to the first
//! byte of the container's output, with ferry's runtime (a UVM per sandbox) beside runc in the
//! same run, alternated. Prints one JSON object.
//!
//! `cargo bench -p ferry --bench containerd` (root, containerd, runc, busybox-static);
//! `FERRY_BENCH_RUNS` sets the runs per runtime (default 10).

#[path = "../tests/support/containerd_lab.rs"]
mod lab;

use lab::{FERRY, IMAGE, Lab, RUNC, skip};
use std::io::Read;
use std::process::Stdio;
use std::time::Instant;

/// Seconds from spawning `ctr run` to the first byte of output, and to ctr's exit.
fn first_output(lab: &Lab, runtime: &str, id: &str) -> (f64, f64) {
    let start = Instant::now();
    let mut child = lab
        .ctr_cmd(&["run", "--rm", "--runtime", runtime, IMAGE, id, "echo", "hi"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ctr run");
    let mut out = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    let n = out.read(&mut byte).expect("read ctr output");
    assert_eq!(n, 1, "{runtime}: no output");
    let first = start.elapsed().as_secs_f64();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{runtime}: ctr run failed");
    (first, start.elapsed().as_secs_f64())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would run this too: only measure
    // when asked.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if skip("the containerd benchmark") {
        return;
    }
    let runs: usize = std::env::var("FERRY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let lab = Lab::start();
    // One warm-up each (page cache, image unpack, the shim binary).
    first_output(&lab, RUNC, "warm-runc");
    first_output(&lab, FERRY, "warm-ferry");
    let (mut runc_first, mut runc_total, mut ferry_first, mut ferry_total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let (f, t) = first_output(&lab, RUNC, &format!("r{i}"));
        runc_first.push(f);
        runc_total.push(t);
        let (f, t) = first_output(&lab, FERRY, &format!("f{i}"));
        ferry_first.push(f);
        ferry_total.push(t);
    }
    let (rf, rt, ff, ft) = (
        median(&mut runc_first),
        median(&mut runc_total),
        median(&mut ferry_first),
        median(&mut ferry_total),
    );
    let report = serde_json::json!({
        "benchmark": "ctr run --rm IMAGE ID echo hi: seconds to first output byte and to exit (medians)",
        "runs": runs,
        "runc": {"first_output_s": rf, "total_s": rt},
        "ferry_local": {"first_output_s": ff, "total_s": ft},
        "ratio_first_output": ff / rf,
        "ratio_total": ft / rt,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
