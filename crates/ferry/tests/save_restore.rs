//! Handing a running UVM to a new host process: nothing lost, nothing repeated.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn skip(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: {test} needs root (the local UVM uses namespaces)");
        return true;
    }
    if !std::path::Path::new("/usr/bin/busybox").exists()
        && !std::path::Path::new("/bin/busybox").exists()
    {
        eprintln!("skipped: {test} needs busybox-static (the built-in image)");
        return true;
    }
    false
}

struct Env {
    state: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Env {
        let state = PathBuf::from(format!("/tmp/fsr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let e = Env { state };
        let out = e.ferry(&["uvm", "start", "u"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        e
    }

    fn ferry(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .env("FERRY_STATE_DIR", &self.state)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ferry")
    }

    /// A ferry command left running, its output piped to the test.
    fn spawn(&self, args: &[&str], stdin: Stdio) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .env("FERRY_STATE_DIR", &self.state)
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ferry")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ferry(args);
        assert!(
            out.status.success(),
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.ferry(&["uvm", "stop", "u"]);
        if std::thread::panicking() {
            let text =
                std::fs::read_to_string(self.state.join("uvms/u/shim.log")).unwrap_or_default();
            for l in text
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("{l}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A counter printing 0..n-1 every 10 ms on stdout and every 20th value on stderr, then `end`.
fn counter(n: u32, end: &str) -> String {
    format!(
        "i=0; while [ $i -lt {n} ]; do echo $i; [ $((i % 20)) = 0 ] && echo e$i >&2; i=$((i+1)); sleep 0.01; done; {end}"
    )
}

fn assert_counter(text: &str, n: u32) {
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got, want, "stdout has a gap or a duplicate");
}

/// The parent pid of `pid`, from /proc (None once it is gone).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` descends from `ancestor`.
fn descends_from(mut pid: i32, ancestor: i32) -> bool {
    while pid > 1 {
        match parent_of(pid) {
            Some(p) if p == ancestor => return true,
            Some(p) => pid = p,
            None => return false,
        }
    }
    false
}

/// Waits until no process under the UVM's agent (`agent` pid) runs a command line containing
/// `needle`. Only the agent's descendants count: other tests run the same scripts, and a pid
/// of this machine's small pid space may belong to anything.
fn wait_gone(agent: i32, needle: &str) {
    let pids: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &i32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
                && descends_from(*pid, agent)
        })
        .collect();
    for pid in pids {
        wait_pid_gone(pid);
    }
}

/// Waits for a process that is not our child to end (pidfd + poll); says what it was doing
/// if it does not.
fn wait_pid_gone(pid: i32) {
    // SAFETY: pidfd_open and poll on a descriptor we own.
    let ended = unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if fd < 0 {
            return; // already gone
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let n = libc::poll(&mut p, 1, 30_000);
        libc::close(fd);
        n == 1
    };
    if !ended {
        let read =
            |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
        panic!(
            "process {pid} did not end within 30 s: cmdline {:?}, wchan {:?}\n{}",
            read("cmdline"),
            read("wchan"),
            read("status")
        );
    }
}

#[test]
fn upgrade_and_save_restore_lose_nothing() {
    if skip("save/restore test") {
        return;
    }
    let e = Env::new("up");
    // Writers that outlive both handoffs, and ones that end during the gaps: normally,
    // non-zero, and killed by a signal.
    e.ok(&[
        "run",
        "u",
        "-d",
        "--id",
        "long",
        "--",
        "sh",
        "-c",
        &counter(300, "exit 0"),
    ]);
    e.ok(&[
        "run",
        "u",
        "-d",
        "--id",
        "three",
        "--",
        "sh",
        "-c",
        &counter(40, "exit 3"),
    ]);
    e.ok(&[
        "run",
        "u",
        "-d",
        "--id",
        "killed",
        "--",
        "sh",
        "-c",
        &counter(40, "sleep 1000 & kill -9 $!; wait $!"),
    ]);
    e.ok(&[
        "run",
        "u",
        "-d",
        "--id",
        "tty",
        "--tty",
        "--",
        "sh",
        "-c",
        &counter(200, "exit 0"),
    ]);
    let shim_before = e.ok(&["--json", "uvm", "inspect", "u"]);
    // A follower that stays through both handoffs: it goes on with each new host process.
    let mut follower = e.spawn(&["logs", "-f", "u", "long"], Stdio::null());
    // Streaming before the first handoff (a request that reaches a host process already
    // handing over is refused).
    let mut followed = std::io::BufReader::new(follower.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut followed, &mut first).unwrap();

    // Handoff 1: upgrade (save + restore) in one step.
    e.ok(&["uvm", "upgrade", "u"]);
    let shim_after = e.ok(&["--json", "uvm", "inspect", "u"]);
    let pid = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["shim_pid"].clone();
    assert_ne!(
        pid(&shim_before),
        pid(&shim_after),
        "a new host process serves the UVM"
    );

    // Handoff 2: save, a gap with no host at all while the short ones end, restore.
    let snap = e.ok(&["uvm", "save", "u"]);
    assert_eq!(
        e.ferry(&["ps", "u"]).status.code(),
        Some(125),
        "nobody serves the UVM between save and restore"
    );
    // The short writers finish while no host is connected (their output is kept by the guest).
    let agent = serde_json::from_str::<serde_json::Value>(&shim_after).unwrap()["uvm"]["pid"]
        .as_i64()
        .expect("agent pid") as i32;
    for script in ["exit 3", "kill -9"] {
        wait_gone(agent, script);
    }
    e.ok(&["uvm", "restore", snap.trim()]);
    // Restoring the same snapshot again is refused with the reason.
    let again = e.ferry(&["uvm", "restore", snap.trim()]);
    assert_eq!(again.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Exit codes, including those of processes that ended while no host was connected.
    assert_eq!(e.ferry(&["wait", "u", "three"]).status.code(), Some(3));
    assert_eq!(e.ferry(&["wait", "u", "killed"]).status.code(), Some(137));
    assert_eq!(e.ferry(&["wait", "u", "long"]).status.code(), Some(0));
    assert_eq!(e.ferry(&["wait", "u", "tty"]).status.code(), Some(0));
    // Every line, once, in order, on the right stream.
    assert_counter(&e.ok(&["logs", "u", "long"]), 300);
    std::io::Read::read_to_string(&mut followed, &mut first).unwrap();
    let follower = follower.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&follower.stderr);
    assert!(follower.status.success(), "logs -f: {err}");
    assert_counter(&first, 300);
    let err_lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("ferry: ")).collect();
    let want: Vec<String> = (0..300).step_by(20).map(|i| format!("e{i}")).collect();
    assert_eq!(err_lines, want, "logs -f's stderr: {err}");
    assert_counter(&e.ok(&["logs", "u", "three"]), 40);
    assert_counter(&e.ok(&["logs", "u", "killed"]), 40);
    let err = String::from_utf8_lossy(&e.ferry(&["logs", "u", "three"]).stderr).into_owned();
    assert_eq!(err, "e0\ne20\n");
    // The terminal kept working: its output is all there (stdout and stderr share the
    // terminal, with its line endings).
    let tty = e.ok(&["logs", "u", "tty"]).replace("\r\n", "\n");
    let tty: String = tty
        .lines()
        .filter(|l| !l.starts_with('e'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_counter(&tty, 200);

    // New work after the restore gets fresh ports and ids: it runs and does not disturb the
    // adopted processes.
    let out = e.ferry(&["run", "u", "--", "sh", "-c", "echo after; exit 5"]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after\n");
}

#[test]
fn bad_snapshots_are_refused_with_the_cause() {
    if skip("snapshot validation test") {
        return;
    }
    let e = Env::new("bad");
    e.ok(&["run", "u", "-d", "--id", "x", "--", "sleep", "1000"]);
    let snap = e.ok(&["uvm", "save", "u"]);
    let snap = PathBuf::from(snap.trim());
    let good = std::fs::read(&snap).unwrap();
    let copy = e.state.join("copy");
    // Corrupt, truncated, not a snapshot: each refused, naming the problem.
    let mut bad = good.clone();
    let at = bad.len() - 5;
    bad[at] ^= 1;
    for (bytes, needle) in [
        (bad, "corrupt"),
        (good[..good.len() - 7].to_vec(), "truncated"),
        (b"hello\n".to_vec(), "not a ferry snapshot"),
    ] {
        std::fs::write(&copy, bytes).unwrap();
        let out = e.ferry(&["uvm", "restore", copy.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(125));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err}");
    }
    // A snapshot whose UVM is gone.
    let v: serde_json::Value = {
        let text = String::from_utf8_lossy(&good).into_owned();
        let body = text.split_once('\n').unwrap().1.to_string();
        serde_json::from_str(&body).unwrap()
    };
    let agent = v["uvm"]["agent_pid"].as_u64().unwrap() as i32;
    assert!(sigkill(agent), "the agent was running");
    let out = e.ferry(&["uvm", "restore", snap.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gone"), "{err}");
}

#[test]
fn a_shim_killed_with_sigkill_is_replaced_from_its_last_snapshot() {
    if skip("SIGKILL recovery test") {
        return;
    }
    let e = Env::new("kill");
    e.ok(&[
        "run",
        "u",
        "-d",
        "--id",
        "a",
        "--",
        "sh",
        "-c",
        &counter(200, "exit 4"),
    ]);
    e.ok(&[
        "run",
        "u",
        "-d",
        "--id",
        "b",
        "--",
        "sh",
        "-c",
        &counter(30, "exit 9"),
    ]);
    e.ok(&[
        "exec",
        "u",
        "a",
        "-d",
        "--",
        "sh",
        "-c",
        &counter(100, "exit 6"),
    ]);
    assert!(sigkill(shim_pid(&e)), "the shim was running");
    assert_eq!(
        e.ferry(&["ps", "u"]).status.code(),
        Some(125),
        "nobody serves the UVM after the kill"
    );

    let snap = e.state.join("uvms/u/snapshot");
    e.ok(&["uvm", "restore", snap.to_str().unwrap()]);
    assert_eq!(e.ferry(&["wait", "u", "a"]).status.code(), Some(4));
    assert_eq!(e.ferry(&["wait", "u", "b"]).status.code(), Some(9));
    assert_counter(&e.ok(&["logs", "u", "a"]), 200);
    assert_counter(&e.ok(&["logs", "u", "b"]), 30);
    // The exec'd process is accounted for too.
    let ps: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "ps", "u", "a"])).unwrap();
    let procs = ps["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 2, "{ps}");
    let exec = procs.iter().find(|p| p["init"] == false).unwrap();
    let pid = exec["pid"].to_string();
    assert_eq!(
        e.ferry(&["wait", "u", "a", "--pid", &pid]).status.code(),
        Some(6)
    );
    assert_counter(&e.ok(&["logs", "u", "a", "--pid", &pid]), 100);
}

fn fds_and_threads(pid: i32) -> (usize, usize) {
    let count = |d: String| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
    )
}

/// `ferry uvm inspect u`, parsed.
fn inspect(e: &Env) -> serde_json::Value {
    serde_json::from_str(&e.ok(&["--json", "uvm", "inspect", "u"])).unwrap()
}

/// The pid of the shim serving the UVM.
fn shim_pid(e: &Env) -> i32 {
    inspect(e)["shim_pid"].as_i64().unwrap() as i32
}

/// Sends SIGKILL to `pid` and waits until it is gone; false if there was no such process.
fn sigkill(pid: i32) -> bool {
    let sent =
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).is_ok();
    wait_pid_gone(pid);
    sent
}

/// The agent proper: PID 1 of the UVM's namespace, the child of the pid the shim reports.
fn agent_pid(e: &Env) -> i32 {
    let info = inspect(e);
    let outer = info["uvm"]["pid"].as_i64().unwrap();
    let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap();
    children.split_whitespace().next().unwrap().parse().unwrap()
}

fn snapshot_floors(e: &Env) -> (u64, u64) {
    let text = std::fs::read_to_string(e.state.join("uvms/u/snapshot")).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.split_once('\n').unwrap().1).unwrap();
    (
        v["connection"]["next_port"].as_u64().unwrap(),
        v["connection"]["next_id"].as_u64().unwrap(),
    )
}

#[test]
fn a_hundred_handoffs_with_twenty_writers_lose_nothing_and_leak_nothing() {
    if skip("handoff soak test") {
        return;
    }
    let e = Env::new("soak");
    let writer = |stop: &str| {
        format!("i=0; while [ ! -e /tmp/{stop} ]; do echo $i; i=$((i+1)); sleep 0.02; done")
    };
    for c in 0..10 {
        let id = format!("w{c}");
        e.ok(&[
            "run",
            "u",
            "-d",
            "--id",
            &id,
            "--",
            "sh",
            "-c",
            &writer("stop-init"),
        ]);
        e.ok(&[
            "exec",
            "u",
            &id,
            "-d",
            "--",
            "sh",
            "-c",
            &writer("stop-exec"),
        ]);
    }
    e.ok(&["uvm", "upgrade", "u"]);
    let agent = agent_pid(&e);
    let (guest_before, host_before, floors_before) = (
        fds_and_threads(agent),
        fds_and_threads(shim_pid(&e)),
        snapshot_floors(&e),
    );
    for _ in 0..100 {
        e.ok(&["uvm", "upgrade", "u"]);
    }
    let (guest_after, host_after, floors_after) = (
        fds_and_threads(agent),
        fds_and_threads(shim_pid(&e)),
        snapshot_floors(&e),
    );
    eprintln!(
        "guest fds/threads {guest_before:?} -> {guest_after:?}; shim {host_before:?} -> {host_after:?}; floors {floors_before:?} -> {floors_after:?}"
    );
    // Both samples are taken just after a handoff, while some of the 40 stdio streams may
    // still be re-dialling (each can hold an old and a new connection for a moment): allow one
    // extra fd per stream. An fd leaked per cycle would show as a hundred or more.
    assert!(guest_after.0 <= guest_before.0 + 40, "guest fd leak");
    assert!(guest_after.1 <= guest_before.1 + 2, "guest thread leak");
    // Each handoff starts a fresh shim: bound it by what 20 processes need (a listener, a
    // connection and a log file per stream, plus its own sockets and logs).
    assert!(host_after.0 <= 200, "host fd count {host_after:?}");
    assert!(host_after.1 <= host_before.1 + 2, "host thread leak");
    // Each restore skips a fixed gap of ports (PORT_GAP in shim/restore.rs: a killed host may
    // have used some after its last snapshot) and allocates none of its own.
    assert_eq!(
        floors_after.0,
        floors_before.0 + 100 * 4096,
        "handoffs allocated ports"
    );

    // Stop the writers (the exec'd ones first: a container's processes die with its init);
    // every line of every stream arrived once, in order.
    for stop in ["stop-exec", "stop-init"] {
        for c in 0..10 {
            let id = format!("w{c}");
            e.ok(&["exec", "u", &id, "--", "touch", &format!("/tmp/{stop}")]);
            if stop == "stop-exec" {
                let ps: serde_json::Value =
                    serde_json::from_str(&e.ok(&["--json", "ps", "u", &id])).unwrap();
                for p in ps["processes"].as_array().unwrap() {
                    if p["init"] == false && p["command"][0] == "sh" {
                        let pid = p["pid"].to_string();
                        assert_eq!(
                            e.ferry(&["wait", "u", &id, "--pid", &pid]).status.code(),
                            Some(0)
                        );
                    }
                }
            }
        }
    }
    for c in 0..10 {
        let id = format!("w{c}");
        assert_eq!(e.ferry(&["wait", "u", &id]).status.code(), Some(0));
        let ps: serde_json::Value =
            serde_json::from_str(&e.ok(&["--json", "ps", "u", &id])).unwrap();
        for p in ps["processes"].as_array().unwrap() {
            if p["command"][0] != "sh" {
                continue; // the `touch`es
            }
            let pid = p["pid"].to_string();
            let out = e.ok(&["logs", "u", &id, "--pid", &pid]);
            let n = out.lines().count() as u32;
            assert!(n > 50, "{id}/{pid}: only {n} lines");
            assert_counter(&out, n);
        }
    }
}

#[test]
fn a_snapshot_pointing_at_another_uvms_agent_is_refused() {
    if skip("wrong-UVM snapshot test") {
        return;
    }
    let a = Env::new("wrong-a");
    let b = Env::new("wrong-b");
    let snap = PathBuf::from(a.ok(&["uvm", "save", "u"]).trim());
    let b_agent = inspect(&b)["uvm"]["pid"].as_u64().unwrap();
    // A's snapshot, re-signed, but naming B's agent.
    let text = std::fs::read_to_string(&snap).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(text.split_once('\n').unwrap().1).unwrap();
    v["uvm"]["agent_pid"] = b_agent.into();
    let body = serde_json::to_vec_pretty(&v).unwrap();
    let mut forged = format!(
        "FERRY-SNAPSHOT 1 {} {:08x}\n",
        body.len(),
        crc32fast::hash(&body)
    )
    .into_bytes();
    forged.extend_from_slice(&body);
    let forged_path = a.state.join("forged");
    std::fs::write(&forged_path, forged).unwrap();
    let out = a.ferry(&["uvm", "restore", forged_path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another UVM"), "{err}");
    // Nothing changed: B is still served, and A's own snapshot still restores.
    b.ok(&["ps", "u"]);
    a.ok(&["uvm", "restore", snap.to_str().unwrap()]);
    a.ok(&["ps", "u"]);
}

#[test]
fn a_process_the_last_snapshot_missed_is_taken_over() {
    if skip("unrecorded process test") {
        return;
    }
    let e = Env::new("unrec");
    e.ok(&[
        "run",
        "u",
        "-d",
        "--id",
        "a",
        "--",
        "sh",
        "-c",
        &counter(300, "exit 0"),
    ]);
    // What a host killed in the middle of an exec leaves behind: a snapshot from before the
    // exec, and a process running in the guest that it never recorded.
    let before = e.state.join("before.snapshot");
    std::fs::copy(e.state.join("uvms/u/snapshot"), &before).unwrap();
    e.ok(&[
        "exec",
        "u",
        "a",
        "-d",
        "--",
        "sh",
        "-c",
        &counter(60, "exit 7"),
    ]);
    assert!(sigkill(shim_pid(&e)), "the shim was running");

    e.ok(&["uvm", "restore", before.to_str().unwrap()]);
    // The unrecorded process is known again: listed, its exit code and all its output.
    let ps: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "ps", "u", "a"])).unwrap();
    let procs = ps["processes"].as_array().unwrap();
    assert_eq!(
        procs.len(),
        2,
        "the exec'd process was not taken over: {ps}"
    );
    let exec = procs.iter().find(|p| p["init"] == false).unwrap();
    assert_eq!(exec["command"][0], "sh", "{exec}");
    let pid = exec["pid"].to_string();
    assert_eq!(
        e.ferry(&["wait", "u", "a", "--pid", &pid]).status.code(),
        Some(7)
    );
    assert_counter(&e.ok(&["logs", "u", "a", "--pid", &pid]), 60);
    // A new process gets ports the killed host could not have handed out.
    let out = e.ferry(&["exec", "u", "a", "--", "sh", "-c", &counter(20, "exit 0")]);
    assert_eq!(out.status.code(), Some(0));
    assert_counter(&String::from_utf8_lossy(&out.stdout), 20);
    assert_eq!(e.ferry(&["wait", "u", "a"]).status.code(), Some(0));
    assert_counter(&e.ok(&["logs", "u", "a"]), 300);
}

/// The pid of the shim whose command line names `needle` (e.g. this test's snapshot path),
/// polled for up to 10 s.
fn find_shim(needle: &str) -> Option<i32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("\0shim\0") && cmd.contains(needle) {
                return Some(pid);
            }
        }
        std::thread::yield_now();
    }
    None
}

#[test]
fn sigkill_during_save_or_restore_loses_nothing() {
    if skip("SIGKILL during save/restore test") {
        return;
    }
    let e = Env::new("killsr");
    e.ok(&[
        "run",
        "u",
        "-d",
        "--id",
        "a",
        "--",
        "sh",
        "-c",
        &counter(400, "exit 5"),
    ]);
    e.ok(&[
        "run",
        "u",
        "-d",
        "--id",
        "b",
        "--",
        "sh",
        "-c",
        &counter(60, "exit 3"),
    ]);
    e.ok(&[
        "exec",
        "u",
        "a",
        "-d",
        "--",
        "sh",
        "-c",
        &counter(150, "exit 6"),
    ]);
    let snapshot = e.state.join("uvms/u/snapshot");
    // Kill points spread over each operation (a different one every round).
    for round in 0..6u64 {
        let delay = std::time::Duration::from_millis(round * 7 % 25);
        if round % 2 == 0 {
            // During a save: the snapshot on disk is the last complete one, old or new.
            let shim = shim_pid(&e);
            let mut save = Command::new(env!("CARGO_BIN_EXE_ferry"))
                .env("FERRY_STATE_DIR", &e.state)
                .args(["uvm", "save", "u"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(delay);
            // It may have finished the save and exited already.
            sigkill(shim);
            let _ = save.wait();
        } else {
            // During a restore: the new shim dies part-way; the next restore starts over.
            let saved = e.ok(&["uvm", "save", "u"]);
            let copy = e.state.join(format!("round-{round}.snapshot"));
            std::fs::copy(saved.trim(), &copy).unwrap();
            let mut restore = Command::new(env!("CARGO_BIN_EXE_ferry"))
                .env("FERRY_STATE_DIR", &e.state)
                .args(["uvm", "restore", copy.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let shim = find_shim(copy.to_str().unwrap()).expect("the restoring shim started");
            std::thread::sleep(delay);
            // A restoring shim goes on serving once done: it is always there to kill.
            assert!(sigkill(shim), "the restoring shim was running");
            let _ = restore.wait();
        }
        // Nobody serves the UVM now; the last snapshot brings it back.
        e.ok(&["uvm", "restore", snapshot.to_str().unwrap()]);
    }
    // Every process accounted for: exit codes and every line, once, in order.
    assert_eq!(e.ferry(&["wait", "u", "b"]).status.code(), Some(3));
    assert_counter(&e.ok(&["logs", "u", "b"]), 60);
    let ps: serde_json::Value = serde_json::from_str(&e.ok(&["--json", "ps", "u", "a"])).unwrap();
    let procs = ps["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 2, "{ps}");
    let exec = procs.iter().find(|p| p["init"] == false).unwrap();
    let pid = exec["pid"].to_string();
    assert_eq!(
        e.ferry(&["wait", "u", "a", "--pid", &pid]).status.code(),
        Some(6)
    );
    assert_counter(&e.ok(&["logs", "u", "a", "--pid", &pid]), 150);
    assert_eq!(e.ferry(&["wait", "u", "a"]).status.code(), Some(5));
    assert_counter(&e.ok(&["logs", "u", "a"]), 400);
}

#[test]
fn stdin_sent_before_a_handoff_and_after_it_both_arrive() {
    if skip("stdin across a handoff test") {
        return;
    }
    use std::io::{BufRead, Write};
    let e = Env::new("stdin");
    let script = "read a; echo got $a; read b; echo got $b; exit 2";
    e.ok(&[
        "run", "u", "-d", "-i", "--id", "r", "--", "sh", "-c", script,
    ]);
    let attach = || e.spawn(&["attach", "u", "r"], Stdio::piped());
    // One line in, its echo out; then the client vanishes without closing the input.
    let mut first = attach();
    first.stdin.as_mut().unwrap().write_all(b"one\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(first.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "got one\n");
    first.kill().unwrap();
    first.wait().unwrap();

    e.ok(&["uvm", "upgrade", "u"]);

    // The input stream goes on where it was: the second line reaches the same `read`.
    let mut second = attach();
    second.stdin.as_mut().unwrap().write_all(b"two\n").unwrap();
    drop(second.stdin.take());
    let pid = second.id() as i32;
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(30));
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    });
    let out = second.wait_with_output().unwrap();
    drop(watchdog);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got two\n");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(e.ok(&["logs", "u", "r"]), "got one\ngot two\n");
}

/// A foreground `ferry run` (output streamed, input forwarded) outlives an upgrade of its
/// UVM's host process: it goes on with the new one, every line once, and ends with the
/// process's exit code.
#[test]
fn a_foreground_run_goes_on_across_an_upgrade() {
    if skip("foreground run across a handoff test") {
        return;
    }
    use std::io::{BufRead, Read, Write};
    let e = Env::new("fg");
    let script = format!(
        "read a; echo got $a; {}; read b; echo got $b; exit 4",
        counter(100, "true")
    );
    let mut run = e.spawn(
        &["run", "u", "--id", "fg", "--", "sh", "-c", &script],
        Stdio::piped(),
    );
    run.stdin.as_mut().unwrap().write_all(b"one\n").unwrap();
    let mut stdout = std::io::BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "got one\n");

    e.ok(&["uvm", "upgrade", "u"]);

    run.stdin.as_mut().unwrap().write_all(b"two\n").unwrap();
    drop(run.stdin.take());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = run.wait().unwrap();
    let mut err = String::new();
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(4), "ferry run: {err}");
    let counted = rest
        .strip_suffix("got two\n")
        .unwrap_or_else(|| panic!("{rest}"));
    assert_counter(counted, 100);
    let want: Vec<String> = (0..100).step_by(20).map(|i| format!("e{i}")).collect();
    let err_lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("ferry: ")).collect();
    assert_eq!(err_lines, want, "run's stderr: {err}");
}

/// A foreground `ferry run` whose process ends while no host process serves the UVM (between
/// a save and its restore) waits for the new one, then gets the rest of the output and the
/// exit code.
#[test]
fn a_foreground_run_whose_process_ends_between_hosts_gets_the_rest_and_the_code() {
    if skip("foreground run across a save gap test") {
        return;
    }
    use std::io::{BufRead, Read, Write};
    let e = Env::new("fgap");
    let agent = agent_pid(&e);
    let script = format!(
        "read a; echo got $a; sleep 0.5; echo gap-run >/dev/null; {}",
        counter(50, "exit 6")
    );
    let mut run = e.spawn(
        &["run", "u", "--id", "gap", "--", "sh", "-c", &script],
        Stdio::piped(),
    );
    run.stdin.as_mut().unwrap().write_all(b"one\n").unwrap();
    drop(run.stdin.take());
    let mut stdout = std::io::BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "got one\n");

    let snap = e.ok(&["uvm", "save", "u"]);
    wait_gone(agent, "gap-run");
    e.ok(&["uvm", "restore", snap.trim()]);

    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = run.wait().unwrap();
    let mut err = String::new();
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(6), "ferry run: {err}");
    assert_counter(&rest, 50);
}
