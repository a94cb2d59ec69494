//! The real host (a shim started by `ferry uvm start`) against a guest agent that misbehaves on
//! purpose (`support/hostile_agent.rs`), next to a normal UVM under the same state directory.
//!
//! Every hostile UVM either keeps being served or is given up cleanly (its shim logs why and
//! exits, its agent is ended); none makes its shim panic or grow without bound, and the normal
//! UVM runs `echo hi` throughout, from a loop in the background and at each misbehaviour's
//! worst moment. The hostile shims' peak RSS (VmHWM) is printed and bounded.
//!
//! No test harness: the binary is also the hostile agent (the shim runs it through
//! `FERRY_GCS_PROGRAM` with `FERRY_HOSTILE_AGENT` set), and what it measures is printed
//! whether or not the test passes.

#[path = "support/hostile_agent.rs"]
mod hostile_agent;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

const TEST: &str = "host_survives_a_hostile_guest";
/// What a shim may reach, at its peak, whatever its guest does.
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// Bound on any one `ferry` command (they take well under a second when things work).
const COMMAND_PATIENCE: Duration = Duration::from_secs(30);
/// Bound on a hostile agent's next report.
const EVENT_PATIENCE: Duration = Duration::from_secs(30);
/// How long a shim or agent that should be gone may take to go (a stop's grace is 5 s).
const EXIT_PATIENCE: Duration = Duration::from_secs(15);

fn main() {
    if std::env::var_os(hostile_agent::ROLE_ENV).is_some() {
        hostile_agent::main();
    }
    // The few libtest arguments that matter here: --list, --ignored, name filters.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{TEST}: test");
        return;
    }
    let mut filters = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--test-threads" | "--skip" | "--color" | "--format" | "--logfile" | "-Z"
            | "--shuffle-seed" => {
                it.next();
            }
            a if a.starts_with('-') => {}
            a => filters.push(a.to_string()),
        }
    }
    let exact = args.iter().any(|a| a == "--exact");
    let selected = filters.is_empty()
        || filters.iter().any(|f| {
            if exact {
                f == TEST
            } else {
                TEST.contains(f.as_str())
            }
        });
    if !selected || args.iter().any(|a| a == "--ignored") {
        println!("running 0 tests ({TEST} filtered out)");
        return;
    }
    println!("\nrunning 1 test");
    let started = Instant::now();
    host_survives_a_hostile_guest();
    println!(
        "test {TEST} ... ok ({:.1} s)\n",
        started.elapsed().as_secs_f64()
    );
}

fn skip() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: {TEST} needs root (the normal UVM uses namespaces)");
        return true;
    }
    if !Path::new("/usr/bin/busybox").exists() && !Path::new("/bin/busybox").exists() {
        eprintln!("skipped: {TEST} needs busybox-static (the built-in image)");
        return true;
    }
    false
}

// -- processes we started, by pidfd (immune to pid reuse) -------------------------------------

struct Pid {
    pid: u32,
    /// None when the process was gone already when we looked.
    fd: Option<OwnedFd>,
}

impl Pid {
    /// A handle on process `pid`, taken now.
    fn open(pid: u32) -> Pid {
        // SAFETY: pidfd_open takes a pid and flags; returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        Pid {
            pid,
            // SAFETY: a fresh descriptor that nothing else owns.
            fd: (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        }
    }

    /// Waits up to `timeout` for the process to exit; true if it has.
    fn gone_within(&self, timeout: Duration) -> bool {
        let Some(fd) = &self.fd else { return true };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
        n > 0
    }

    fn alive(&self) -> bool {
        !self.gone_within(Duration::ZERO)
    }

    fn kill(&self) {
        let Some(fd) = &self.fd else { return };
        // SAFETY: pidfd_send_signal with our descriptor, SIGKILL, no info, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Its open file descriptors.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or_default()
    }

    /// Peak resident set size so far, in KiB.
    fn vm_hwm_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// -- the lab: one state directory, the agents' event socket, cleanup --------------------------

struct Lab {
    state: PathBuf,
    events: mpsc::Receiver<String>,
    /// Events read but not yet asked for.
    seen: Vec<String>,
    /// Every shim and agent started, ended on drop if still there.
    started: Vec<Arc<Pid>>,
}

impl Lab {
    fn new() -> Lab {
        let state = PathBuf::from(format!("/tmp/fh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).expect("state directory");
        let listener = UnixListener::bind(state.join("events.sock")).expect("event socket");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { return };
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Lab {
            state,
            events,
            seen: Vec::new(),
            started: Vec::new(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.env("FERRY_STATE_DIR", &self.state)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn ferry(&self, args: &[&str]) -> Output {
        bounded(self.cmd(args), COMMAND_PATIENCE, &args.join(" "))
    }

    fn uvm_dir(&self, uvm: &str) -> PathBuf {
        self.state.join("uvms").join(uvm)
    }

    /// Starts a UVM (a hostile one with `negotiation`); returns its shim, or the error.
    fn start(&mut self, uvm: &str, negotiation: Option<&str>) -> Result<Arc<Pid>, String> {
        let mut c = self.cmd(&["uvm", "start", uvm, "--json"]);
        if let Some(n) = negotiation {
            let me = std::env::current_exe().expect("the test's own path");
            c.env("FERRY_GCS_PROGRAM", me)
                .env(hostile_agent::ROLE_ENV, "1")
                .env(hostile_agent::NEGOTIATION_ENV, n)
                .env(hostile_agent::EVENTS_ENV, self.state.join("events.sock"));
        }
        let out = bounded(c, COMMAND_PATIENCE, &format!("uvm start {uvm}"));
        if !out.status.success() {
            return Err(stderr(&out));
        }
        let info: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("uvm start --json");
        let pid = info["shim_pid"].as_u64().expect("shim_pid") as u32;
        let shim = Arc::new(Pid::open(pid));
        self.started.push(shim.clone());
        Ok(shim)
    }

    /// Waits for the hostile agent of `uvm` to report `what`; returns the rest of its line.
    fn event(&mut self, uvm: &str, what: &str) -> String {
        let prefix = format!("{uvm} {what}");
        let deadline = Instant::now() + EVENT_PATIENCE;
        loop {
            if let Some(i) = self.seen.iter().position(|e| e.starts_with(&prefix)) {
                let line = self.seen.remove(i);
                return line[prefix.len()..].trim().to_string();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "the hostile agent of {uvm} did not report {what:?} within {EVENT_PATIENCE:?} (reported: {:?}){}",
                    self.seen,
                    self.logs(uvm)
                ),
            }
        }
    }

    /// The hostile agent of `uvm`, from its first report.
    fn agent(&mut self, uvm: &str) -> Arc<Pid> {
        let pid: u32 = self.event(uvm, "pid").parse().expect("a pid");
        let agent = Arc::new(Pid::open(pid));
        self.started.push(agent.clone());
        agent
    }

    fn shim_log(&self, uvm: &str) -> String {
        std::fs::read_to_string(self.uvm_dir(uvm).join("shim.log")).unwrap_or_default()
    }

    /// The last lines of a UVM's logs, for a failure message.
    fn logs(&self, uvm: &str) -> String {
        let mut out = String::new();
        for log in ["shim.log", "gcs.stderr", "gcs.log"] {
            let text = std::fs::read_to_string(self.uvm_dir(uvm).join(log)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("\n--- {uvm}/{log} ---"));
            for l in tail.into_iter().rev() {
                out.push_str("\n  ");
                out.push_str(l);
            }
        }
        out
    }

    /// The normal UVM answers, now.
    fn normal_serves(&self, during: &str) {
        let out = self.ferry(&["run", "normal", "--", "echo", "hi"]);
        assert!(
            out.status.success() && out.stdout == b"hi\n",
            "the normal UVM failed {during}: {:?} {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out),
            self.logs("normal")
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = bounded_quiet(self.cmd(&["uvm", "stop", "normal"]), COMMAND_PATIENCE);
        for p in &self.started {
            if p.alive() {
                p.kill();
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command we started, ending it if it takes longer than `timeout`.
fn bounded_quiet(mut c: Command, timeout: Duration) -> Option<Output> {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferry");
    let pid = Pid::open(child.id());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Some(out.expect("wait for ferry")),
        Err(_) => {
            pid.kill();
            None
        }
    }
}

fn bounded(c: Command, timeout: Duration, what: &str) -> Output {
    bounded_quiet(c, timeout)
        .unwrap_or_else(|| panic!("`ferry {what}` did not finish within {timeout:?}"))
}

/// How long one background run took, and how it went.
type RunResult = (Duration, Result<(), String>);

/// `ferry run normal -- echo hi` and `ferry rm` of its container, over and over, until told
/// to stop.
struct Background {
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
    results: Arc<Mutex<Vec<RunResult>>>,
}

impl Background {
    fn start(state: &Path) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        let (state, flag, log) = (state.to_path_buf(), stop.clone(), results.clone());
        std::thread::spawn(move || {
            let ferry = |args: &[&str]| {
                let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
                c.env("FERRY_STATE_DIR", &state)
                    .args(args)
                    .stdin(Stdio::null());
                bounded_quiet(c, COMMAND_PATIENCE)
            };
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                let id = format!("bg-{n}");
                let t = Instant::now();
                let r = match ferry(&["run", "normal", "--id", &id, "--", "echo", "hi"]) {
                    Some(o) if o.status.success() && o.stdout == b"hi\n" => {
                        match ferry(&["rm", "normal", &id]) {
                            Some(o) if o.status.success() => Ok(()),
                            Some(o) => Err(format!("rm: {}", stderr(&o))),
                            None => Err(format!("rm: no answer within {COMMAND_PATIENCE:?}")),
                        }
                    }
                    Some(o) => Err(format!(
                        "{:?} {:?} {}",
                        o.status,
                        String::from_utf8_lossy(&o.stdout),
                        stderr(&o)
                    )),
                    None => Err(format!("no answer within {COMMAND_PATIENCE:?}")),
                };
                log.lock().unwrap().push((t.elapsed(), r));
            }
            let _ = tx.send(());
        });
        Background {
            stop,
            done,
            results,
        }
    }

    /// Stops the loop; returns (runs, slowest), failing on any failed run.
    fn finish(self) -> (usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.done
            .recv_timeout(COMMAND_PATIENCE + Duration::from_secs(5))
            .expect("the background loop on the normal UVM did not end");
        let results = self.results.lock().unwrap();
        for (i, (_, r)) in results.iter().enumerate() {
            if let Err(e) = r {
                panic!(
                    "run {i} of `ferry run normal -- echo hi` (and rm) in the background failed: {e}"
                );
            }
        }
        let slowest = results.iter().map(|r| r.0).max().unwrap_or_default();
        (results.len(), slowest)
    }
}

/// A `ferry` command started now and collected later.
struct Pending {
    child: Child,
    pid: Pid,
}

impl Pending {
    fn spawn(mut c: Command) -> Pending {
        let child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ferry");
        let pid = Pid::open(child.id());
        Pending { child, pid }
    }

    /// Its output, once it has ended (within `timeout`).
    fn finish(self, timeout: Duration, what: &str) -> Output {
        if !self.pid.gone_within(timeout) {
            self.pid.kill();
            panic!("`ferry {what}` did not end within {timeout:?}");
        }
        self.child.wait_with_output().expect("collect ferry")
    }
}

// -- the test ----------------------------------------------------------------------------------

fn host_survives_a_hostile_guest() {
    if skip() {
        return;
    }
    let mut lab = Lab::new();
    let normal = lab.start("normal", None).expect("the normal UVM starts");
    lab.normal_serves("before anything");
    let normal_fds = normal.fds();
    let background = Background::start(&lab.state);
    let mut peaks: Vec<(String, u64)> = Vec::new();

    // 1. A negotiation that lies: the start fails with the reason, and the agent (which, like
    //    the real one, would dial again for ever) is not left behind.
    for (lie, reason) in [
        ("version-5", "protocol version 5"),
        ("garbage", "NegotiateProtocol"),
    ] {
        let uvm = format!("liar-{lie}");
        let err = match lab.start(&uvm, Some(lie)) {
            Ok(_) => panic!("{uvm} started although its agent lied in the negotiation"),
            Err(e) => e,
        };
        assert!(
            err.contains(reason),
            "{uvm}: the failed start does not say why ({reason:?}): {err}"
        );
        let agent = lab.agent(&uvm);
        assert!(
            agent.gone_within(EXIT_PATIENCE),
            "{uvm}: the lying agent (pid {}) outlived the failed start{}",
            agent.pid,
            lab.logs(&uvm)
        );
        lab.normal_serves(&format!("after {uvm}"));
        println!(
            "negotiation {lie:>9}: start refused ({}), agent ended",
            err.trim()
        );
    }

    // 2. Misbehaviours the host survives, one after another on one UVM.
    let uvm = "survivor";
    let shim = lab
        .start(uvm, Some("honest"))
        .unwrap_or_else(|e| panic!("{uvm} does not start: {e}"));
    let agent = lab.agent(uvm);
    lab.event(uvm, "negotiated");
    let run = |lab: &Lab, id: &str| {
        let out = lab.ferry(&["run", "-d", "--id", id, uvm, "--", "true"]);
        assert!(
            out.status.success(),
            "{uvm}: `ferry run --id {id}` failed: {}{}",
            stderr(&out),
            lab.logs(uvm)
        );
    };
    let flood_started = Instant::now();
    let flood = Pending::spawn(lab.cmd(&["run", "-d", "--id", "flood", uvm, "--", "true"]));
    lab.event(uvm, "flood-sent");
    lab.normal_serves("while a guest floods its host");
    let out = flood.finish(COMMAND_PATIENCE, "run --id flood");
    assert!(
        out.status.success(),
        "{uvm}: the flooded `ferry run` failed: {}{}",
        stderr(&out),
        lab.logs(uvm)
    );
    let flood_time = flood_started.elapsed();
    let after_flood = shim.vm_hwm_kib().expect("the survivor's shim is running");
    println!(
        "flood:     {} notifications ({} of ~60 KiB) for the container being created, {} for unknown ones, read in {:.1} s; shim peak RSS {}",
        hostile_agent::FAT_NOTIFICATIONS + hostile_agent::KNOWN_NOTIFICATIONS,
        hostile_agent::FAT_NOTIFICATIONS,
        hostile_agent::UNKNOWN_NOTIFICATIONS,
        flood_time.as_secs_f64(),
        mib(after_flood)
    );

    run(&lab, "strays");
    lab.event(uvm, "strays-sent");
    println!(
        "strays:    {} responses to ids never asked, 1000 undecodable ones, a wrong-type answer to a pending call, {} requests from the guest: dropped",
        hostile_agent::STRAY_RESPONSES,
        hostile_agent::GUEST_REQUESTS
    );

    run(&lab, "ports");
    let ports = lab.event(uvm, "ports");
    assert!(
        ports.ends_with("connected=0"),
        "{uvm}: a port the host never gave out took a connection: {ports}"
    );
    println!("ports:     dials to stdio ports never given out: {ports}");

    let out = lab.ferry(&["run", "-d", "--id", "wrongports", uvm, "--", "true"]);
    let wrong = lab.event(uvm, "wrongports");
    assert!(
        wrong.ends_with("connected=0"),
        "{uvm}: a port the host never gave out took a connection: {wrong}"
    );
    assert!(
        !out.status.success() && stderr(&out).contains("did not connect stdio port"),
        "{uvm}: a process whose stdio ports were never dialled is not refused clearly: {:?} {}",
        out.status,
        stderr(&out)
    );
    println!(
        "wrong ports: its ExecuteProcess answered but other ports dialled ({wrong}): refused with {:?}",
        stderr(&out).trim()
    );

    run(&lab, "redial");
    let redial = lab.event(uvm, "redial");
    println!(
        "redial:    {} more dials of the bridge: {redial}",
        hostile_agent::BRIDGE_DIALS
    );
    lab.normal_serves("after the bridge was dialled thousands of times");

    // Still served: a process runs and its output comes back.
    let out = lab.ferry(&["run", "--id", "still", uvm, "--", "true"]);
    assert!(
        out.status.success() && out.stdout == b"hostile\n",
        "{uvm}: no longer served after its misbehaviours: {:?} {:?} {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out),
        lab.logs(uvm)
    );
    let log = lab.shim_log(uvm);
    assert!(
        log.lines().count() < 2_000,
        "{uvm}: the shim logged {} lines for the flood (a line per dropped frame?)",
        log.lines().count()
    );
    let peak = shim.vm_hwm_kib().expect("the survivor's shim is running");
    peaks.push((format!("{uvm} (flood, strays, ports, redial)"), peak));
    let stop = lab.ferry(&["uvm", "stop", uvm]);
    assert!(stop.status.success(), "{uvm}: stop: {}", stderr(&stop));
    assert!(agent.gone_within(EXIT_PATIENCE), "{uvm}: agent left behind");
    assert!(shim.gone_within(EXIT_PATIENCE), "{uvm}: shim left behind");

    // 3. Frames no reader can go past: the connection is given up at once, with the reason,
    //    and the shim stops the UVM and exits.
    for (what, reason) in [
        ("oversize", "exceeds the limit"),
        ("undersize", "smaller than the 16-byte header"),
    ] {
        let uvm = format!("bad-{what}");
        let shim = lab
            .start(&uvm, Some("honest"))
            .unwrap_or_else(|e| panic!("{uvm} does not start: {e}"));
        let agent = lab.agent(&uvm);
        let before = shim.vm_hwm_kib().unwrap_or_default();
        let out = lab.ferry(&["run", "-d", "--id", what, &uvm, "--", "true"]);
        lab.event(&uvm, &format!("{what}-sent"));
        assert!(
            !out.status.success() && stderr(&out).contains(reason),
            "{uvm}: the run does not fail with {reason:?}: {:?} {}{}",
            out.status,
            stderr(&out),
            lab.logs(&uvm)
        );
        assert!(
            shim.gone_within(EXIT_PATIENCE),
            "{uvm}: the shim goes on with a broken bridge{}",
            lab.logs(&uvm)
        );
        assert!(agent.gone_within(EXIT_PATIENCE), "{uvm}: agent left behind");
        let log = lab.shim_log(&uvm);
        assert!(
            log.contains("lost the guest connection") && log.contains(reason),
            "{uvm}: the shim's log does not say why it stopped{}",
            lab.logs(&uvm)
        );
        assert!(!log.contains("panicked"), "{uvm}: the shim panicked");
        peaks.push((format!("{uvm} (before its frame)"), before));
        lab.normal_serves(&format!("after {uvm}"));
        println!(
            "{what:>9}: run refused with {:?}; shim stopped the UVM and exited",
            stderr(&out).trim()
        );
    }

    // 4. Half a frame, then silence: calls wait (the guest may be slow), but the shim still
    //    serves its control socket, and stopping the UVM ends it within the grace period.
    let uvm = "half";
    let shim = lab
        .start(uvm, Some("honest"))
        .unwrap_or_else(|e| panic!("{uvm} does not start: {e}"));
    let agent = lab.agent(uvm);
    let hung = Pending::spawn(lab.cmd(&["run", "-d", "--id", "halfframe", uvm, "--", "true"]));
    lab.event(uvm, "halfframe-sent");
    lab.normal_serves("while a guest sits on half a frame");
    let inspect = lab.ferry(&["uvm", "inspect", uvm]);
    assert!(
        inspect.status.success(),
        "{uvm}: the shim does not answer while its guest is silent: {}",
        stderr(&inspect)
    );
    assert!(hung.pid.alive(), "{uvm}: the run ended without an answer");
    peaks.push((
        format!("{uvm} (silent guest)"),
        shim.vm_hwm_kib().unwrap_or_default(),
    ));
    let t = Instant::now();
    let stop = lab.ferry(&["uvm", "stop", uvm]);
    assert!(
        stop.status.success(),
        "{uvm}: stopping a silent UVM failed: {}{}",
        stderr(&stop),
        lab.logs(uvm)
    );
    let stop_time = t.elapsed();
    let out = hung.finish(EXIT_PATIENCE, "run --id halfframe");
    assert!(
        !out.status.success(),
        "{uvm}: the run on a silent guest succeeded"
    );
    assert!(agent.gone_within(EXIT_PATIENCE), "{uvm}: agent left behind");
    assert!(shim.gone_within(EXIT_PATIENCE), "{uvm}: shim left behind");
    println!(
        "half frame: the shim kept serving; `uvm stop` took {:.1} s; the waiting run got {:?}",
        stop_time.as_secs_f64(),
        stderr(&out).trim()
    );

    // Throughout, the normal UVM served.
    let (runs, slowest) = background.finish();
    lab.normal_serves("at the end");
    assert!(runs >= 3, "only {runs} background runs on the normal UVM");
    // Nothing kept per process once its container is removed (a stdin port used to stay
    // listened on, with its buffer, for every process ever run).
    let fds = normal.fds();
    assert!(
        fds < normal_fds + 20,
        "the normal shim holds {fds} descriptors after {runs} runs and removals ({normal_fds} before)"
    );
    peaks.push((
        format!("normal ({runs} containers run and removed)"),
        normal.vm_hwm_kib().unwrap_or_default(),
    ));
    println!(
        "normal UVM: {runs} runs of `echo hi` (each then removed) in the background, all fine, slowest {:.2} s",
        slowest.as_secs_f64()
    );
    println!("peak RSS (VmHWM) of the shims:");
    for (what, kib) in &peaks {
        println!("  {:<40} {}", what, mib(*kib));
    }
    for (what, kib) in &peaks {
        assert!(
            *kib > 0 && *kib < RSS_BOUND_KIB,
            "{what}: peak RSS {} (bound {})",
            mib(*kib),
            mib(RSS_BOUND_KIB)
        );
    }
}
