//! Bridge benchmark: round-trip latency, pipelined throughput and idle memory of a real
//! `ferry-gcs`, each next to a raw Unix-socket baseline moving the same number of bytes.
//!
//! Run with `cargo bench -p gcs --bench bridge`. One JSON object goes to stdout, notes to
//! stderr. Environment:
//!
//! * `FERRY_GCS_BIN` — the agent binary to measure (default: the one cargo built for this bench);
//! * `FERRY_BENCH_LOG_LEVEL` — the agent's `--log-level` (default `info`, its own default);
//! * `FERRY_BENCH_N` — round trips per latency measurement (default 20000);
//! * `FERRY_BENCH_SECS` — minimum seconds per throughput measurement (default 3);
//! * `FERRY_BENCH_RUNTIME` — `current_thread` (default) or `multi_thread` for the host side;
//! * `FERRY_BENCH_ECHO_RUNTIME` — the echo process's runtime: `current_thread` (default, as the
//!   agent's own in `gcs::cli`) or `multi_thread` (2 workers, as the agent had before).
//! * `FERRY_BENCH_CPUS` — `H,P`: pin the host side to CPU `H` and the agent and the echo process
//!   to CPU `P`, so both cross the same pair of CPUs (unset: the scheduler places everything).

#[path = "../tests/support/mod.rs"]
mod support;

use bridge::message::{GetPropertiesRequest, PropertyQuery, Request, RequestBase, property_type};
use bridge::{JsonString, UVM_CONTAINER_ID};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::{Conn, Gcs, ok};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

const WARMUP: usize = 2_000;
/// Latency samples are taken in this many alternating batches per kind.
const LATENCY_BATCHES: usize = 20;
const IN_FLIGHT: usize = 16;
const MIN_PIPELINED_REQUESTS: u64 = 50_000;

const TARGET_RATIO: f64 = 3.0;
const TARGET_RPS: f64 = 30_000.0;
const TARGET_RSS_KB: u64 = 10 * 1024;

/// Argument that turns this binary into the raw baseline's echo process.
const ECHO_ARG: &str = "--echo-server";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == ECHO_ARG) {
        echo_server(&args[i + 1..]);
        return;
    }
    let flavour = std::env::var("FERRY_BENCH_RUNTIME").unwrap_or_else(|_| "current_thread".into());
    let mut builder = match flavour.as_str() {
        "multi_thread" => tokio::runtime::Builder::new_multi_thread(),
        "current_thread" => tokio::runtime::Builder::new_current_thread(),
        other => panic!("FERRY_BENCH_RUNTIME={other:?}: use current_thread or multi_thread"),
    };
    if let Some((host, _)) = placement() {
        // Before the runtime exists: a current-thread runtime runs on this thread.
        pin(0, host);
    }
    let rt = builder.enable_all().build().expect("tokio runtime");
    let report = rt.block_on(run(flavour));
    println!("{}", serde_json::to_string_pretty(&report).expect("report"));
}

// ---------------------------------------------------------------------------------------------
// Statistics

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
    min: f64,
    max: f64,
}

impl Stats {
    /// From per-round-trip durations in nanoseconds; figures in microseconds.
    fn of(mut ns: Vec<u64>) -> Stats {
        ns.sort_unstable();
        let at = |q: f64| {
            let rank = ((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len());
            ns[rank - 1] as f64 / 1_000.0
        };
        Stats {
            p50: at(0.50),
            p99: at(0.99),
            mean: ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1_000.0,
            min: ns[0] as f64 / 1_000.0,
            max: ns[ns.len() - 1] as f64 / 1_000.0,
        }
    }

    fn json(&self) -> Value {
        json!({
            "p50": round2(self.p50),
            "p99": round2(self.p99),
            "mean": round2(self.mean),
            "min": round2(self.min),
            "max": round2(self.max),
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn vm_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Context switches of every thread of `pid` so far (voluntary ones are mostly sleeps: each is
/// a thread parking and later being woken).
fn ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

fn per(count: u64, n: u64) -> f64 {
    round2(count as f64 / n.max(1) as f64)
}

/// `FERRY_BENCH_CPUS=H,P`: the host's CPU and the peers' (agent, echo process) CPU.
fn placement() -> Option<(usize, usize)> {
    let v = std::env::var("FERRY_BENCH_CPUS").ok()?;
    let parsed = v
        .split_once(',')
        .and_then(|(h, p)| Some((h.trim().parse().ok()?, p.trim().parse().ok()?)));
    Some(parsed.unwrap_or_else(|| panic!("FERRY_BENCH_CPUS={v:?}: use HOST_CPU,PEER_CPU")))
}

/// Pins every thread of `pid` (0: the calling thread) to `cpu`.
fn pin(pid: u32, cpu: usize) {
    let tids: Vec<i32> = if pid == 0 {
        vec![0]
    } else {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("threads of a benchmarked process")
            .flatten()
            .filter_map(|t| t.file_name().to_str()?.parse().ok())
            .collect()
    };
    for tid in tids {
        // SAFETY: cpu_set_t is plain data, initialised by CPU_ZERO before use.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        assert_eq!(
            rc,
            0,
            "pin {tid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// This process's CPU affinity, e.g. "0-1" (children inherit it).
fn cpus_allowed() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Lets a process settle, then reads its resident set. A fixed pause is fine here: this is a
/// measurement of a quiet process, not a synchronisation point.
async fn idle_rss_kb(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_secs(1)).await;
    vm_rss_kb(pid)
}

// ---------------------------------------------------------------------------------------------
// The bridge

fn probe() -> Request {
    Request::GetProperties(GetPropertiesRequest {
        base: RequestBase::for_container(UVM_CONTAINER_ID),
        query: JsonString(PropertyQuery {
            property_types: vec![property_type::PROCESS_LIST.into()],
        }),
    })
}

/// One request at a time; returns per-round-trip nanoseconds.
async fn bridge_latency(conn: &Conn, req: &Request, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        // send + await rather than call(): call() arms a timeout timer per request, a host-side
        // cost that is not the bridge's.
        let (_, rx) = conn.send(req).await;
        rx.await.expect("bridge closed during the benchmark");
        out.push(t.elapsed().as_nanos() as u64);
    }
    out
}

/// Closed loop: `IN_FLIGHT` workers each keep one request outstanding. Returns (completed,
/// seconds) counted up to the moment the run is stopped.
async fn bridge_throughput(conn: Arc<Conn>, req: Request, min_secs: f64) -> (u64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (conn, req, done, stop) = (conn.clone(), req.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (_, rx) = conn.send(&req).await;
                    rx.await.expect("bridge closed during the benchmark");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let (count, secs) = stop_after(&done, &stop, min_secs).await;
    for w in workers {
        w.await.expect("worker");
    }
    (count, secs)
}

/// Waits until at least `min_secs` have passed and `MIN_PIPELINED_REQUESTS` completed, then
/// raises `stop` and returns the count and time at that instant.
async fn stop_after(done: &AtomicU64, stop: &AtomicBool, min_secs: f64) -> (u64, f64) {
    let t0 = Instant::now();
    let start = done.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let count = done.load(Ordering::Relaxed) - start;
        let secs = t0.elapsed().as_secs_f64();
        // The 60 s cap keeps a pathologically slow build from running forever.
        if (secs >= min_secs && count >= MIN_PIPELINED_REQUESTS) || secs > 60.0 {
            stop.store(true, Ordering::Relaxed);
            return (count, secs);
        }
    }
}

/// Starts the agent binary under test against `gcs`'s host end and returns the negotiated
/// connection.
///
/// The support module always starts the cargo-built agent at debug log level, so its child is
/// replaced: its first connection is accepted (so nothing stale waits in the listen queue), the
/// child killed, and the binary under test started on the same base path.
async fn start_agent(gcs: &mut Gcs, bin: &Path, log_level: &str) -> Conn {
    let first = gcs.accept().await;
    let _ = gcs.child.kill();
    let _ = gcs.child.wait();
    drop(first);
    let dir = gcs.dir.0.clone();
    gcs.child = Command::new(bin)
        .arg("--transport=hybrid-vsock")
        .arg("--base")
        .arg(dir.join("vm.sock"))
        .arg("--state-dir")
        .arg(dir.join("state-bench"))
        .arg("--log-file")
        .arg(dir.join("gcs.log"))
        .arg(format!("--log-level={log_level}"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    gcs.connect().await
}

// ---------------------------------------------------------------------------------------------
// The raw baseline: a fixed-size ping-pong over a Unix socket

/// The echo process: binds `path`, says "ready" on stdout, then for one client answers every
/// `req` bytes read with `resp` bytes, on the same kind of runtime as the agent.
fn echo_server(args: &[String]) {
    let [path, req, resp] = args else {
        panic!("usage: {ECHO_ARG} PATH REQ_BYTES RESP_BYTES");
    };
    let (req, resp): (usize, usize) = (req.parse().unwrap(), resp.parse().unwrap());
    let mut builder = match echo_runtime().as_str() {
        "multi_thread" => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let rt = builder.enable_all().build().unwrap();
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        println!("ready");
        let (s, _) = listener.accept().await.unwrap();
        // Spawned: on a multi-thread runtime that puts it on a worker, next to the I/O driver
        // (block_on's own future runs on the main thread, which each readiness event would have
        // to wake); on a current-thread runtime it makes no difference.
        tokio::spawn(echo(s, req, resp)).await.unwrap();
    });
}

fn echo_runtime() -> String {
    match std::env::var("FERRY_BENCH_ECHO_RUNTIME").as_deref() {
        Ok("multi_thread") => "multi_thread".into(),
        Ok("current_thread") | Err(_) => "current_thread".into(),
        Ok(other) => {
            panic!("FERRY_BENCH_ECHO_RUNTIME={other:?}: use current_thread or multi_thread")
        }
    }
}

async fn echo(mut s: UnixStream, req: usize, resp: usize) {
    let mut inbuf = vec![0u8; req];
    let outbuf = vec![b'r'; resp];
    while s.read_exact(&mut inbuf).await.is_ok() {
        if s.write_all(&outbuf).await.is_err() {
            break;
        }
    }
}

struct EchoProcess {
    child: Child,
    path: PathBuf,
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn start_echo_process(dir: &Path, req: usize, resp: usize) -> EchoProcess {
    let path = dir.join("echo.sock");
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .arg(ECHO_ARG)
        .arg(&path)
        .arg(req.to_string())
        .arg(resp.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the echo process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("echo process ready line");
    assert_eq!(line.trim(), "ready", "echo process did not start");
    EchoProcess { child, path }
}

async fn raw_latency(s: &mut UnixStream, req: &[u8], resp: usize, n: usize) -> Vec<u64> {
    let mut buf = vec![0u8; resp];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(req).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        out.push(t.elapsed().as_nanos() as u64);
    }
    out
}

/// `IN_FLIGHT` requests outstanding on one stream: a writer spends permits, the reader returns
/// one per response.
async fn raw_throughput(s: UnixStream, req: Vec<u8>, resp: usize, min_secs: f64) -> (u64, f64) {
    let (mut r, mut w) = s.into_split();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (permits, stop) = (permits.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                permits.acquire().await.unwrap().forget();
                w.write_all(&req).await.unwrap();
                sent += 1;
            }
            (sent, w)
        })
    };
    let reader = {
        let (permits, done) = (permits.clone(), done.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; resp];
            loop {
                r.read_exact(&mut buf).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
                permits.add_permits(1);
            }
        })
    };
    let result = stop_after(&done, &stop, min_secs).await;
    let (_sent, _w) = writer.await.unwrap();
    reader.abort();
    result
}

// ---------------------------------------------------------------------------------------------

async fn run(flavour: String) -> Value {
    let n: usize = env_or("FERRY_BENCH_N", 20_000);
    let min_secs: f64 = env_or("FERRY_BENCH_SECS", 3.0);
    let log_level = std::env::var("FERRY_BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let bin = std::env::var_os("FERRY_GCS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ferry-gcs")));
    let bin_size = std::fs::metadata(&bin)
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()))
        .len();
    eprintln!(
        "bridge bench: {} ({bin_size} bytes), log level {log_level}, host runtime {flavour}, N={n}",
        bin.display()
    );

    let mut gcs = Gcs::start("bench").await;
    let conn = start_agent(&mut gcs, &bin, &log_level).await;
    let pid = gcs.pid();
    if let Some((_, peer)) = placement() {
        pin(pid, peer);
    }
    let rss_idle = idle_rss_kb(pid).await;
    eprintln!("ferry-gcs pid {pid}: idle RSS {rss_idle} kB after connect + negotiate");

    let req = probe();
    let req_bytes = req.to_frame(0).unwrap().encode(u32::MAX).unwrap();
    let first = conn.call(req.clone()).await;
    ok(&first);
    // The agent encodes with the same types, so re-encoding gives its frame's exact size.
    let resp_len = first.to_frame(0).unwrap().encode(u32::MAX).unwrap().len();
    eprintln!(
        "request frame {} bytes, response frame {resp_len} bytes",
        req_bytes.len()
    );

    // Raw baselines: an echo process like the agent, and an echo task on the host's own
    // runtime (the floor of a Unix-socket round trip, with no second process to wake).
    let echo_proc = start_echo_process(&gcs.dir.0, req_bytes.len(), resp_len);
    let echo_pid = echo_proc.child.id();
    if let Some((_, peer)) = placement() {
        pin(echo_pid, peer);
    }
    let rss_echo = idle_rss_kb(echo_pid).await;
    let mut raw_s = UnixStream::connect(&echo_proc.path).await.unwrap();
    let (mut same_s, echo_end) = UnixStream::pair().unwrap();
    let echo_task = tokio::spawn(echo(echo_end, req_bytes.len(), resp_len));

    bridge_latency(&conn, &req, WARMUP).await;
    raw_latency(&mut raw_s, &req_bytes, resp_len, WARMUP).await;
    raw_latency(&mut same_s, &req_bytes, resp_len, WARMUP).await;

    // Batches alternate so that all three see the same conditions: on a VM the cost of waking
    // an idle vCPU drifts with whatever else the host runs, and it dominates a round trip.
    let me = std::process::id();
    let (mut bridge_ns, mut raw_ns, mut same_ns) = (Vec::new(), Vec::new(), Vec::new());
    let (mut agent_cs, mut host_bridge_cs, mut echo_cs, mut host_raw_cs) = (0, 0, 0, 0);
    for b in 0..LATENCY_BATCHES {
        let k = n / LATENCY_BATCHES + usize::from(b < n % LATENCY_BATCHES);
        let (a0, h0) = (ctx_switches(pid), ctx_switches(me));
        bridge_ns.extend(bridge_latency(&conn, &req, k).await);
        agent_cs += ctx_switches(pid) - a0;
        host_bridge_cs += ctx_switches(me) - h0;
        let (e0, h0) = (ctx_switches(echo_pid), ctx_switches(me));
        raw_ns.extend(raw_latency(&mut raw_s, &req_bytes, resp_len, k).await);
        echo_cs += ctx_switches(echo_pid) - e0;
        host_raw_cs += ctx_switches(me) - h0;
        same_ns.extend(raw_latency(&mut same_s, &req_bytes, resp_len, k).await);
    }
    drop(same_s);
    let _ = echo_task.await;
    let (bridge, raw, same_rt) = (Stats::of(bridge_ns), Stats::of(raw_ns), Stats::of(same_ns));
    eprintln!(
        "latency p50: bridge {:.1} µs, raw {:.1} µs, raw same runtime {:.1} µs",
        bridge.p50, raw.p50, same_rt.p50
    );

    let conn = Arc::new(conn);
    let cs0 = ctx_switches(pid);
    let (b_count, b_secs) = bridge_throughput(conn.clone(), req.clone(), min_secs).await;
    // Includes the few in-flight requests finished after the count stopped: negligible.
    let bridge_tp_cs = per(ctx_switches(pid) - cs0, b_count);
    let bridge_rps = b_count as f64 / b_secs;
    eprintln!("bridge throughput {bridge_rps:.0} req/s ({b_count} in {b_secs:.2} s)");
    let rss_after = idle_rss_kb(pid).await;
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
    drop(conn);

    let cs0 = ctx_switches(echo_pid);
    let (r_count, r_secs) = raw_throughput(raw_s, req_bytes.clone(), resp_len, min_secs).await;
    let raw_tp_cs = per(ctx_switches(echo_pid) - cs0, r_count);
    let raw_rps = r_count as f64 / r_secs;
    eprintln!("raw throughput {raw_rps:.0} req/s");
    drop(echo_proc);

    let ratio = bridge.p50 / raw.p50;
    json!({
        "bench": "bridge",
        "ferry_gcs_bin": bin.display().to_string(),
        "ferry_gcs_bin_bytes": bin_size,
        "ferry_gcs_log_level": log_level,
        "host_runtime": flavour,
        "echo_runtime": echo_runtime(),
        // Pinning (taskset) changes the picture: no idle CPU to wake, so wake-up latency drops.
        "cpus_allowed": cpus_allowed(),
        "cpus_host_peers": placement().map(|(h, p)| [h, p]),
        "request": "GetProperties(UVM, ProcessList)",
        "request_frame_bytes": req_bytes.len(),
        "response_frame_bytes": resp_len,
        "latency_us": {
            "n": n,
            "warmup": WARMUP,
            "interleaved_batches": LATENCY_BATCHES,
            "bridge": bridge.json(),
            "raw_echo_process": raw.json(),
            "raw_echo_same_runtime": same_rt.json(),
            "ratio_p50": round2(ratio),
            "target_ratio_p50": TARGET_RATIO,
            "meets_target": ratio <= TARGET_RATIO,
        },
        "throughput": {
            "in_flight": IN_FLIGHT,
            "bridge_rps": bridge_rps.round(),
            "bridge_requests": b_count,
            "bridge_seconds": round2(b_secs),
            "raw_rps": raw_rps.round(),
            "raw_requests": r_count,
            "raw_seconds": round2(r_secs),
            "ratio_raw_over_bridge": round2(raw_rps / bridge_rps),
            "target_bridge_rps": TARGET_RPS,
            "meets_target": bridge_rps >= TARGET_RPS,
        },
        "context_switches_per_request": {
            "ferry_gcs_latency": per(agent_cs, n as u64),
            "host_latency": per(host_bridge_cs, n as u64),
            "ferry_gcs_throughput": bridge_tp_cs,
            "echo_process_latency": per(echo_cs, n as u64),
            "host_raw_latency": per(host_raw_cs, n as u64),
            "echo_process_throughput": raw_tp_cs,
        },
        "rss_kb": {
            "ferry_gcs_idle": rss_idle,
            "ferry_gcs_idle_after_load": rss_after,
            "ferry_gcs_peak": hwm,
            "raw_echo_process_idle": rss_echo,
            "target_ferry_gcs_idle": TARGET_RSS_KB,
            "meets_target": rss_idle < TARGET_RSS_KB,
        },
    })
}
