//! containerd runs ferry: `ctr run --runtime io.containerd.ferry.v1` against a private
//! containerd (its own root, state and sockets under /tmp), with a busybox image built here and
//! imported offline, beside runc (`io.containerd.runc.v2`) as the reference: both runtimes must
//! give the same observable results.
//!
//! Needs root, containerd, ctr and runc (`.ci/run` installs them from Debian) and
//! busybox-static; says "skipped" loudly without them.

#[path = "support/containerd_lab.rs"]
mod lab;

use lab::{FERRY, IMAGE, Lab, RUNC, Seen, skip};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

fn id(runtime: &str, what: &str) -> String {
    let short = if runtime == FERRY { "ferry" } else { "runc" };
    format!("{what}-{short}")
}

#[test]
fn run_gives_exit_codes_and_output_as_runc_does() {
    if skip("run_gives_exit_codes_and_output_as_runc_does") {
        return;
    }
    let lab = Lab::start();
    let mut seen = Vec::new();
    for rt in [RUNC, FERRY] {
        let run = |what: &str, cmd: &[&str], stdin: Option<&[u8]>| {
            let name = id(rt, what);
            let args = [&["run", "--rm", "--runtime", rt, IMAGE, &name][..], cmd].concat();
            lab.ctr(&args, stdin)
        };
        let outputs = run("out", &["sh", "-c", "echo out; echo err >&2; exit 3"], None);
        let stdin = lab.ctr_with_input(
            &[
                "run",
                "--rm",
                "--runtime",
                rt,
                IMAGE,
                &id(rt, "in"),
                "sh",
                "-c",
                "echo ready; cat; echo done",
            ],
            b"hello\nworld\n",
        );
        let missing = run("missing", &["/no/such/command"], None);
        seen.push((rt, outputs, stdin, missing));
    }
    let (_, out, input, missing) = &seen[1];
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (3, "out\n", "err\n"),
        "ferry: exit code and separate stdout/stderr"
    );
    assert_eq!(
        (input.code, input.stdout.as_str()),
        (0, "ready\nhello\nworld\ndone\n"),
        "ferry: stdin reaches the process and its end is seen"
    );
    assert_ne!(
        missing.code, 0,
        "ferry: a missing command fails: {missing:?}"
    );
    assert!(
        !missing.stderr.is_empty(),
        "ferry: and says why: {missing:?}"
    );
    let (_, r_out, r_input, r_missing) = &seen[0];
    assert_eq!(out, r_out, "same as runc");
    assert_eq!(input, r_input, "same as runc");
    assert_eq!(missing.code != 0, r_missing.code != 0, "same as runc");
    assert!(
        lab.uvms().is_empty(),
        "--rm leaves no UVM: {:?}",
        lab.uvms()
    );
    assert!(
        lab.mounts().is_empty(),
        "--rm leaves no mount: {:?}",
        lab.mounts()
    );
}

/// Starts `ctr events` and returns a receiver of its lines.
fn events(lab: &Lab) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = lab
        .ctr_cmd(&["events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for an event line with `topic` that contains `needle`; returns it.
fn wait_event(rx: &std::sync::mpsc::Receiver<String>, topic: &str, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {topic} event with {needle} within 60 s"));
        if line.contains(topic) && line.contains(needle) {
            return line;
        }
    }
}

/// What a task's life shows through ctr: exec (output, code, stdin), ps, ls, kill, the exit
/// event, delete.
type Life = ((Seen, Seen, usize, bool, i32, bool, bool), (i32, bool, i32));

/// Runs a task through its life with runtime `rt` (and `config`, a ferry runtime config path).
fn life(lab: &Lab, rt: &str, config: Option<&Path>, name: &str) -> Life {
    {
        let (mut ev, rx) = events(lab);
        let mut args = vec!["run", "-d", "--runtime", rt];
        if let Some(c) = config {
            args.extend(["--runtime-config-path", c.to_str().unwrap()]);
        }
        args.extend([IMAGE, name, "sleep", "1000"]);
        let run = lab.ctr(&args, None);
        let name = name.to_string();
        assert_eq!(run.code, 0, "{rt}: run -d: {run:?}");
        wait_event(&rx, "/tasks/start", &format!("\"container_id\":\"{name}\""));
        let exec = lab.ctr(
            &[
                "task",
                "exec",
                "--exec-id",
                "e1",
                &name,
                "sh",
                "-c",
                "echo hi; echo ho >&2; exit 4",
            ],
            None,
        );
        let exec_in = lab.ctr(
            &["task", "exec", "--exec-id", "e2", &name, "cat"],
            Some(b"piped\n"),
        );
        let ps = lab.ctr(&["task", "ps", &name], None);
        let pids = ps
            .stdout
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .count();
        let ls = lab.ctr(&["task", "ls"], None);
        let running = ls
            .stdout
            .lines()
            .any(|l| l.starts_with(&name) && l.contains("RUNNING"));
        let kill = lab.ctr(&["task", "kill", "-s", "SIGKILL", &name], None);
        // The init's exit: its id is the container's.
        let exit = wait_event(&rx, "/tasks/exit", &format!("\"id\":\"{name}\""));
        let exit_status = exit.contains("\"exit_status\":137");
        let ls = lab.ctr(&["task", "ls"], None);
        let stopped = ls
            .stdout
            .lines()
            .any(|l| l.starts_with(&name) && l.contains("STOPPED"));
        let delete = lab.ctr(&["task", "delete", &name], None);
        let gone = lab.ctr(&["task", "ls", "-q"], None);
        let c_rm = lab.ctr(&["containers", "rm", &name], None);
        let _ = ev.kill();
        let _ = ev.wait();
        if rt == FERRY {
            assert!(
                lab.uvms().is_empty(),
                "task delete stops the UVM: {:?}",
                lab.uvms()
            );
            assert!(
                lab.mounts().is_empty(),
                "task delete unmounts: {:?}",
                lab.mounts()
            );
        }
        (
            (
                exec,
                exec_in,
                pids,
                running,
                kill.code,
                exit_status,
                stopped,
            ),
            (delete.code, gone.stdout.contains(&name), c_rm.code),
        )
    }
}

/// The checks every ferry backend must pass, and runc's observations to match.
fn check_life(what: &str, ferry: &Life, runc: &Life) {
    let ((exec, exec_in, pids, running, kill, exit_status, stopped), after) = ferry;
    assert_eq!(
        (exec.code, exec.stdout.as_str(), exec.stderr.as_str()),
        (4, "hi\n", "ho\n"),
        "{what}: task exec"
    );
    assert_eq!(
        (exec_in.code, exec_in.stdout.as_str()),
        (0, "piped\n"),
        "{what}: exec stdin"
    );
    assert_eq!(*pids, 1, "{what}: task ps lists the running init");
    assert!(*running, "{what}: task ls shows RUNNING");
    assert_eq!(*kill, 0, "{what}: task kill");
    assert!(*exit_status, "{what}: the exit event carries 137");
    assert!(*stopped, "{what}: task ls shows STOPPED after the kill");
    assert_eq!(
        *after,
        (0, false, 0),
        "{what}: task delete, then containers rm"
    );
    assert_eq!(ferry, runc, "{what}: the same observations as runc");
}

#[test]
fn exec_ps_kill_delete_behave_as_with_runc() {
    if skip("exec_ps_kill_delete_behave_as_with_runc") {
        return;
    }
    let lab = Lab::start();
    let runc = life(&lab, RUNC, None, "life-runc");
    let ferry = life(&lab, FERRY, None, "life-ferry");
    check_life("ferry (local)", &ferry, &runc);
}

#[test]
fn qemu_backend_runs_tasks_in_a_vm() {
    if skip("qemu_backend_runs_tasks_in_a_vm") || lab::skip_qemu("qemu_backend_runs_tasks_in_a_vm")
    {
        return;
    }
    let lab = Lab::start();
    lab.use_guest_image();
    let qemu = lab.dir.join("qemu.json");
    std::fs::write(&qemu, r#"{"backend":"qemu","memory_mib":256}"#).unwrap();
    let config = qemu.to_str().unwrap();
    // In the VM: the guest's kernel, not the host's; exit code and both streams through.
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let r = lab.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            FERRY,
            "--runtime-config-path",
            config,
            IMAGE,
            "vm",
            "sh",
            "-c",
            "cat /proc/sys/kernel/osrelease; echo err >&2; exit 5",
        ],
        None,
    );
    assert_eq!(r.code, 5, "{r:?}");
    assert_eq!(r.stderr, "err\n", "{r:?}");
    assert!(
        !r.stdout.is_empty() && r.stdout != host_kernel,
        "runs in the VM, not on the host: {r:?}"
    );
    let runc = life(&lab, RUNC, None, "qlife-runc");
    let ferry = life(&lab, FERRY, Some(&qemu), "qlife-ferry");
    check_life("ferry (qemu)", &ferry, &runc);
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    if skip("bad_input_is_refused_and_leaves_nothing") {
        return;
    }
    let lab = Lab::start();
    // An unknown runtime option, by ctr's runtime config path and by the shim's config file.
    let bad = lab.dir.join("bad.json");
    std::fs::write(&bad, r#"{"backnd":"qemu"}"#).unwrap();
    let r = lab.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            FERRY,
            "--runtime-config-path",
            bad.to_str().unwrap(),
            IMAGE,
            "opt",
            "true",
        ],
        None,
    );
    assert_ne!(r.code, 0, "unknown option refused: {r:?}");
    assert!(
        r.stderr.contains("unknown field `backnd`"),
        "names the option: {r:?}"
    );
    lab.set_ferry_config(r#"{"backend":"local","cpus":0}"#);
    let r = lab.ctr(
        &["run", "--rm", "--runtime", FERRY, IMAGE, "cfg", "true"],
        None,
    );
    assert_ne!(r.code, 0, "bad value refused: {r:?}");
    assert!(r.stderr.contains("cpus 0"), "names the value: {r:?}");
    lab.set_ferry_config("{}");

    // A bundle whose config.json has no process to run.
    let spec = lab.dir.join("spec.json");
    std::fs::write(
        &spec,
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":[],"cwd":"/","user":{{"uid":0,"gid":0}}}},"root":{{"path":"{}"}}}}"#,
            lab.dir.display()
        ),
    )
    .unwrap();
    let r = lab.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            FERRY,
            "--config",
            spec.to_str().unwrap(),
            "spec",
        ],
        None,
    );
    assert_ne!(r.code, 0, "a spec without args is refused: {r:?}");
    assert!(r.stderr.contains("no args"), "says why: {r:?}");

    let tasks = lab.ctr(&["task", "ls", "-q"], None);
    assert_eq!(tasks.stdout.trim(), "", "no task left");
    assert!(lab.uvms().is_empty(), "no UVM left: {:?}", lab.uvms());
    assert!(lab.mounts().is_empty(), "no mount left: {:?}", lab.mounts());
    // And the runtime still works afterwards.
    let ok = lab.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            FERRY,
            IMAGE,
            "after",
            "echo",
            "ok",
        ],
        None,
    );
    assert_eq!((ok.code, ok.stdout.as_str()), (0, "ok\n"), "{ok:?}");
}
