//! The ferry command line on the QEMU backend: a real VM (TCG here) booted from the image
//! `ferry image build` makes, containers inside it, and its host process replaced while they
//! run.
//!
//! Needs qemu-system-x86_64, apt (the kernel package is downloaded once) and busybox-static;
//! says "skipped" loudly without them.

#[path = "support/guest_image.rs"]
mod guest_image;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn skip(test: &str) -> bool {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for tool in ["qemu-system-x86_64", "apt-get"] {
        if !have(tool) {
            eprintln!("skipped: {test} needs {tool} (apt-get install qemu-system-x86)");
            return true;
        }
    }
    false
}

/// A private ferry installation whose QEMU UVM is stopped (and, failing that, killed) on drop.
/// Images are cached in one directory for all tests so the kernel is fetched once.
pub struct Env {
    pub state: PathBuf,
}

impl Env {
    /// `cache`: the shared image cache, from [`guest_image::cache`].
    pub fn new(tag: &str, cache: &Path) -> Env {
        let state = PathBuf::from(format!("/tmp/fq-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        guest_image::link(&state, cache);
        Env { state }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.env("FERRY_STATE_DIR", &self.state).args(args);
        c
    }

    pub fn ferry(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ferry")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ferry(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed ({}): {}\nshim log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.shim_log_tail()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn start(&self, uvm: &str) {
        self.ok(&["uvm", "start", uvm, "--backend", "qemu", "--memory", "256"]);
    }

    fn shim_log_tail(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.state.join("uvms"))
            .into_iter()
            .flatten()
        {
            let dir = entry.unwrap().path();
            let text = std::fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
            let lines: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("== {}\n", dir.display()));
            for l in lines.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(self.state.join("uvms"))
            .into_iter()
            .flatten()
        {
            let dir = entry.unwrap().path();
            let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
            let _ = self.ferry(&["uvm", "stop", &name]);
            // A VM whose shim is gone (a failed test) is not stopped by the above.
            let snapshot = std::fs::read_to_string(dir.join("snapshot")).unwrap_or_default();
            let body = snapshot.split_once('\n').map(|(_, b)| b).unwrap_or("");
            if let Ok(snap) = serde_json::from_str::<serde_json::Value>(body)
                && let Some(pid) = snap["uvm"]["agent_pid"].as_i64()
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
            {
                // SAFETY: kill with a pid (this test's QEMU, checked above) and a signal number.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Reads a counter log: lines "1", "2", ... each exactly once, in order. Returns how many.
pub fn counted(log: &str) -> usize {
    for (i, line) in log.lines().enumerate() {
        assert_eq!(
            line.trim(),
            (i + 1).to_string(),
            "line {} of the counter's output is {line:?}: lost or repeated output",
            i + 1
        );
    }
    log.lines().count()
}

#[test]
fn a_container_in_a_qemu_uvm_and_a_host_upgrade_under_it() {
    if skip("a_container_in_a_qemu_uvm_and_a_host_upgrade_under_it") {
        return;
    }
    let env = Env::new("basic", &guest_image::cache());
    env.start("q");

    // A container from the built-in image, inside the VM: output and exit code come back.
    let out = env.ferry(&[
        "run",
        "q",
        "--id",
        "c0",
        "--",
        "sh",
        "-c",
        "echo hello; uname -r; echo oops >&2; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("hello\n"), "{stdout}");
    // The guest's kernel, not the host's.
    let host_kernel =
        String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    assert_ne!(stdout.lines().nth(1), Some(host_kernel.trim()));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");

    // A detached counter, an exec beside it, and the host process replaced twice under it.
    env.ok(&[
        "run",
        "q",
        "-d",
        "--id",
        "c1",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 400 ]; do i=$((i+1)); echo $i; usleep 10000; done",
    ]);
    let ps = env.ok(&["exec", "q", "c1", "--", "ps"]);
    assert!(ps.contains("while"), "{ps}");
    env.ok(&["uvm", "upgrade", "q"]);
    env.ok(&["uvm", "upgrade", "q"]);
    let inspect: serde_json::Value =
        serde_json::from_str(&env.ok(&["uvm", "inspect", "q"])).unwrap();
    assert_eq!(inspect["uvm"]["backend"], "qemu");
    let out = env.ferry(&["wait", "q", "c1"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(counted(&env.ok(&["logs", "q", "c1"])), 400);

    // A missing command is a clear error, not a hang.
    let out = env.ferry(&["run", "q", "--", "/no/such/program"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/program"));

    env.ok(&["uvm", "stop", "q"]);
}

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Whether `pattern` matches a live process (a QEMU of a test directory).
fn qemu_running(dir: &Path) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c);
            c.starts_with("qemu-system") && c.contains(&*dir.to_string_lossy())
        })
    })
}

#[test]
fn live_migration_ping_pong_loses_no_output_and_keeps_stdin() {
    if skip("live_migration_ping_pong_loses_no_output_and_keeps_stdin") {
        return;
    }
    let cache = guest_image::cache();
    let a = Env::new("mig-a", &cache);
    let b = Env::new("mig-b", &cache);
    a.start("m");
    // A counter every 10 ms until TERM, and a process that answers its stdin.
    a.ok(&[
        "run",
        "m",
        "-d",
        "--id",
        "count",
        "--",
        "sh",
        "-c",
        "trap 'exit 7' TERM; i=0; while true; do i=$((i+1)); echo $i; usleep 10000; done",
    ]);
    a.ok(&[
        "run",
        "m",
        "-d",
        "-i",
        "--id",
        "echo",
        "--",
        "sh",
        "-c",
        "while read l; do echo got:$l; done; exit 5",
    ]);

    // Refused before anything moves: out-of-range options.
    for bad in [["--throttle-scale", "0"], ["--throttle-scale", "150"]] {
        let out = a.ferry(
            &[
                &["migrate", "m", "--to"],
                &[b.state.to_str().unwrap()][..],
                &bad[..],
            ]
            .concat(),
        );
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("throttling_scale"), "{err}");
        assert!(
            !b.state.join("uvms/m").exists(),
            "a refused migration started a receiver"
        );
    }
    // A dry run checks the destination, and moves nothing.
    a.ok(&[
        "migrate",
        "m",
        "--to",
        b.state.to_str().unwrap(),
        "--dry-run",
    ]);
    assert!(!qemu_running(&b.state));

    // There and back, five moves; the workload ends up on b.
    let mut here = &a;
    for n in 0..5 {
        let there = if n % 2 == 0 { &b } else { &a };
        let dest = if n == 2 {
            // Once over TCP (request and memory), as between two machines.
            let (port, memory_port) = (free_port(), free_port());
            let listen = format!("127.0.0.1:{port}");
            let mp = memory_port.to_string();
            there.ok(&[
                "uvm",
                "receive",
                "m",
                "--listen",
                &listen,
                "--memory-port",
                &mp,
            ]);
            format!("tcp:{listen}")
        } else {
            there.state.to_str().unwrap().to_owned()
        };
        let json = here.ok(&["migrate", "m", "--to", &dest, "--json"]);
        let events: Vec<serde_json::Value> = json
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let phases: Vec<&str> = events.iter().filter_map(|e| e["phase"].as_str()).collect();
        assert!(phases.contains(&"blackout_started"), "{json}");
        assert!(phases.contains(&"offline_done"), "{json}");
        assert!(
            !qemu_running(&here.state),
            "the source's QEMU still runs after move {n}"
        );
        assert!(qemu_running(&there.state));
        let ps = there.ok(&["ps", "m"]);
        assert!(ps.contains("count") && ps.contains("echo"), "{ps}");
        here = there;
    }
    let dest = &b;

    // stdin still reaches the process that moved five times; its exit code comes back.
    let mut attach = dest.cmd(&["attach", "m", "echo"]);
    let out = attach
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = out;
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"after\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got:after\n");
    assert_eq!(out.status.code(), Some(5));

    // Every line of the counter exactly once, across the moves; its exit code too.
    dest.ok(&["kill", "m", "count", "--signal", "TERM"]);
    assert_eq!(dest.ferry(&["wait", "m", "count"]).status.code(), Some(7));
    let lines = counted(&dest.ok(&["logs", "m", "count"]));
    assert!(lines > 100, "only {lines} lines");
    dest.ok(&["uvm", "stop", "m"]);
}
