//! The ferry command line end to end on the embedded default: a real shim, a real agent in
//! its own namespaces, real containers.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static N: AtomicU32 = AtomicU32::new(0);

fn skip(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: {test} needs root (the local UVM uses namespaces)");
        return true;
    }
    if !Path::new("/usr/bin/busybox").exists() && !Path::new("/bin/busybox").exists() {
        eprintln!("skipped: {test} needs busybox-static (the built-in image)");
        return true;
    }
    false
}

/// A private ferry installation with one running UVM, stopped on drop.
struct Env {
    state: PathBuf,
    uvm: String,
}

impl Env {
    fn new(tag: &str) -> Env {
        Env::with(tag, &[])
    }

    /// With extra `uvm start` options.
    fn with(tag: &str, start: &[&str]) -> Env {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let state = PathBuf::from(format!("/tmp/fc-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let env = Env {
            state,
            uvm: "u".into(),
        };
        let out = env.ferry(&[&["uvm", "start", "u"], start].concat());
        assert!(
            out.status.success(),
            "uvm start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        env
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.env("FERRY_STATE_DIR", &self.state).args(args);
        c
    }

    fn ferry(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ferry")
    }

    fn ferry_in(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.ferry(&["uvm", "stop", &self.uvm]);
        if std::thread::panicking() {
            for log in ["shim.log", "gcs.log"] {
                let p = self.state.join("uvms/u").join(log);
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("--- {} ---", p.display());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn exit_codes_propagate() {
    if skip("exit code test") {
        return;
    }
    let e = Env::new("codes");
    assert_eq!(code(&e.ferry(&["run", "u", "--", "true"])), 0);
    assert_eq!(code(&e.ferry(&["run", "u", "--", "sh", "-c", "exit 1"])), 1);
    // (A container's PID 1 cannot SIGKILL itself: its namespace protects it.)
    assert_eq!(
        code(&e.ferry(&[
            "run",
            "u",
            "--",
            "sh",
            "-c",
            "sleep 1000 & kill -9 $!; wait $!"
        ])),
        137
    );
    // Killed from outside.
    let out = e.ferry(&["run", "u", "-d", "--id", "sleeper", "--", "sleep", "1000"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sleeper");
    assert_eq!(code(&e.ferry(&["kill", "u", "sleeper"])), 0);
    assert_eq!(code(&e.ferry(&["wait", "u", "sleeper"])), 137);
}

#[test]
fn stdout_and_stderr_complete_and_separate() {
    if skip("stdio test") {
        return;
    }
    let e = Env::new("big");
    // 100 MiB of pseudo-random bytes through stdout, a marker on stderr.
    let script = "head -c 104857600 /dev/urandom > /tmp/d && md5sum /tmp/d >&2 && cat /tmp/d && echo done >&2";
    let out = e.ferry(&["run", "u", "--id", "big", "--", "sh", "-c", script]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 100 << 20);
    let err = stderr(&out);
    let sent_sum = err
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let got = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut got_stdin = got.stdin.as_ref().unwrap();
    got_stdin.write_all(&out.stdout).unwrap();
    let got = got.wait_with_output().unwrap();
    let got_sum = String::from_utf8_lossy(&got.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        got_sum, sent_sum,
        "stdout differs from what the process wrote"
    );
    assert!(err.ends_with("done\n"), "{err:?}");
}

#[test]
fn stdin_flows_and_end_of_input_is_seen() {
    if skip("stdin test") {
        return;
    }
    let e = Env::new("stdin");
    let out = e.ferry_in(
        &["run", "u", "--", "sh", "-c", "wc -c; echo eof-seen"],
        &vec![b'x'; 300_000],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "300000\neof-seen\n");
}

#[test]
fn logs_keep_output_produced_while_detached() {
    if skip("logs test") {
        return;
    }
    let e = Env::new("logs");
    let out = e.ferry(&[
        "run",
        "u",
        "-d",
        "--id",
        "bg",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3; do echo line $i; done; echo oops >&2; exit 4",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(code(&e.ferry(&["wait", "u", "bg"])), 4);
    let logs = e.ferry(&["logs", "u", "bg"]);
    assert_eq!(
        String::from_utf8_lossy(&logs.stdout),
        "line 1\nline 2\nline 3\n"
    );
    assert_eq!(stderr(&logs), "oops\n");
    // --follow on a running process ends with it.
    e.ferry(&[
        "run",
        "u",
        "-d",
        "--id",
        "f",
        "--",
        "sh",
        "-c",
        "echo a; sleep 0.3; echo b",
    ]);
    let follow = e.ferry(&["logs", "u", "f", "--follow"]);
    assert_eq!(String::from_utf8_lossy(&follow.stdout), "a\nb\n");
    // ps shows both, exited, with their codes.
    let ps = e.ferry(&["--json", "ps", "u"]);
    let v: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    let bg = v["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "bg")
        .unwrap();
    assert_eq!(bg["exit_code"], 4);
}

#[test]
fn exec_joins_a_running_container() {
    if skip("exec test") {
        return;
    }
    let e = Env::new("exec");
    e.ferry(&[
        "run",
        "u",
        "-d",
        "--id",
        "web",
        "--",
        "sh",
        "-c",
        "echo hi > /tmp/mark; sleep 1000",
    ]);
    let out = e.ferry(&[
        "exec",
        "u",
        "web",
        "--",
        "sh",
        "-c",
        "hostname; cat /proc/1/cmdline | tr '\\0' ' '",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    // (busybox sh execs its last command, so PID 1 is the sleep itself.)
    assert!(text.starts_with("web\nsleep 1000"), "{text:?}");
    let ps = e.ferry(&["ps", "u", "web"]);
    assert!(String::from_utf8_lossy(&ps.stdout).contains("sleep 1000"));
    assert_eq!(
        code(&e.ferry(&["rm", "u", "web"])),
        125,
        "a running container is not removed without --force"
    );
    assert_eq!(code(&e.ferry(&["rm", "u", "web", "--force"])), 0);
    assert!(!String::from_utf8_lossy(&e.ferry(&["ps", "u"]).stdout).contains("web"));
}

#[test]
fn a_terminal_with_working_resize() {
    if skip("tty test") {
        return;
    }
    let e = Env::new("tty");
    let pty = nix::pty::openpty(
        Some(&nix::pty::Winsize {
            ws_row: 30,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        None,
    )
    .unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut child = e
        // The guest's terminal sends SIGWINCH on resize: the trap prints the new size.
        .cmd(&[
            "run",
            "u",
            "--tty",
            "--",
            "sh",
            "-c",
            "trap 'stty size; exit 5' WINCH; stty size; while true; do sleep 0.05; done",
        ])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(slave);
    // A hang must fail the test, not stall CI: kill the CLI after a minute.
    let cli_pid = child.id() as i32;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .is_err()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(cli_pid),
                nix::sys::signal::SIGKILL,
            );
        }
    });
    let mut master = std::fs::File::from(pty.master);
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("30 100") {
        let n = master.read(&mut buf).expect("terminal output");
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    // Resize the outer terminal; the CLI forwards SIGWINCH as a resize.
    let ws = libc::winsize {
        ws_row: 50,
        ws_col: 132,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    use std::os::fd::AsRawFd;
    assert_eq!(
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGWINCH,
    )
    .unwrap();
    // Read until the terminal closes (the CLI exits when the process does).
    let mut rest = Vec::new();
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
        }
    }
    let status = child.wait().unwrap();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    assert_eq!(
        status.code(),
        Some(5),
        "the CLI was killed by the watchdog or failed"
    );
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("50 132"), "after resize: {text:?}");
}

#[test]
fn two_hundred_concurrent_processes() {
    if skip("concurrency test") {
        return;
    }
    let e = Env::new("many");
    let children: Vec<_> = (0..200)
        .map(|i| {
            let script = format!("echo out-{i}; exit {}", i % 100);
            e.cmd(&[
                "run",
                "u",
                "--id",
                &format!("c{i}"),
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), (i % 100) as i32, "c{i}: {}", stderr(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("out-{i}\n"));
    }
}

#[test]
fn bad_input_gives_one_clear_line_and_leaves_nothing_behind() {
    if skip("bad input test") {
        return;
    }
    let e = Env::new("bad");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "nosuchuvm", "--", "true"], "is not running"),
        (
            vec!["run", "u", "--id", "a/b", "--", "true"],
            "container id",
        ),
        (vec!["run", "u", "--id", "..", "--", "true"], "container id"),
        (
            vec!["run", "u", "--rootfs", "/nonexistent/rootfs", "--", "true"],
            "does not exist",
        ),
        (
            vec!["run", "u", "--image", "alpine", "--", "true"],
            "unknown image",
        ),
        (
            vec!["run", "u", "--id", "nocmd", "--", "no-such-command"],
            "No such file",
        ),
        (vec!["exec", "u", "ghost", "--", "true"], "no container"),
        (vec!["kill", "u", "ghost"], "no container"),
        (vec!["kill", "u", "ghost", "-s", "BOGUS"], "unknown signal"),
        (vec!["uvm", "start", "bad/name"], "UVM name"),
        (vec!["uvm", "start", "u"], "already running"),
    ];
    for (args, needle) in cases {
        let out = e.ferry(&args);
        let err = stderr(&out);
        assert_eq!(code(&out), 125, "{args:?}: {err}");
        assert!(
            err.starts_with("ferry: ") && err.trim_end().lines().count() == 1,
            "{args:?}: not one line: {err:?}"
        );
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    }
    // Duplicate ids.
    assert_eq!(
        code(&e.ferry(&["run", "u", "--id", "dup", "--", "true"])),
        0
    );
    let out = e.ferry(&["run", "u", "--id", "dup", "--", "true"]);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    // Nothing half-created: the failed "nocmd" container is gone, and its id is free again.
    let ps = String::from_utf8_lossy(&e.ferry(&["ps", "u"]).stdout).into_owned();
    assert!(!ps.contains("nocmd"), "{ps}");
    assert_eq!(
        code(&e.ferry(&["run", "u", "--id", "nocmd", "--", "true"])),
        0
    );
}

#[test]
fn the_control_socket_survives_garbage() {
    if skip("control socket test") {
        return;
    }
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    let e = Env::new("ctl");
    let sock = e.state.join("uvms/u/control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be private");
    let ask = |bytes: &[u8]| -> String {
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        let _ = std::io::BufReader::new(s).read_line(&mut line);
        line
    };
    for junk in [
        &b"not json\n"[..],
        b"{\"op\":\"launch_missiles\"}\n",
        b"{\"op\":\"run\"}\n",
        b"\xff\xfe\n",
        b"",
    ] {
        let reply = ask(junk);
        assert!(reply.contains("\"ok\":false"), "{junk:?} -> {reply:?}");
    }
    // A line longer than the limit is refused without buffering it all.
    let mut huge = vec![b'x'; 3 << 20];
    huge.push(b'\n');
    assert!(ask(&huge).contains("\"ok\":false"));
    // Still serving.
    assert_eq!(code(&e.ferry(&["run", "u", "--", "true"])), 0);
}

#[test]
fn logs_are_bounded_but_an_attached_client_gets_everything() {
    if skip("log limit test") {
        return;
    }
    let e = Env::with("limit", &["--log-limit", "1"]);
    // 3 MiB through a 1 MiB log: the attached client receives every byte in order.
    let script = "i=0; while [ $i -lt 49152 ]; do printf '%063d\\n' $i; i=$((i+1)); done";
    let out = e.ferry(&["run", "u", "--id", "big", "--", "sh", "-c", script]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 3 << 20, "the attached client lost output");
    for (i, line) in out.stdout.split(|b| *b == b'\n').take(49152).enumerate() {
        assert_eq!(line, format!("{i:063}").as_bytes(), "line {i}");
    }
    // The log kept the last 1 MiB, and says what it dropped.
    let logs = e.ferry(&["logs", "u", "big"]);
    assert_eq!(code(&logs), 0, "{}", stderr(&logs));
    assert_eq!(logs.stdout.len(), 1 << 20);
    assert!(
        logs.stdout
            .starts_with(format!("{:063}\n", 49152 - 16384).as_bytes())
    );
    assert!(
        stderr(&logs).contains(&format!("{} bytes of earlier output were dropped", 2 << 20)),
        "{}",
        stderr(&logs)
    );
}

/// Clients streaming in the foreground (`run`, `logs -f`) go on across a replaced host
/// process, but not past a stopped UVM: they end with the reason, without waiting for a
/// successor that cannot come.
#[test]
fn stopping_the_uvm_ends_its_foreground_clients_with_the_reason() {
    if skip("stopping_the_uvm_ends_its_foreground_clients_with_the_reason") {
        return;
    }
    use std::io::BufRead;
    let e = Env::new("stopfg");
    let started = |args: &[&str]| {
        let mut child = e
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "up\n", "{args:?} streams");
        child
    };
    let run = started(&[
        "run",
        "u",
        "--id",
        "s",
        "--",
        "sh",
        "-c",
        "echo up; sleep 1000",
    ]);
    let follow = started(&["logs", "-f", "u", "s"]);
    let stop = e.ferry(&["uvm", "stop", "u"]);
    assert_eq!(code(&stop), 0, "{}", stderr(&stop));
    for (what, child) in [("run", run), ("logs -f", follow)] {
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(code(&out), 125, "{what}: {err}");
        // The shim may say it first (the guest went away) or the client find the UVM gone;
        // either way it did not wait for a new host process.
        assert!(
            err.contains("was stopped") || err.contains("guest connection closed"),
            "{what}: {err}"
        );
        assert!(!err.contains("waiting up to"), "{what}: {err}");
    }
}
