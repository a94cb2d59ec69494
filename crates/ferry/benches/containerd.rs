//! `ctr run` to first output: how long containerd takes, from the `ctr run` command to the first
//! byte of the container's output, with ferry's runtime (a UVM per sandbox; local, and QEMU
//! when it is installed) beside runc in the same run, alternated. Prints one JSON object.
//!
//! `cargo bench -p ferry --bench containerd` (root, containerd, runc, busybox-static);
//! `FERRY_BENCH_RUNS` sets the runs per runtime (default 10).

#[path = "../tests/support/containerd_lab.rs"]
mod lab;

use lab::{FERRY, IMAGE, Lab, RUNC, skip};
use std::io::Read;
use std::process::Stdio;
use std::time::Instant;

/// Seconds from spawning `ctr run` to the first byte of output, and to ctr's exit; `config`
/// is a ferry runtime config path.
fn first_output(lab: &Lab, runtime: &str, config: Option<&str>, id: &str) -> (f64, f64) {
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    if let Some(c) = config {
        args.extend(["--runtime-config-path", c]);
    }
    args.extend([IMAGE, id, "echo", "hi"]);
    let start = Instant::now();
    let mut child = lab
        .ctr_cmd(&args)
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
    let qemu = !lab::skip_qemu("the containerd benchmark's QEMU runs");
    let qemu_config = lab.dir.join("qemu.json");
    if qemu {
        lab.use_guest_image();
        std::fs::write(&qemu_config, r#"{"backend":"qemu","memory_mib":256}"#).unwrap();
    }
    let qemu_config = qemu.then(|| qemu_config.to_str().unwrap().to_string());
    // One warm-up each (page cache, image unpack, the shim binary, the guest image).
    first_output(&lab, RUNC, None, "warm-runc");
    first_output(&lab, FERRY, None, "warm-ferry");
    if let Some(c) = &qemu_config {
        first_output(&lab, FERRY, Some(c), "warm-qemu");
    }
    let (mut runc, mut local, mut vm) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        runc.push(first_output(&lab, RUNC, None, &format!("r{i}")));
        local.push(first_output(&lab, FERRY, None, &format!("f{i}")));
        if let Some(c) = &qemu_config {
            vm.push(first_output(&lab, FERRY, Some(c), &format!("q{i}")));
        }
    }
    let medians = |v: &[(f64, f64)]| {
        let mut first: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut total: Vec<f64> = v.iter().map(|x| x.1).collect();
        (median(&mut first), median(&mut total))
    };
    let (rf, rt) = medians(&runc);
    let (ff, ft) = medians(&local);
    let mut report = serde_json::json!({
        "benchmark": "ctr run --rm IMAGE ID echo hi: seconds to first output byte and to exit (medians)",
        "runs": runs,
        "runc": {"first_output_s": rf, "total_s": rt},
        "ferry_local": {"first_output_s": ff, "total_s": ft, "ratio_first_output": ff / rf, "ratio_total": ft / rt},
    });
    if !vm.is_empty() {
        let (qf, qt) = medians(&vm);
        report["ferry_qemu"] = serde_json::json!({
            "first_output_s": qf, "total_s": qt, "ratio_first_output": qf / rf, "ratio_total": qt / rt,
            "accel": "auto (TCG on this machine)",
        });
    }
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
