//! containerd runs ferry: `ctr run --runtime io.containerd.ferry.v1` against a private
//! containerd (its own root, state and sockets under /tmp), with a busybox image built here and
//! imported offline, beside runc (`io.containerd.runc.v2`) as the reference: both runtimes must
//! give the same observable results.
//!
//! Needs root, containerd, ctr and runc (`.ci/run` installs them from Debian) and
//! busybox-static; says "skipped" loudly without them.

#[path = "support/counter.rs"]
mod counter;
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
        let script = ["sh", "-c", "echo out; echo err >&2; exit 3"];
        let mut outputs = run("out", &script, None);
        // The reference itself is flaky: with runc, `ctr run --rm` now and then exits before it
        // has copied a stderr line (about 1 run in 10 here). Asked again, up to twice more, so
        // that what is compared is runc's behaviour, not ctr's race; ferry is asked once.
        for again in ["out2", "out3"] {
            if rt != RUNC || !outputs.stderr.is_empty() {
                break;
            }
            eprintln!("runc reference lost its stderr line (ctr's copy race); asking again");
            outputs = run(again, &script, None);
        }
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
pub(crate) fn events(lab: &Lab) -> (Child, std::sync::mpsc::Receiver<String>) {
    events_in(lab, &lab.namespace)
}

/// `ctr events` of one containerd namespace.
pub(crate) fn events_in(lab: &Lab, namespace: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = lab
        .ctr_cmd_in(namespace, &["events"])
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
pub(crate) fn wait_event(
    rx: &std::sync::mpsc::Receiver<String>,
    topic: &str,
    needle: &str,
) -> String {
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

mod migration {
    //! The Migration service on the shim's socket, called as an orchestrator would.

    use super::counter;
    use super::lab::{self, FERRY, IMAGE, Lab, skip};
    use ferry::containerd::proto::migration::*;
    use ferry::containerd::proto::migration_ttrpc::MigrationClient;
    use ttrpc::Code;
    use ttrpc::r#async::Client;

    fn ctx() -> ttrpc::context::Context {
        ttrpc::context::with_timeout(0)
    }

    /// The ttrpc client of the shim that serves task `id`.
    async fn client(lab: &Lab, id: &str) -> MigrationClient {
        let address = std::fs::read_to_string(lab.dir.join(format!(
            "state/io.containerd.runtime.v2.task/{}/{id}/address",
            lab.namespace
        )))
        .expect("the shim's address file");
        MigrationClient::new(
            Client::connect(address.trim())
                .await
                .expect("connect to the shim"),
        )
    }

    fn code<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (Code, String) {
        match r {
            Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message),
            other => panic!("expected an error status, got {other:?}"),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn unknown_sessions_bad_ids_and_the_local_backend_are_refused() {
        if skip("unknown_sessions_bad_ids_and_the_local_backend_are_refused") {
            return;
        }
        let lab = Lab::start();
        let run = lab.ctr(
            &[
                "run",
                "-d",
                "--runtime",
                FERRY,
                IMAGE,
                "m-local",
                "sleep",
                "1000",
            ],
            None,
        );
        assert_eq!(run.code, 0, "{run:?}");
        runtime().block_on(async {
            let m = client(&lab, "m-local").await;
            let transfer = m
                .transfer_sandbox(
                    ctx(),
                    &TransferSandboxRequest {
                        session_id: "nope".into(),
                        address: "unix:/nowhere".into(),
                        ..Default::default()
                    },
                )
                .await
                .expect("a stream");
            // A stream's status comes with its first message.
            let mut transfer = transfer;
            let (c, msg) = code(transfer.recv().await);
            assert_eq!(c, Code::NOT_FOUND, "{msg}");
            assert!(msg.contains("nope"), "{msg}");
            let (c, msg) = code(
                m.finalize_sandbox(
                    ctx(),
                    &FinalizeSandboxRequest {
                        session_id: "nope".into(),
                        action: FinalizeAction::FINALIZE_ACTION_STOP.into(),
                        ..Default::default()
                    },
                )
                .await,
            );
            assert_eq!(c, Code::NOT_FOUND, "{msg}");
            let (c, msg) = code(
                m.prepare_and_export_sandbox(
                    ctx(),
                    &PrepareAndExportSandboxRequest {
                        session_id: "bad id!".into(),
                        ..Default::default()
                    },
                )
                .await,
            );
            assert_eq!(c, Code::INVALID_ARGUMENT, "{msg}");
            let (c, msg) = code(
                m.prepare_and_export_sandbox(
                    ctx(),
                    &PrepareAndExportSandboxRequest {
                        session_id: "s1".into(),
                        ..Default::default()
                    },
                )
                .await,
            );
            assert_eq!(c, Code::FAILED_PRECONDITION, "{msg}");
            assert!(msg.contains("local backend"), "{msg}");
        });
        // Nothing changed: the task still runs.
        let ls = lab.ctr(&["task", "ls"], None);
        assert!(ls.stdout.contains("RUNNING"), "{ls:?}");
    }

    #[test]
    fn a_running_task_moves_through_the_migration_service() {
        if skip("a_running_task_moves_through_the_migration_service")
            || lab::skip_qemu("a_running_task_moves_through_the_migration_service")
        {
            return;
        }
        let lab = Lab::start();
        lab.use_guest_image();
        lab.set_ferry_config(r#"{"backend":"qemu","memory_mib":256}"#);
        let run = lab.ctr(
            &[
                "run",
                "-d",
                "--runtime",
                FERRY,
                IMAGE,
                "mover",
                "sh",
                "-c",
                counter::SCRIPT,
            ],
            None,
        );
        assert_eq!(run.code, 0, "{run:?}");
        let ferry_bin = env!("CARGO_BIN_EXE_ferry");
        // The destination host: its own ferry state (sharing the image cache).
        let dest = lab.another_ferry_state("dest");
        let ferry = |args: &[&str]| {
            let out = std::process::Command::new(ferry_bin)
                .env("FERRY_STATE_DIR", &dest)
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ferry {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let source_uvm = format!("{}-mover", lab.namespace);
        // The destination: a ferry host waiting for the VM.
        let address = ferry(&["uvm", "receive", &source_uvm]).trim().to_string();
        assert!(address.starts_with("unix:"), "{address}");
        runtime().block_on(async {
            let m = client(&lab, "mover").await;
            let session = "s1".to_string();
            // Out of order before the session exists, and with bad options: refused.
            let bad = uvm::migration::encode(&uvm::migration::InitializeOptions {
                memory_transfer_throttle_params: Some(
                    uvm::migration::MemoryTransferThrottleParams {
                        throttling_scale: Some(150.0),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            });
            let (c, msg) = code(
                m.prepare_and_export_sandbox(
                    ctx(),
                    &PrepareAndExportSandboxRequest {
                        session_id: session.clone(),
                        init_options: bad,
                        ..Default::default()
                    },
                )
                .await,
            );
            assert_eq!(c, Code::INVALID_ARGUMENT, "{msg}");
            let exported = m
                .prepare_and_export_sandbox(
                    ctx(),
                    &PrepareAndExportSandboxRequest {
                        session_id: session.clone(),
                        ..Default::default()
                    },
                )
                .await
                .expect("export");
            let config: serde_json::Value = serde_json::from_slice(&exported.config).unwrap();
            assert_eq!(config["tasks"][0]["id"], "mover", "{config}");
            // Finalize before Transfer, Cleanup before the end, a second session: refused.
            let (c, msg) = code(
                m.finalize_sandbox(
                    ctx(),
                    &FinalizeSandboxRequest {
                        session_id: session.clone(),
                        action: FinalizeAction::FINALIZE_ACTION_STOP.into(),
                        ..Default::default()
                    },
                )
                .await,
            );
            assert_eq!(c, Code::FAILED_PRECONDITION, "{msg}");
            assert!(msg.contains("TransferSandbox"), "{msg}");
            let (c, _) = code(
                m.cleanup(
                    ctx(),
                    &CleanupRequest {
                        session_id: session.clone(),
                        ..Default::default()
                    },
                )
                .await,
            );
            assert_eq!(c, Code::FAILED_PRECONDITION);
            let (c, _) = code(
                m.prepare_and_export_sandbox(
                    ctx(),
                    &PrepareAndExportSandboxRequest {
                        session_id: "s2".into(),
                        ..Default::default()
                    },
                )
                .await,
            );
            assert_eq!(c, Code::FAILED_PRECONDITION);

            let mut notes = m
                .notifications(
                    ctx(),
                    &NotificationsRequest {
                        session_id: session.clone(),
                        ..Default::default()
                    },
                )
                .await
                .expect("notifications");
            let mut transfer = m
                .transfer_sandbox(
                    ctx(),
                    &TransferSandboxRequest {
                        session_id: session.clone(),
                        address: address.clone(),
                        ..Default::default()
                    },
                )
                .await
                .expect("transfer");
            let mut events = Vec::new();
            while let Some(r) = transfer.recv().await.expect("transfer stream") {
                assert!(r.error.is_empty(), "transfer failed: {}", r.error);
                events.push(r);
            }
            assert!(!events.is_empty(), "the transfer reports progress");
            for (i, e) in events.iter().enumerate() {
                assert_eq!(e.message_id as usize, i + 1, "message ids count up");
            }
            m.finalize_sandbox(
                ctx(),
                &FinalizeSandboxRequest {
                    session_id: session.clone(),
                    action: FinalizeAction::FINALIZE_ACTION_STOP.into(),
                    ..Default::default()
                },
            )
            .await
            .expect("finalize");
            let mut phases = Vec::new();
            let mut last = None;
            while let Some(n) = notes.recv().await.expect("notification stream") {
                phases.push(n.phase.clone());
                last = Some(n);
            }
            let last = last.expect("notifications");
            assert!(
                last.terminal && last.phase == "done" && last.outcome == "success",
                "{last:?}"
            );
            assert_eq!(
                phases.first().map(String::as_str),
                Some("setup_done"),
                "{phases:?}"
            );
            let t = phases
                .iter()
                .position(|p| p == "transferred")
                .expect("transferred");
            assert_eq!(t, phases.len() - 2, "in order: {phases:?}");
            m.cleanup(
                ctx(),
                &CleanupRequest {
                    session_id: session.clone(),
                    ..Default::default()
                },
            )
            .await
            .expect("cleanup");
        });
        // The task runs on the destination and its output went on there, every line once.
        let before = counter::lines(&ferry(&["logs", &source_uvm, "mover"]));
        let ps = ferry(&["ps", &source_uvm]);
        assert!(ps.contains("mover") && ps.contains("running"), "{ps}");
        // And goes on: followed from the start, every line once, past where it was.
        let mut follow = std::process::Command::new(ferry_bin);
        follow
            .env("FERRY_STATE_DIR", &dest)
            .args(["logs", "-f", &source_uvm, "mover"]);
        let after = counter::follow(follow, before + 10);
        assert!(
            after > before,
            "the counter goes on after the move ({before} -> {after})"
        );
        // The source cleaned up: its UVM is gone from its state, and containerd can delete
        // the task there.
        assert!(!lab.uvms().contains(&source_uvm), "{:?}", lab.uvms());
        let kill = lab.ctr(&["task", "kill", "-s", "SIGKILL", "mover"], None);
        let _ = kill;
        let del = lab.ctr(&["task", "delete", "-f", "mover"], None);
        assert_eq!(del.code, 0, "{del:?}");
        ferry(&["uvm", "stop", &source_uvm]);
    }

    /// Two "hosts" (two containerd namespaces, two ferry state roots), one orchestrator: the
    /// task moves between two containerd shims through their Migration services while a
    /// client on the destination streams its output.
    #[test]
    fn a_running_task_moves_between_two_shims() {
        if skip("a_running_task_moves_between_two_shims")
            || lab::skip_qemu("a_running_task_moves_between_two_shims")
        {
            return;
        }
        two_shims(false);
    }

    /// The same, driven by the reference orchestrator: `ferry migrate --containerd`.
    #[test]
    fn ferry_migrate_drives_two_shims() {
        if skip("ferry_migrate_drives_two_shims")
            || lab::skip_qemu("ferry_migrate_drives_two_shims")
        {
            return;
        }
        two_shims(true);
    }

    fn two_shims(via_cli: bool) {
        let lab = Lab::start();
        lab.use_guest_image();
        let source_cfg = lab.dir.join("source.json");
        std::fs::write(&source_cfg, r#"{"backend":"qemu","memory_mib":256}"#).unwrap();
        let dest_root = lab.another_ferry_state("dest");
        let dest_cfg = lab.dir.join("dest.json");
        std::fs::write(
            &dest_cfg,
            format!(
                r#"{{"backend":"qemu","memory_mib":256,"state_dir":"{}","incoming_session":"s1"}}"#,
                dest_root.display()
            ),
        )
        .unwrap();
        let dest_ns = format!("{}-dest", lab.namespace);
        let run = lab.ctr(
            &[
                "run",
                "-d",
                "--runtime",
                FERRY,
                "--runtime-config-path",
                source_cfg.to_str().unwrap(),
                IMAGE,
                "mover",
                "sh",
                "-c",
                counter::SCRIPT,
            ],
            None,
        );
        assert_eq!(run.code, 0, "{run:?}");
        // The destination's containerd learns the task first; its start waits for it.
        // The destination "host" takes its configuration from the shim's config file. The
        // container's own command does not matter (the image's default is used): the process
        // comes with the sandbox.
        lab.set_ferry_config(&std::fs::read_to_string(&dest_cfg).unwrap());
        let import = lab.ctr_in(
            &dest_ns,
            &["images", "import", lab::image_archive().to_str().unwrap()],
            None,
        );
        assert_eq!(import.code, 0, "{import:?}");
        let create = lab.ctr_in(
            &dest_ns,
            &["container", "create", "--runtime", FERRY, IMAGE, "mover"],
            None,
        );
        assert_eq!(create.code, 0, "{create:?}");
        let (mut ev, rx) = super::events_in(&lab, &dest_ns);
        let mut streamer = lab
            .ctr_cmd_in(&dest_ns, &["task", "start", "mover"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        super::wait_event(&rx, "/tasks/create", &format!("{dest_ns} /tasks/create"));
        let _ = ev.kill();
        let _ = ev.wait();
        let dest_address = std::fs::read_to_string(lab.dir.join(format!(
            "state/io.containerd.runtime.v2.task/{dest_ns}/mover/address"
        )))
        .unwrap();
        if via_cli {
            let bundle = |ns: &str| {
                lab.dir
                    .join(format!("state/io.containerd.runtime.v2.task/{ns}/mover"))
            };
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
                .args(["migrate", "--containerd", "--session", "s1", "--json"])
                .arg(bundle(&lab.namespace))
                .arg("--to")
                .arg(bundle(&dest_ns))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ferry migrate --containerd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let steps = String::from_utf8_lossy(&out.stdout);
            assert!(
                steps.lines().last().unwrap_or("").contains("done"),
                "{steps}"
            );
        } else {
            runtime().block_on(async {
                let src = client(&lab, "mover").await;
                let dst = MigrationClient::new(Client::connect(dest_address.trim()).await.unwrap());
                let session = "s1".to_string();
                let exported = src
                    .prepare_and_export_sandbox(
                        ctx(),
                        &PrepareAndExportSandboxRequest {
                            session_id: session.clone(),
                            ..Default::default()
                        },
                    )
                    .await
                    .expect("export");
                // The destination refuses calls out of order before and after the import.
                let (c, msg) = code(
                    dst.prepare_sandbox(
                        ctx(),
                        &PrepareSandboxRequest {
                            session_id: session.clone(),
                            ..Default::default()
                        },
                    )
                    .await,
                );
                assert_eq!(c, Code::NOT_FOUND, "{msg}");
                dst.import_sandbox(
                    ctx(),
                    &ImportSandboxRequest {
                        session_id: session.clone(),
                        config: exported.config.clone(),
                        ..Default::default()
                    },
                )
                .await
                .expect("import");
                let (c, msg) = code(
                    dst.finalize_sandbox(
                        ctx(),
                        &FinalizeSandboxRequest {
                            session_id: session.clone(),
                            action: FinalizeAction::FINALIZE_ACTION_RESUME.into(),
                            ..Default::default()
                        },
                    )
                    .await,
                );
                assert_eq!(c, Code::FAILED_PRECONDITION, "{msg}");
                let prepared = dst
                    .prepare_sandbox(
                        ctx(),
                        &PrepareSandboxRequest {
                            session_id: session.clone(),
                            ..Default::default()
                        },
                    )
                    .await
                    .expect("prepare");
                let mut src_notes = src
                    .notifications(
                        ctx(),
                        &NotificationsRequest {
                            session_id: session.clone(),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                let mut dst_notes = dst
                    .notifications(
                        ctx(),
                        &NotificationsRequest {
                            session_id: session.clone(),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                let mut dst_transfer = dst
                    .transfer_sandbox(
                        ctx(),
                        &TransferSandboxRequest {
                            session_id: session.clone(),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                let mut src_transfer = src
                    .transfer_sandbox(
                        ctx(),
                        &TransferSandboxRequest {
                            session_id: session.clone(),
                            address: prepared.address.clone(),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                while let Some(r) = src_transfer.recv().await.expect("source transfer stream") {
                    assert!(r.error.is_empty(), "source: {}", r.error);
                }
                while let Some(r) = dst_transfer
                    .recv()
                    .await
                    .expect("destination transfer stream")
                {
                    assert!(r.error.is_empty(), "destination: {}", r.error);
                }
                src.finalize_sandbox(
                    ctx(),
                    &FinalizeSandboxRequest {
                        session_id: session.clone(),
                        action: FinalizeAction::FINALIZE_ACTION_STOP.into(),
                        ..Default::default()
                    },
                )
                .await
                .expect("finalize source");
                dst.finalize_sandbox(
                    ctx(),
                    &FinalizeSandboxRequest {
                        session_id: session.clone(),
                        action: FinalizeAction::FINALIZE_ACTION_RESUME.into(),
                        ..Default::default()
                    },
                )
                .await
                .expect("finalize destination");
                for (side, notes) in [("source", &mut src_notes), ("destination", &mut dst_notes)] {
                    let mut all = Vec::new();
                    while let Some(n) = notes.recv().await.expect("notifications") {
                        all.push(n);
                    }
                    let last = all.last().expect("notifications");
                    assert!(
                        last.terminal && last.phase == "done" && last.outcome == "success",
                        "{side}: {all:?}"
                    );
                    assert!(
                        all.iter().rev().skip(1).all(|n| !n.terminal),
                        "{side}: one terminal, last"
                    );
                    assert!(
                        all.windows(2).all(|w| w[0].unix_ms <= w[1].unix_ms),
                        "{side}: in order"
                    );
                }
            });
        }
        // The destination's client streams the output from where it joined: consecutive lines.
        let mut out = std::io::BufReader::new(streamer.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut out, &mut first).unwrap();
        let mut n: u64 = first
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("a counter line: {first:?}"));
        for _ in 0..20 {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            n += 1;
            assert_eq!(
                line.trim(),
                n.to_string(),
                "the destination's output goes on, line by line"
            );
        }
        // containerd on the destination sees the task running; the full output, kept by ferry
        // there, has every line once from the start.
        let ls = lab.ctr_in(&dest_ns, &["task", "ls"], None);
        assert!(
            ls.stdout
                .lines()
                .any(|l| l.starts_with("mover") && l.contains("RUNNING")),
            "{ls:?}"
        );
        let logs = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .env("FERRY_STATE_DIR", &dest_root)
            .args(["logs", &format!("{}-mover", lab.namespace), "mover"])
            .output()
            .unwrap();
        let total = counter::lines(&String::from_utf8_lossy(&logs.stdout));
        assert!(
            total as u64 >= n,
            "ferry's log at the destination has it all ({total} lines, client saw {n})"
        );
        // The source cleaned up: its UVM is gone; containerd deletes the task there.
        assert!(
            !lab.uvms().contains(&format!("{}-mover", lab.namespace)),
            "{:?}",
            lab.uvms()
        );
        let del = lab.ctr(&["task", "delete", "mover"], None);
        assert_eq!(del.code, 0, "{del:?}");
        // And the destination task ends like any other.
        let kill = lab.ctr_in(&dest_ns, &["task", "kill", "-s", "SIGKILL", "mover"], None);
        assert_eq!(kill.code, 0, "{kill:?}");
        let status = streamer.wait().unwrap();
        assert_eq!(
            status.code(),
            Some(137),
            "the destination client sees the kill"
        );
        // (A foreground `ctr task start` deletes its task when it ends.)
        let ls = lab.ctr_in(&dest_ns, &["task", "ls", "-q"], None);
        assert!(!ls.stdout.contains("mover"), "{ls:?}");
        lab.ctr_in(&dest_ns, &["container", "rm", "mover"], None);
        lab.ctr(&["container", "rm", "mover"], None);
        assert!(
            !dest_root.join("uvms").exists()
                || std::fs::read_dir(dest_root.join("uvms"))
                    .unwrap()
                    .next()
                    .is_none(),
            "the destination's UVM went with its last task"
        );
    }
}
