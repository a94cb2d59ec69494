//! OCI containers: a busybox root filesystem in new pid/mount/uts/ipc namespaces.

mod support;

use bridge::hresult;
use bridge::message::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn init_params() -> ProcessParameters {
    // No OciProcess: the container's own spec process is the init.
    ProcessParameters {
        create_std_out_pipe: true,
        create_std_err_pipe: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn container_runs_in_its_own_namespaces_and_root() {
    if skip_unless_root("container test") || skip_unless_busybox("container test") {
        return;
    }
    let mut gcs = Gcs::start("ctr").await;
    let conn = gcs.connect().await;
    let rootfs = busybox_rootfs(&gcs.dir.0);
    // The init prints what it sees, then waits for a line on a FIFO before exiting 3.
    let script =
        "echo pid=$$; hostname; ls /; mkfifo /tmp/go; read x < /tmp/go; echo bye >&2; exit 3";
    let spec = container_spec(&rootfs, &["sh", "-c", script], false);
    ok(&gcs.create_container(&conn, "web", spec).await);
    ok(&conn
        .call(Request::Start(BaseRequest { base: base("web") }))
        .await);
    let (resp, mut io) = gcs
        .exec_raw(&conn, "web", init_params(), (false, true, true))
        .await;
    ok(&resp);
    let Response::ExecuteProcess(e) = resp else {
        panic!()
    };
    let init = e.process_id;

    // Output so far: pid 1 in its namespace, its hostname, the busybox root.
    let mut out = io.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !(seen.contains("tmp") && seen.contains("proc")) {
        let n = within("container output", out.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "output ended early: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("pid=1\n"), "{seen:?}");
    assert!(seen.contains("ferrybox\n"), "{seen:?}");
    assert!(seen.contains("bin\n"), "{seen:?}");

    // A second process joins the running container (OciProcess set).
    let exec = ProcessParameters {
        oci_process: oci_process(
            &[
                "sh",
                "-c",
                "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo",
            ],
            "/tmp",
        ),
        create_std_out_pipe: true,
        ..Default::default()
    };
    let (resp, mut io2) = gcs.exec_raw(&conn, "web", exec, (false, true, false)).await;
    ok(&resp);
    let Response::ExecuteProcess(e) = resp else {
        panic!()
    };
    let joined = String::from_utf8(read_all(io2.stdout.as_mut().unwrap()).await).unwrap();
    assert!(joined.starts_with("ferrybox\nsh -c "), "{joined:?}");
    assert_eq!(wait_exit(&conn, "web", e.process_id).await, 0);
    // Release the init. (This process may die with it: a container's processes are killed
    // when its init exits, so its own exit code is not checked.)
    let release = ProcessParameters {
        oci_process: oci_process(&["sh", "-c", "echo go > /tmp/go"], "/"),
        ..Default::default()
    };
    let (resp, _) = gcs
        .exec_raw(&conn, "web", release, (false, false, false))
        .await;
    ok(&resp);

    // The init exits 3: its wait and the container notification both say so.
    rest_of(&mut out).await;
    assert_eq!(read_all(io.stderr.as_mut().unwrap()).await, b"bye\n");
    assert_eq!(wait_exit(&conn, "web", init).await, 3);
    let n = conn.next_notification().await;
    assert_eq!(n.base.container_id, "web");
    assert_eq!(n.kind, notification_type::UNEXPECTED_EXIT);
    assert_eq!(n.result, 3);

    // An exited container takes no more processes; its state can be deleted, then it is gone.
    let (r, _) = gcs
        .exec_raw(&conn, "web", init_params(), (false, false, false))
        .await;
    assert_eq!(r.base().result, hresult::E_INVALID_ARG);
    ok(&conn
        .call(Request::DeleteContainerState(BaseRequest {
            base: base("web"),
        }))
        .await);
    let r = conn
        .call(Request::Start(BaseRequest { base: base("web") }))
        .await;
    assert_eq!(r.base().result, hresult::VM_SYSTEM_NOT_FOUND);
    // The agent's own mounts are untouched by the container's.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(rootfs.to_str().unwrap()),
        "container mount leaked to the host"
    );
}

async fn rest_of(s: &mut transport::BoxStream) -> Vec<u8> {
    read_all(s).await
}

#[tokio::test]
async fn shutdown_graceful_and_forced() {
    if skip_unless_root("container shutdown test") || skip_unless_busybox("container shutdown test")
    {
        return;
    }
    let mut gcs = Gcs::start("shut").await;
    let conn = gcs.connect().await;
    let rootfs = busybox_rootfs(&gcs.dir.0);
    // An init that handles SIGTERM (PID 1 ignores signals it has no handler for).
    let spec = container_spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while true; do sleep 0.05; done",
        ],
        false,
    );
    ok(&gcs.create_container(&conn, "g", spec).await);
    let (resp, mut io) = gcs
        .exec_raw(&conn, "g", init_params(), (false, true, true))
        .await;
    ok(&resp);
    // Shut down only once the handler is in place: a TERM before it would be ignored.
    let mut ready = [0u8; 6];
    within(
        "the init's handler",
        tokio::io::AsyncReadExt::read_exact(io.stdout.as_mut().unwrap(), &mut ready),
    )
    .await
    .unwrap();
    assert_eq!(&ready, b"ready\n");
    ok(&conn
        .call(Request::ShutdownGraceful(BaseRequest { base: base("g") }))
        .await);
    let n = conn.next_notification().await;
    assert_eq!(
        (n.base.container_id.as_str(), n.kind.as_str(), n.result),
        ("g", "GracefulExit", 42)
    );

    let spec = container_spec(&rootfs, &["sleep", "1000"], false);
    ok(&gcs.create_container(&conn, "f", spec).await);
    let (resp, _io) = gcs
        .exec_raw(&conn, "f", init_params(), (false, false, false))
        .await;
    ok(&resp);
    ok(&conn
        .call(Request::ShutdownForced(BaseRequest { base: base("f") }))
        .await);
    let n = conn.next_notification().await;
    assert_eq!(
        (n.base.container_id.as_str(), n.kind.as_str(), n.result),
        ("f", "ForcedExit", 137)
    );
}

#[tokio::test]
async fn container_with_a_terminal() {
    if skip_unless_root("container tty test") || skip_unless_busybox("container tty test") {
        return;
    }
    let mut gcs = Gcs::start("ctty").await;
    let conn = gcs.connect().await;
    let rootfs = busybox_rootfs(&gcs.dir.0);
    let spec = container_spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo isatty; read line; echo got:$line",
        ],
        true,
    );
    ok(&gcs.create_container(&conn, "t", spec).await);
    let params = ProcessParameters {
        emulate_console: true,
        create_std_in_pipe: true,
        create_std_out_pipe: true,
        ..Default::default()
    };
    let (resp, mut io) = gcs.exec_raw(&conn, "t", params, (true, true, false)).await;
    ok(&resp);
    let Response::ExecuteProcess(e) = resp else {
        panic!()
    };
    io.stdin
        .as_mut()
        .unwrap()
        .write_all(b"hello\n")
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&read_all(io.stdout.as_mut().unwrap()).await).into_owned();
    assert!(out.contains("isatty"), "{out:?}");
    assert!(out.contains("got:hello"), "{out:?}");
    assert_eq!(wait_exit(&conn, "t", e.process_id).await, 0);
}

#[tokio::test]
async fn bad_container_requests_are_refused_clearly() {
    if skip_unless_busybox("container validation test") {
        return;
    }
    let mut gcs = Gcs::start("badctr").await;
    let conn = gcs.connect().await;
    let rootfs = busybox_rootfs(&gcs.dir.0);

    let missing = gcs.dir.0.join("no-such-rootfs");
    let r = gcs
        .create_container(&conn, "m", container_spec(&missing, &["sh"], false))
        .await;
    assert_eq!(r.base().result, hresult::E_INVALID_ARG);
    assert!(
        r.base().message().contains("no-such-rootfs"),
        "{}",
        r.base().message()
    );

    // Ids become directory names: the answer says what is wrong with each.
    for (bad, why) in [
        ("a/b", "contains '/'"),
        ("..", "contains \"..\""),
        ("../x", "contains \"..\""),
        ("", "is empty"),
        ("x y", "a character outside"),
    ] {
        let r = gcs
            .create_container(&conn, bad, container_spec(&rootfs, &["sh"], false))
            .await;
        assert_eq!(r.base().result, hresult::E_INVALID_ARG, "{bad:?} accepted");
        let msg = r.base().message();
        assert!(
            msg.contains("container id") && msg.contains(why),
            "{bad:?}: {msg}"
        );
    }

    let mut no_mnt = container_spec(&rootfs, &["sh"], false);
    no_mnt["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}]);
    let r = gcs.create_container(&conn, "nomnt", no_mnt).await;
    assert_eq!(r.base().result, hresult::E_INVALID_ARG);

    let mut user_ns = container_spec(&rootfs, &["sh"], false);
    user_ns["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}, {"type": "user"}]);
    let r = gcs.create_container(&conn, "userns", user_ns).await;
    assert_eq!(r.base().result, hresult::E_NOT_IMPL);

    ok(&gcs
        .create_container(&conn, "dup", container_spec(&rootfs, &["sh"], false))
        .await);
    let r = gcs
        .create_container(&conn, "dup", container_spec(&rootfs, &["sh"], false))
        .await;
    assert_eq!(r.base().result, hresult::VM_SYSTEM_ALREADY_EXISTS);

    // A process in a container that was never started must be its init first.
    let exec = ProcessParameters {
        oci_process: Some(Box::new(
            serde_json::from_value(
                serde_json::json!({"user": {"uid": 0, "gid": 0}, "args": ["true"], "cwd": "/"}),
            )
            .unwrap(),
        )),
        ..Default::default()
    };
    let (r, _) = gcs
        .exec_raw(&conn, "dup", exec, (false, false, false))
        .await;
    assert_eq!(r.base().result, hresult::E_INVALID_ARG);
    assert!(
        r.base().message().contains("init"),
        "{}",
        r.base().message()
    );
}

/// Runs an init that sleeps in container `id`, returning its pid.
async fn sleeping_container(gcs: &Gcs, conn: &Conn, id: &str, rootfs: &std::path::Path) -> u32 {
    ok(&gcs
        .create_container(conn, id, container_spec(rootfs, &["sleep", "1000"], false))
        .await);
    let (resp, _) = gcs
        .exec_raw(
            conn,
            id,
            ProcessParameters::default(),
            (false, false, false),
        )
        .await;
    ok(&resp);
    let Response::ExecuteProcess(e) = resp else {
        panic!()
    };
    e.process_id
}

/// Kills a container's init through the bridge; its exit is reported as a kill.
async fn kill_container(conn: &Conn, id: &str, init: u32) {
    ok(&conn.call(signal_req(id, init, 9)).await);
    assert_eq!(wait_exit(conn, id, init).await, 137);
    let n = conn.next_notification().await;
    assert_eq!((n.base.container_id.as_str(), n.result), (id, 137));
}

#[tokio::test]
async fn create_in_utility_vm_runs_beside_the_container_not_in_it() {
    if skip_unless_root("CreateInUtilityVM test") || skip_unless_busybox("CreateInUtilityVM test") {
        return;
    }
    let mut gcs = Gcs::start("inuvm").await;
    let conn = gcs.connect().await;
    let rootfs = busybox_rootfs(&gcs.dir.0);
    let init = sleeping_container(&gcs, &conn, "c", &rootfs).await;
    // Where a process runs: its hostname, its pid as it sees it, and whether the container's
    // root filesystem is visible at its path in the UVM.
    let marker = rootfs.join("bin/busybox");
    let script = format!(
        "cat /proc/sys/kernel/hostname; echo $$; test -e {} && echo uvm-root || echo container-root",
        marker.display()
    );
    let run = |params: ProcessParameters| {
        let (gcs, conn) = (&gcs, &conn);
        async move {
            let (resp, mut io) = gcs.exec_raw(conn, "c", params, (false, true, false)).await;
            ok(&resp);
            let Response::ExecuteProcess(e) = resp else {
                panic!()
            };
            let out = String::from_utf8(read_all(io.stdout.as_mut().unwrap()).await).unwrap();
            assert_eq!(wait_exit(conn, "c", e.process_id).await, 0);
            let lines: Vec<String> = out.lines().map(str::to_string).collect();
            assert_eq!(lines.len(), 3, "{out:?}");
            (e.process_id, lines)
        }
    };

    let uvm_hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let (pid, seen) = run(ProcessParameters {
        command_args: vec!["sh".into(), "-c".into(), script.clone()],
        create_in_utility_vm: true,
        create_std_out_pipe: true,
        ..Default::default()
    })
    .await;
    assert_eq!(
        seen,
        [uvm_hostname.trim(), &pid.to_string(), "uvm-root"],
        "with CreateInUtilityVM the process runs in the UVM's namespaces and root"
    );

    let (pid, seen) = run(ProcessParameters {
        oci_process: oci_process(&["sh", "-c", &script], "/"),
        create_std_out_pipe: true,
        ..Default::default()
    })
    .await;
    assert_eq!(seen[0], "ferrybox");
    assert_ne!(
        seen[1],
        pid.to_string(),
        "not in the container's pid namespace"
    );
    assert_eq!(seen[2], "container-root");
    kill_container(&conn, "c", init).await;
}

#[tokio::test]
async fn container_processes_are_listed_signalled_and_resized() {
    if skip_unless_root("container process test") || skip_unless_busybox("container process test") {
        return;
    }
    let mut gcs = Gcs::start("cproc").await;
    let conn = gcs.connect().await;
    let rootfs = busybox_rootfs(&gcs.dir.0);
    let init = sleeping_container(&gcs, &conn, "c", &rootfs).await;
    let (resp, _) = gcs
        .exec_raw(
            &conn,
            "c",
            ProcessParameters {
                oci_process: oci_process(&["sleep", "1001"], "/"),
                ..Default::default()
            },
            (false, false, false),
        )
        .await;
    ok(&resp);
    let Response::ExecuteProcess(e) = resp else {
        panic!()
    };
    let sleeper = e.process_id;
    let tty_params = ProcessParameters {
        oci_process: oci_process(&["sh", "-c", "stty size; read x; stty size"], "/"),
        emulate_console: true,
        console_size: Some([24, 80]),
        create_std_in_pipe: true,
        create_std_out_pipe: true,
        ..Default::default()
    };
    let (resp, mut io) = gcs
        .exec_raw(&conn, "c", tty_params, (true, true, false))
        .await;
    ok(&resp);
    let Response::ExecuteProcess(e) = resp else {
        panic!()
    };
    let tty = e.process_id;
    let (beside, _) = gcs
        .exec_uvm(&conn, &["sleep", "1002"], (false, false, false))
        .await;

    // The container's list holds its own processes only, and the UVM's not them.
    let list = |id: &'static str| {
        let conn = &conn;
        async move {
            let mut l: Vec<(u32, String)> = process_list(conn, id)
                .await
                .into_iter()
                .map(|d| (d.process_id, d.image_name))
                .collect();
            l.sort();
            l
        }
    };
    let mut want = vec![
        (init, "sleep".to_string()),
        (sleeper, "sleep".to_string()),
        (tty, "sh".to_string()),
    ];
    want.sort();
    assert_eq!(list("c").await, want);
    assert_eq!(
        list(bridge::UVM_CONTAINER_ID).await,
        [(beside, "sleep".to_string())]
    );

    // The terminal of a process in the container follows ResizeConsole.
    let mut out = io.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        let n = within("first stty output", out.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    ok(&conn
        .call(Request::ResizeConsole(ResizeConsoleRequest {
            base: base("c"),
            process_id: tty,
            height: 40,
            width: 120,
        }))
        .await);
    io.stdin.as_mut().unwrap().write_all(b"\n").await.unwrap();
    let rest = String::from_utf8_lossy(&read_all(&mut out).await).into_owned();
    assert!(rest.contains("40 120"), "after resize: {rest:?}");
    assert_eq!(wait_exit(&conn, "c", tty).await, 0);

    // A signal reaches a process in the container (its pid namespace is not the agent's).
    ok(&conn.call(signal_req("c", sleeper, 15)).await);
    assert_eq!(wait_exit(&conn, "c", sleeper).await, 143);
    assert_eq!(list("c").await, [(init, "sleep".to_string())]);
    kill_container(&conn, "c", init).await;
    ok(&conn
        .call(signal_req(bridge::UVM_CONTAINER_ID, beside, 9))
        .await);
    assert_eq!(
        wait_exit(&conn, bridge::UVM_CONTAINER_ID, beside).await,
        137
    );
}

#[tokio::test]
async fn container_processes_get_their_cwd_env_and_user() {
    if skip_unless_root("container identity test") || skip_unless_busybox("container identity test")
    {
        return;
    }
    let mut gcs = Gcs::start("cuser").await;
    let conn = gcs.connect().await;
    let rootfs = busybox_rootfs(&gcs.dir.0);
    let report = "pwd; echo $FOO; id -u; id -g; id -G";
    // The init: the spec's own process.
    let mut spec = container_spec(
        &rootfs,
        &["sh", "-c", &format!("{report}; exec sleep 1000")],
        false,
    );
    spec["process"]["cwd"] = "/tmp".into();
    spec["process"]["env"] = serde_json::json!(["PATH=/bin", "FOO=bar"]);
    spec["process"]["user"] =
        serde_json::json!({"uid": 1000, "gid": 1000, "additionalGids": [1003]});
    ok(&gcs.create_container(&conn, "u", spec).await);
    let params = ProcessParameters {
        create_std_out_pipe: true,
        ..Default::default()
    };
    let (resp, mut io) = gcs.exec_raw(&conn, "u", params, (false, true, false)).await;
    ok(&resp);
    let Response::ExecuteProcess(e) = resp else {
        panic!()
    };
    let init = e.process_id;
    let mut out = io.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while seen.lines().count() < 5 {
        let n = within("the init's report", out.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "output ended early: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(seen, "/tmp\nbar\n1000\n1000\n1000 1003\n");

    // A further process: its own OciProcess, not the init's.
    let p = serde_json::json!({
        "user": {"uid": 1001, "gid": 1002},
        "args": ["sh", "-c", report],
        "env": ["PATH=/bin", "FOO=baz"],
        "cwd": "/bin"
    });
    let params = ProcessParameters {
        oci_process: Some(Box::new(serde_json::from_value(p).unwrap())),
        create_std_out_pipe: true,
        ..Default::default()
    };
    let (resp, mut io) = gcs.exec_raw(&conn, "u", params, (false, true, false)).await;
    ok(&resp);
    let Response::ExecuteProcess(e) = resp else {
        panic!()
    };
    let out = String::from_utf8(read_all(io.stdout.as_mut().unwrap()).await).unwrap();
    assert_eq!(out, "/bin\nbaz\n1001\n1002\n1002\n");
    assert_eq!(wait_exit(&conn, "u", e.process_id).await, 0);
    kill_container(&conn, "u", init).await;
}
