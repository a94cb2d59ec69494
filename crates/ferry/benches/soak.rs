//! Soak (issue 7): one UVM on the embedded default, M processes each writing self-checking
//! lines at a set rate for N minutes, the UVM handed to a new host process (`ferry uvm
//! upgrade`) every few seconds, and every process's output read as a user would, with
//! `ferry logs -f`, across the handoffs. At the end: bytes written (from each process's own
//! count) against bytes received, lines lost, duplicated or out of order, exit codes missing
//! (`ferry wait`), handoffs ok/failed, and the shim's and the guest agent's RSS and open fds
//! sampled over time, with a verdict on whether they stayed flat.
//!
//! Run: `cargo bench -p ferry --bench soak` (root, busybox-static). Parameters (env):
//! `FERRY_SOAK_MINUTES` (1), `FERRY_SOAK_PROCS` (50), `FERRY_SOAK_RATE` bytes/s per process
//! (102400), `FERRY_SOAK_HANDOFF_SECS` (10), `FERRY_SOAK_SAMPLE_SECS` (5),
//! `FERRY_SOAK_LOG_LIMIT_MIB` (4, the UVM's per-stream log ring), `FERRY_SOAK_OUT` (output
//! directory, default `<target>/tmp/soak`). Prints one JSON document and writes it with an SVG
//! of the RSS and fd curves to the output directory.
//!
//! Each process is a busybox shell: every 100 ms it reads the clock (`/proc/uptime`, no fork)
//! and writes as many lines as the rate allows so far, so a stalled writer catches up and
//! the average holds. Line `k` of process `i` is `"{i} {k} {pad}\n"`; when the file `/tmp/stop`
//! appears in its container (`/tmp/stop0` for the container's first process, whose exit ends
//! the container), it writes `"END {i} {k} {centiseconds}\n"` and exits with `1 + i % 200`.
//!
//! A reader per process runs `ferry logs -f` and, when the session ends (the old host process
//! exits at each handoff), runs it again. A new session replays the log from its oldest
//! retained byte (the CLI says on stderr how many older bytes the ring dropped), so the reader
//! skips what it has already read by stream offset, then checks the sequence numbers: a jump is
//! lost output, a repeat duplicated output.

use serde_json::{Value, json};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

mod support;

use support::{command, ferry, try_ferry};

/// Nominal line length the writers pace by.
const LINE: u64 = 1024;
/// Processes per container (the first is the container's init).
const PER_CONTAINER: usize = 10;

struct Params {
    minutes: f64,
    procs: usize,
    rate: u64,
    handoff_secs: f64,
    sample_secs: f64,
    log_limit_mib: u64,
    out: PathBuf,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Params {
    fn from_env() -> Params {
        Params {
            minutes: env_or("FERRY_SOAK_MINUTES", 1.0),
            procs: env_or("FERRY_SOAK_PROCS", 50),
            rate: env_or("FERRY_SOAK_RATE", 102_400),
            handoff_secs: env_or("FERRY_SOAK_HANDOFF_SECS", 10.0),
            sample_secs: env_or("FERRY_SOAK_SAMPLE_SECS", 5.0),
            log_limit_mib: env_or("FERRY_SOAK_LOG_LIMIT_MIB", 4),
            out: std::env::var("FERRY_SOAK_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("soak")),
        }
    }
}

/// One writer: its index, container and pid.
#[derive(Clone)]
struct Writer {
    idx: usize,
    container: String,
    pid: u32,
}

impl Writer {
    fn exit_code(&self) -> i64 {
        1 + (self.idx % 200) as i64
    }
}

fn pad_len() -> usize {
    LINE as usize - 12
}

fn digits(n: u64) -> u64 {
    n.to_string().len() as u64
}

/// Length of line `k` of writer `i`, newline included.
fn line_len(i: usize, k: u64) -> u64 {
    digits(i as u64) + 1 + digits(k) + 1 + pad_len() as u64 + 1
}

fn script(i: usize, rate: u64, first: bool) -> String {
    let stop = if first { "/tmp/stop0" } else { "/tmp/stop" };
    let pad = "x".repeat(pad_len());
    // /proc/uptime is "SECONDS.CC ...": the two parts joined are centiseconds.
    format!(
        "i={i}; n=0; pad={pad}; f=/tmp/w$$; mkfifo $f; exec 3<>$f; \
         read up r < /proc/uptime; t0=${{up%.*}}${{up#*.}}; \
         while [ ! -e {stop} ]; do \
           read up r < /proc/uptime; now=${{up%.*}}${{up#*.}}; \
           want=$(( (now - t0) * {rate} / {per_cs} )); \
           while [ $n -lt $want ]; do n=$((n+1)); echo \"$i $n $pad\"; done; \
           read -t 0.1 x <&3; \
         done; \
         read up r < /proc/uptime; now=${{up%.*}}${{up#*.}}; \
         echo \"END $i $n $((now - t0))\"; exit {code}",
        per_cs = 100 * LINE,
        code = 1 + i % 200,
    )
}

/// What one reader saw.
#[derive(Default, Clone, serde::Serialize)]
struct ReadStats {
    /// Bytes of distinct, well-formed lines received in order (the END line included).
    received_bytes: u64,
    /// Next sequence number expected.
    next: u64,
    lost_lines: u64,
    lost_bytes: u64,
    duplicated_lines: u64,
    duplicated_bytes: u64,
    corrupt_lines: u64,
    /// Bytes the log ring had dropped before this reader got to them (the reader fell behind
    /// by more than the log limit: the soak's reader, not the handoffs).
    ring_gap_bytes: u64,
    /// Sessions of `ferry logs -f` (one per handoff, plus retries).
    sessions: u64,
    failed_sessions: u64,
    /// Sessions told of dropped older output more than once before their first byte.
    multi_notice_starts: u64,
    /// From the END line: last sequence number written and the writer's running time.
    end_seq: Option<u64>,
    end_cs: Option<u64>,
    /// Stream offset reached.
    offset: u64,
    /// The first irregularities seen (kind, sequence numbers, stream offset, session, time).
    events: Vec<Value>,
    /// Stream offset just past the line being checked.
    #[serde(skip)]
    offset_at_line: u64,
}

impl ReadStats {
    fn event(&mut self, kind: &str, got: u64, line_len: u64) {
        if self.events.len() < 20 {
            let ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            self.events.push(json!({
                "kind": kind, "expected": self.next, "got": got,
                // The stream offset of the line's first byte.
                "offset": self.offset_at_line.saturating_sub(line_len),
                "session": self.sessions, "unix_ms": ms,
            }));
        }
    }

    fn line(&mut self, i: usize, line: &[u8]) {
        let len = line.len() as u64 + 1;
        let s = String::from_utf8_lossy(line);
        let mut parts = s.split(' ');
        let first = parts.next().unwrap_or_default();
        if first == "END" {
            let nums: Vec<u64> = parts.filter_map(|p| p.parse().ok()).collect();
            if nums.len() == 3 && nums[0] == i as u64 && self.end_seq.is_none() {
                self.end_seq = Some(nums[1]);
                self.end_cs = Some(nums[2]);
                self.received_bytes += len;
                // Lines written but never received.
                if nums[1] + 1 > self.next {
                    let missing = nums[1] + 1 - self.next;
                    self.lost_lines += missing;
                    self.lost_bytes += (self.next..=nums[1]).map(|k| line_len(i, k)).sum::<u64>();
                    self.next = nums[1] + 1;
                }
            } else if self.end_seq.is_some() {
                self.duplicated_lines += 1;
                self.duplicated_bytes += len;
            } else {
                self.corrupt_lines += 1;
            }
            return;
        }
        let seq: Option<u64> = parts.next().and_then(|p| p.parse().ok());
        let pad_ok = parts.next().is_some_and(|p| p.len() == pad_len());
        let (Some(seq), true, true) = (seq, first == i.to_string(), pad_ok) else {
            self.corrupt_lines += 1;
            return;
        };
        if self.next == 0 {
            self.next = 1;
        }
        if seq < self.next || self.end_seq.is_some() {
            self.event("duplicated", seq, len);
            self.duplicated_lines += 1;
            self.duplicated_bytes += len;
            return;
        }
        if seq > self.next {
            self.event("gap", seq, len);
            self.lost_lines += seq - self.next;
            self.lost_bytes += (self.next..seq).map(|k| line_len(i, k)).sum::<u64>();
        }
        self.received_bytes += len;
        self.next = seq + 1;
    }
}

/// Parses "ferry: N bytes of earlier output were dropped" notices.
fn dropped_notices(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("bytes of earlier output were dropped"))
        .filter_map(|l| {
            l.trim_start_matches("ferry: ")
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn set_nonblocking(fd: &impl AsRawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// Follows one writer's output with `ferry logs -f` until its END line and the end of the
/// stream, starting a new session whenever one ends (each handoff ends it).
fn read_writer(
    state: PathBuf,
    w: Writer,
    stats: Arc<Mutex<ReadStats>>,
    total: Arc<AtomicU64>,
    child_pid: Arc<Mutex<Option<u32>>>,
    abort: Arc<AtomicBool>,
) {
    let pid = w.pid.to_string();
    let mut partial: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut backoff = Duration::from_millis(50);
    loop {
        if abort.load(Ordering::SeqCst) {
            return;
        }
        let mut child = match command(&state)
            .args(["logs", "u", &w.container, "--pid", &pid, "-f"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(backoff);
                continue;
            }
        };
        *child_pid.lock().unwrap() = Some(child.id());
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        set_nonblocking(&err);
        let mut err_text = String::new();
        let mut start: Option<u64> = None;
        let mut notices_at_start = 0;
        let mut got = 0u64;
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut data = &buf[..n];
            if start.is_none() {
                // The CLI wrote its notice of older output dropped (if any) before the first
                // byte of output: it is in the pipe by now.
                let mut e = Vec::new();
                let _ = err.read_to_end(&mut e);
                err_text.push_str(&String::from_utf8_lossy(&e));
                // A replay can be told more than once before its first byte: the capture may
                // move the ring's start on while the first notice is being sent. The first
                // byte's stream offset is their sum.
                let notices = dropped_notices(&err_text);
                notices_at_start = notices.len();
                let s = notices.iter().sum::<u64>();
                let mut st = stats.lock().unwrap();
                if notices.len() > 1 {
                    st.multi_notice_starts += 1;
                }
                if s > st.offset {
                    // The ring moved past what this reader had read: a gap in what it sees.
                    st.ring_gap_bytes += s - st.offset;
                    st.offset = s;
                    partial.clear();
                }
                start = Some(s);
            }
            // Skip what earlier sessions already delivered.
            let pos = start.unwrap() + got;
            got += n as u64;
            let mut st = stats.lock().unwrap();
            if pos < st.offset {
                let skip = ((st.offset - pos) as usize).min(data.len());
                data = &data[skip..];
            }
            let mut at = st.offset;
            st.offset += data.len() as u64;
            let before = st.received_bytes;
            for &b in data {
                at += 1;
                if b == b'\n' {
                    st.offset_at_line = at;
                    st.line(w.idx, &partial);
                    partial.clear();
                } else {
                    partial.push(b);
                }
            }
            total.fetch_add(st.received_bytes - before, Ordering::Relaxed);
        }
        let status = child.wait();
        *child_pid.lock().unwrap() = None;
        let _ = err.read_to_string(&mut err_text);
        let mut st = stats.lock().unwrap();
        st.sessions += 1;
        // Notices after the first byte: the reader fell behind the ring mid-session (the
        // sequence check counts the lines; this says why). The stream offset moves on by as
        // much, so that the next session skips the right amount.
        let notices = dropped_notices(&err_text);
        if start.is_none() && !notices.is_empty() {
            // A session that delivered nothing but notices.
            notices_at_start = notices.len();
            let n = notices.iter().sum::<u64>();
            if n > st.offset {
                st.ring_gap_bytes += n - st.offset;
                st.offset = n;
                partial.clear();
            }
        }
        let late: u64 = notices.iter().skip(notices_at_start).sum();
        st.offset += late;
        st.ring_gap_bytes += late;
        let ok = status.map(|s| s.success()).unwrap_or(false);
        if !ok {
            st.failed_sessions += 1;
        }
        if st.end_seq.is_some() && ok {
            return;
        }
        drop(st);
        if got == 0 {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(400));
        } else {
            backoff = Duration::from_millis(50);
        }
    }
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    status_line(&format!("/proc/{pid}/status"), key)
}

fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Sample {
    t_s: f64,
    shim_pid: u32,
    shim_rss_kb: u64,
    shim_anon_kb: u64,
    shim_shmem_kb: u64,
    shim_fds: u64,
    agent_pid: u32,
    agent_rss_kb: u64,
    agent_anon_kb: u64,
    agent_fds: u64,
    launcher_pid: u32,
    launcher_rss_kb: u64,
    launcher_fds: u64,
    handoffs: u64,
    received_bytes: u64,
    load1: f64,
}

/// The agent proper: the UVM's pid is the process the shim started, which with `--isolate`
/// runs the agent as a child in new namespaces; follow children running the same program.
fn agent_of(pid: u32) -> u32 {
    let exe = |p: u32| std::fs::read_link(format!("/proc/{p}/exe")).ok();
    let mut cur = pid;
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{cur}/task/{cur}/children")).unwrap_or_default();
        let next = children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
            .find(|&c| exe(c).is_some() && exe(c) == exe(cur));
        match next {
            Some(c) => cur = c,
            None => return cur,
        }
    }
}

fn sample(state: &Path, t0: Instant, handoffs: u64, received: u64) -> Option<Sample> {
    let info: Value =
        serde_json::from_str(&try_ferry(state, &["uvm", "inspect", "u"]).ok()?).ok()?;
    let shim = info["shim_pid"].as_u64()? as u32;
    let launcher = info["uvm"]["pid"].as_u64()? as u32;
    let agent = agent_of(launcher);
    Some(Sample {
        t_s: t0.elapsed().as_secs_f64(),
        shim_pid: shim,
        shim_rss_kb: status_kb(shim, "VmRSS:")?,
        shim_anon_kb: status_kb(shim, "RssAnon:")?,
        shim_shmem_kb: status_kb(shim, "RssShmem:")?,
        shim_fds: fd_count(shim)?,
        agent_pid: agent,
        agent_rss_kb: status_kb(agent, "VmRSS:")?,
        agent_anon_kb: status_kb(agent, "RssAnon:")?,
        agent_fds: fd_count(agent)?,
        launcher_pid: launcher,
        launcher_rss_kb: status_kb(launcher, "VmRSS:")?,
        launcher_fds: fd_count(launcher)?,
        handoffs,
        received_bytes: received,
        load1: loadavg()
            .split(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
    })
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Least-squares slope of `y` over `x`.
fn slope(x: &[f64], y: &[f64]) -> f64 {
    let (mx, my) = (mean(x), mean(y));
    let num: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let den: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

/// Flatness of one series: the mean over the last quarter of the soak against the mean over
/// its second quarter (the first quarter is warm-up).
fn flatness(samples: &[Sample], dur: f64, f: impl Fn(&Sample) -> f64, abs_tol: f64) -> Value {
    let q = |a: f64, b: f64| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| s.t_s >= a * dur && s.t_s < b * dur + 1e-9)
            .collect()
    };
    let q2: Vec<f64> = q(0.25, 0.5).into_iter().map(&f).collect();
    let q4: Vec<f64> = q(0.75, 1.0).into_iter().map(&f).collect();
    let (m2, m4) = (mean(&q2), mean(&q4));
    let tol = (0.10 * m2).max(abs_tol);
    let half: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= 0.5 * dur).collect();
    let xs: Vec<f64> = half.iter().map(|s| s.t_s).collect();
    let ys: Vec<f64> = half.iter().map(|s| f(s)).collect();
    json!({
        "first": samples.first().map(&f),
        "last": samples.last().map(&f),
        "min": samples.iter().map(&f).fold(f64::INFINITY, f64::min),
        "max": samples.iter().map(&f).fold(f64::NEG_INFINITY, f64::max),
        "second_quarter_mean": m2,
        "last_quarter_mean": m4,
        "tolerance": tol,
        "slope_per_10_min_second_half": slope(&xs, &ys) * 600.0,
        "flat": !q2.is_empty() && !q4.is_empty() && m4 <= m2 + tol,
    })
}

/// The RSS (MiB) and fd curves of the shim and the agent, as hand-written SVG.
fn svg(samples: &[Sample], handoff_times: &[f64], title: &str) -> String {
    let (w, h) = (960.0, 680.0);
    let (left, right) = (80.0, 170.0);
    let panels = [
        ("RSS (MiB)", 40.0, 250.0),
        ("open file descriptors", 350.0, 250.0),
    ];
    let tmax = samples.last().map(|s| s.t_s).unwrap_or(1.0).max(1.0);
    let (tscale, tunit) = if tmax > 300.0 {
        (60.0, "min")
    } else {
        (1.0, "s")
    };
    let x = |t: f64| left + (t / tmax) * (w - left - right);
    let mut o = String::new();
    o.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n",
        w / 2.0
    ));
    type Series<'a> = (&'a str, &'a str, Box<dyn Fn(&Sample) -> f64>);
    for (pi, (label, top, ph)) in panels.iter().enumerate() {
        let series: Vec<Series> = if pi == 0 {
            vec![
                (
                    "shim VmRSS",
                    "#d62728",
                    Box::new(|s| s.shim_rss_kb as f64 / 1024.0),
                ),
                (
                    "shim RssAnon",
                    "#ff9896",
                    Box::new(|s| s.shim_anon_kb as f64 / 1024.0),
                ),
                (
                    "guest agent",
                    "#1f77b4",
                    Box::new(|s| s.agent_rss_kb as f64 / 1024.0),
                ),
            ]
        } else {
            vec![
                ("shim", "#d62728", Box::new(|s| s.shim_fds as f64)),
                ("guest agent", "#1f77b4", Box::new(|s| s.agent_fds as f64)),
            ]
        };
        let vmax = samples
            .iter()
            .flat_map(|s| series.iter().map(move |(_, _, f)| f(s)))
            .fold(1.0_f64, f64::max);
        // A round upper bound with 5 ticks.
        let step = nice_step(vmax * 1.15 / 5.0);
        let ymax = step * 5.0;
        let y = |v: f64| top + ph - (v / ymax) * ph;
        let bottom = top + ph;
        // Handoffs as faint ticks along the time axis.
        for &t in handoff_times.iter().filter(|&&t| t <= tmax) {
            o.push_str(&format!(
                "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#eee\"/>\n",
                x(t),
                top,
                bottom
            ));
        }
        for k in 0..=5 {
            let v = step * k as f64;
            o.push_str(&format!(
                "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ccc\" stroke-dasharray=\"2,3\"/>\n\
                 <text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4}</text>\n",
                y(v),
                w - right,
                left - 6.0,
                y(v) + 4.0,
                fmt_tick(v)
            ));
        }
        let nt = 6;
        for k in 0..=nt {
            let t = tmax * k as f64 / nt as f64;
            o.push_str(&format!(
                "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#000\"/>\n\
                 <text x=\"{0:.1}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>\n",
                x(t),
                bottom,
                bottom + 5.0,
                bottom + 18.0,
                fmt_tick(t / tscale)
            ));
        }
        o.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\" stroke=\"#000\"/>\n\
             <line x1=\"{left}\" y1=\"{bottom}\" x2=\"{0}\" y2=\"{bottom}\" stroke=\"#000\"/>\n\
             <text transform=\"translate(20,{1}) rotate(-90)\" text-anchor=\"middle\">{label}</text>\n\
             <text x=\"{2}\" y=\"{3}\" text-anchor=\"middle\">time ({tunit})</text>\n",
            w - right,
            top + ph / 2.0,
            left + (w - left - right) / 2.0,
            bottom + 34.0,
        ));
        for (si, (name, color, f)) in series.iter().enumerate() {
            let pts: Vec<String> = samples
                .iter()
                .map(|s| format!("{:.1},{:.1}", x(s.t_s), y(f(s))))
                .collect();
            o.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                pts.join(" ")
            ));
            let ly = top + 14.0 + 18.0 * si as f64;
            o.push_str(&format!(
                "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{color}\" stroke-width=\"2\"/>\n\
                 <text x=\"{3}\" y=\"{4}\">{name}</text>\n",
                w - right + 12.0,
                ly,
                w - right + 32.0,
                w - right + 38.0,
                ly + 4.0
            ));
        }
    }
    o.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" fill=\"#888\">grey verticals: handoffs (ferry uvm upgrade); \
         the shim is a new process after each</text>\n</svg>\n",
        left,
        h - 8.0
    ));
    o
}

fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.max(1e-9).log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= raw {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-6 {
        format!("{}", v.round())
    } else {
        format!("{v:.1}")
    }
}

fn machine() -> Value {
    let mem_kb = status_line("/proc/meminfo", "MemTotal:");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_total_kb": mem_kb,
        "kernel": kernel.trim(),
    })
}

/// The number after `key` in a `/proc` file of `Key: value` lines.
fn status_line(file: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One handoff; a failed upgrade that left no host process is repaired from the snapshot.
fn handoff(state: &Path, durations: &mut Vec<f64>, failures: &mut Vec<String>) {
    let start = Instant::now();
    match try_ferry(state, &["uvm", "upgrade", "u"]) {
        Ok(_) => durations.push(start.elapsed().as_secs_f64() * 1000.0),
        Err(e) => {
            eprintln!("soak: handoff failed: {e}");
            failures.push(e);
            if try_ferry(state, &["uvm", "inspect", "u"]).is_err() {
                let snap = state.join("uvms/u/snapshot");
                if let Err(e) = try_ferry(state, &["uvm", "restore", snap.to_str().unwrap()]) {
                    eprintln!("soak: restoring after the failed handoff failed too: {e}");
                }
            }
        }
    }
}

/// The SVG of a report (this benchmark's JSON).
fn plot(report: &Value) -> String {
    let samples: Vec<Sample> =
        serde_json::from_value(report["samples"].clone()).expect("samples in the report");
    let handoff_times: Vec<f64> =
        serde_json::from_value(report["handoff_times_s"].clone()).unwrap_or_default();
    let p = &report["parameters"];
    let title = format!(
        "ferry soak: {} processes x {} KiB/s, ferry uvm upgrade every {} s, {:.1} min",
        p["processes"],
        p["rate_bytes_per_s_per_process"].as_u64().unwrap_or(0) / 1024,
        p["handoff_every_s"],
        report["soak_seconds"].as_f64().unwrap_or(0.0) / 60.0
    );
    svg(&samples, &handoff_times, &title)
}

fn main() {
    // Draw again from a report, without running anything: FERRY_SOAK_PLOT=soak.json.
    if let Ok(path) = std::env::var("FERRY_SOAK_PLOT") {
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read the report"))
                .expect("a soak report");
        let out = Path::new(&path).with_extension("svg");
        std::fs::write(&out, plot(&report)).expect("write the SVG");
        eprintln!("soak: wrote {}", out.display());
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "skipped: the soak benchmark needs root (the local UVM uses namespaces); nothing ran"
        );
        println!("{}", json!({"skipped": "needs root"}));
        return;
    }
    let p = Params::from_env();
    std::fs::create_dir_all(&p.out).expect("create the output directory");
    let base = std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let state = PathBuf::from(format!("{base}/ferry-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let started_unix = unix_time();
    let load_start = loadavg();
    eprintln!(
        "soak: {} min, {} processes x {} B/s, a handoff every {} s, state {}",
        p.minutes,
        p.procs,
        p.rate,
        p.handoff_secs,
        state.display()
    );
    ferry(
        &state,
        &[
            "uvm",
            "start",
            "u",
            "--log-limit",
            &p.log_limit_mib.to_string(),
        ],
    );

    // Start the writers: one container per PER_CONTAINER processes.
    let mut writers = Vec::new();
    for i in 0..p.procs {
        let c = format!("c{}", i / PER_CONTAINER);
        let first = i % PER_CONTAINER == 0;
        let s = script(i, p.rate, first);
        let out = if first {
            ferry(
                &state,
                &["--json", "run", "u", "-d", "--id", &c, "--", "sh", "-c", &s],
            )
        } else {
            ferry(
                &state,
                &["--json", "exec", "u", &c, "-d", "--", "sh", "-c", &s],
            )
        };
        let v: Value = serde_json::from_str(&out).expect("run/exec --json");
        let pid = v["pid"].as_u64().expect("pid") as u32;
        writers.push(Writer {
            idx: i,
            container: c,
            pid,
        });
    }
    let t0 = Instant::now();
    let dur = p.minutes * 60.0;
    eprintln!("soak: {} writers started", writers.len());

    let total = Arc::new(AtomicU64::new(0));
    let abort = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for w in &writers {
        let stats = Arc::new(Mutex::new(ReadStats::default()));
        let child = Arc::new(Mutex::new(None));
        let (st, ch, tot, ab, sd, wr) = (
            stats.clone(),
            child.clone(),
            total.clone(),
            abort.clone(),
            state.clone(),
            w.clone(),
        );
        let h = std::thread::spawn(move || read_writer(sd, wr, st, tot, ch, ab));
        readers.push((stats, child, h));
    }

    // Sampler.
    let handoffs_done = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (state, samples, sampling, hd, total) = (
            state.clone(),
            samples.clone(),
            sampling.clone(),
            handoffs_done.clone(),
            total.clone(),
        );
        let every = Duration::from_secs_f64(p.sample_secs);
        std::thread::spawn(move || {
            let mut next = Instant::now();
            while sampling.load(Ordering::SeqCst) {
                // During a handoff there may be no host process: try again shortly.
                match sample(
                    &state,
                    t0,
                    hd.load(Ordering::SeqCst),
                    total.load(Ordering::Relaxed),
                ) {
                    Some(s) => {
                        samples.lock().unwrap().push(s);
                        next += every;
                    }
                    None => next = Instant::now() + Duration::from_millis(200),
                }
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
        })
    };

    // Handoffs until the end of the soak.
    let mut durations = Vec::new();
    let mut failures = Vec::new();
    let mut handoff_times = Vec::new();
    let mut k = 1;
    let mut last_report = Instant::now();
    loop {
        let at = p.handoff_secs * k as f64;
        if at >= dur {
            break;
        }
        let wait = at - t0.elapsed().as_secs_f64();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
        handoff_times.push(t0.elapsed().as_secs_f64());
        handoff(&state, &mut durations, &mut failures);
        handoffs_done.fetch_add(1, Ordering::SeqCst);
        k += 1;
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            eprintln!(
                "soak: {:.0} s, {} handoffs ({} failed), {:.1} MiB received, load {}",
                t0.elapsed().as_secs_f64(),
                durations.len() + failures.len(),
                failures.len(),
                total.load(Ordering::Relaxed) as f64 / 1048576.0,
                loadavg()
            );
        }
    }
    let wait = dur - t0.elapsed().as_secs_f64();
    if wait > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(wait));
    }
    sampling.store(false, Ordering::SeqCst);
    sampler.join().unwrap();
    let soak_secs = t0.elapsed().as_secs_f64();
    let load_end = loadavg();

    // Stop: tell the processes, hand the UVM over while they exit, then collect exit codes;
    // then the same for each container's first process.
    let mut exit_missing = Vec::new();
    let mut exit_wrong = Vec::new();
    let containers: Vec<String> = (0..p.procs.div_ceil(PER_CONTAINER))
        .map(|c| format!("c{c}"))
        .collect();
    for (flag, inits) in [("/tmp/stop", false), ("/tmp/stop0", true)] {
        for c in &containers {
            if let Err(e) = try_ferry(&state, &["exec", "u", c, "--", "touch", flag]) {
                eprintln!("soak: {e}");
            }
        }
        handoff_times.push(t0.elapsed().as_secs_f64());
        handoff(&state, &mut durations, &mut failures);
        for w in writers
            .iter()
            .filter(|w| (w.idx % PER_CONTAINER == 0) == inits)
        {
            // `ferry wait` exits with the process's code: read its JSON, not its status.
            let out = command(&state)
                .args([
                    "--json",
                    "wait",
                    "u",
                    &w.container,
                    "--pid",
                    &w.pid.to_string(),
                ])
                .output()
                .expect("run ferry wait");
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            match v["exit_code"].as_i64() {
                Some(code) if code == w.exit_code() => {}
                Some(code) => exit_wrong
                    .push(json!({"process": w.idx, "expected": w.exit_code(), "got": code})),
                None => {
                    eprintln!(
                        "soak: ferry wait {} --pid {}: {}",
                        w.container,
                        w.pid,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    exit_missing.push(w.idx);
                }
            }
        }
    }

    // Let the readers finish the streams (they end when each process's output has all been
    // sent); give up after a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    while readers.iter().any(|(_, _, h)| !h.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    abort.store(true, Ordering::SeqCst);
    let mut readers_unfinished = 0;
    for (_, child, h) in &readers {
        if !h.is_finished() {
            readers_unfinished += 1;
            if let Some(pid) = *child.lock().unwrap() {
                // SAFETY: a `ferry logs` process this benchmark started.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
    }
    let stats: Vec<ReadStats> = readers
        .into_iter()
        .map(|(s, _, h)| {
            let _ = h.join();
            s.lock().unwrap().clone()
        })
        .collect();
    let shim_log_errors = std::fs::read_to_string(state.join("uvms/u/shim.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ERROR"))
        .count();
    let _ = try_ferry(&state, &["uvm", "stop", "u"]);
    let _ = std::fs::remove_dir_all(&state);

    // Totals.
    let mut bytes_out = 0u64;
    let mut bytes_in = 0u64;
    let mut no_end = Vec::new();
    let mut rates = Vec::new();
    for (i, s) in stats.iter().enumerate() {
        bytes_in += s.received_bytes;
        match (s.end_seq, s.end_cs) {
            (Some(n), Some(cs)) => {
                let written: u64 = (1..=n).map(|k| line_len(i, k)).sum::<u64>()
                    + format!("END {i} {n} {cs}\n").len() as u64;
                bytes_out += written;
                if cs > 0 {
                    rates.push(written as f64 / (cs as f64 / 100.0));
                }
            }
            _ => no_end.push(i),
        }
    }
    let sum = |f: fn(&ReadStats) -> u64| stats.iter().map(f).sum::<u64>();
    let samples = samples.lock().unwrap().clone();
    durations.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| -> Option<f64> {
        (!durations.is_empty()).then(|| durations[((durations.len() - 1) as f64 * q) as usize])
    };
    let flat = json!({
        "method": "for each series: mean over the soak's last quarter of time against the mean \
                   over its second quarter (the first quarter is warm-up); flat if the last is \
                   at most the second plus max(10 %, an absolute tolerance: 2 MiB for RSS, 4 \
                   for fds). Also the least-squares slope over the second half, per 10 minutes.",
        "shim_rss_kb": flatness(&samples, soak_secs, |s| s.shim_rss_kb as f64, 2048.0),
        "shim_anon_kb": flatness(&samples, soak_secs, |s| s.shim_anon_kb as f64, 2048.0),
        "shim_fds": flatness(&samples, soak_secs, |s| s.shim_fds as f64, 4.0),
        "agent_rss_kb": flatness(&samples, soak_secs, |s| s.agent_rss_kb as f64, 2048.0),
        "agent_anon_kb": flatness(&samples, soak_secs, |s| s.agent_anon_kb as f64, 2048.0),
        "agent_fds": flatness(&samples, soak_secs, |s| s.agent_fds as f64, 4.0),
    });
    // The shim's VmRSS includes the pages of the log rings it has touched (shared, on tmpfs,
    // bounded by the log limit per stream): its private memory is RssAnon.
    let all_flat = ["shim_anon_kb", "shim_fds", "agent_rss_kb", "agent_fds"]
        .iter()
        .all(|k| flat[k]["flat"].as_bool() == Some(true));
    let lost = sum(|s| s.lost_bytes);
    let duplicated = sum(|s| s.duplicated_bytes);
    let missing = exit_missing.len() + exit_wrong.len() + no_end.len();
    let report = json!({
        "benchmark": "soak (issue 7)",
        "started_unix": started_unix,
        "machine": machine(),
        "load_average": {"start": load_start, "end_of_soak": load_end},
        "parameters": {
            "minutes": p.minutes,
            "processes": p.procs,
            "rate_bytes_per_s_per_process": p.rate,
            "handoff_every_s": p.handoff_secs,
            "sample_every_s": p.sample_secs,
            "log_limit_mib_per_stream": p.log_limit_mib,
            "processes_per_container": PER_CONTAINER,
            "line_bytes_nominal": LINE,
            "backend": "local (embedded default)",
            "reader": "ferry logs -f per process, a new session after each handoff",
        },
        "soak_seconds": soak_secs,
        "achieved_rate_bytes_per_s_per_process": {
            "mean": mean(&rates),
            "min": rates.iter().copied().fold(f64::INFINITY, f64::min),
            "max": rates.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            "how": "each process's bytes written over its own running time (from its END line)",
        },
        "totals": {
            "bytes_out": bytes_out,
            "bytes_in": bytes_in,
            "lost_bytes": lost,
            "lost_lines": sum(|s| s.lost_lines),
            "duplicated_bytes": duplicated,
            "duplicated_lines": sum(|s| s.duplicated_lines),
            "corrupt_lines": sum(|s| s.corrupt_lines),
            "reader_ring_gap_bytes": sum(|s| s.ring_gap_bytes),
            "processes_without_end_line": no_end,
            "exit_codes_missing": exit_missing,
            "exit_codes_wrong": exit_wrong,
            "exit_codes_missing_count": exit_missing.len() + exit_wrong.len(),
            "handoffs_ok": durations.len(),
            "handoffs_failed": failures.len(),
            "handoff_failures": failures,
            "handoff_ms": {"p50": pct(0.5), "p90": pct(0.9), "max": pct(1.0)},
            "logs_sessions": sum(|s| s.sessions),
            "logs_sessions_failed": sum(|s| s.failed_sessions),
            "logs_sessions_told_dropped_twice_before_first_byte": sum(|s| s.multi_notice_starts),
            "readers_unfinished": readers_unfinished,
            "shim_log_error_lines": shim_log_errors,
        },
        "flat": flat,
        "verdict": {
            "no_loss": lost == 0 && bytes_in == bytes_out,
            "no_duplicates": duplicated == 0,
            "no_exit_codes_missing": missing == 0,
            "rss_and_fds_flat": all_flat,
        },
        "irregularities": stats
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.events.is_empty())
            .map(|(i, s)| json!({"process": i, "events": s.events}))
            .collect::<Vec<_>>(),
        "samples": samples,
        "handoff_times_s": handoff_times,
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    std::fs::write(p.out.join("soak.json"), &text).expect("write soak.json");
    let title = format!(
        "ferry soak: {} processes x {} KiB/s, ferry uvm upgrade every {} s, {:.0} min",
        p.procs,
        p.rate / 1024,
        p.handoff_secs,
        soak_secs / 60.0
    );
    std::fs::write(
        p.out.join("soak.svg"),
        svg(&samples, &handoff_times, &title),
    )
    .expect("write soak.svg");
    eprintln!("soak: wrote {}/soak.json and soak.svg", p.out.display());
    println!("{text}");
}
