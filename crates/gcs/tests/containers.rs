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

    for bad in ["a/b", "..", "../x", "", "x y"] {
        let r = gcs
            .create_container(&conn, bad, container_spec(&rootfs, &["sh"], false))
            .await;
        assert_eq!(r.base().result, hresult::E_INVALID_ARG, "{bad:?} accepted");
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
