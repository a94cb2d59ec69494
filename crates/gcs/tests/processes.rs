//! Processes in the utility VM (no container): stdio through dialled ports, exit codes,
//! signals, terminals, process lists.

mod support;

use bridge::message::*;
use bridge::{UVM_CONTAINER_ID as UVM, hresult};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn stdout_and_stderr_arrive_complete_and_separate() {
    let mut gcs = Gcs::start("sep").await;
    let conn = gcs.connect().await;
    let (pid, mut io) = gcs
        .exec_uvm(
            &conn,
            &[
                "sh",
                "-c",
                "echo out; echo err >&2; head -c 1048576 /dev/zero; exit 7",
            ],
            (false, true, true),
        )
        .await;
    let (out, err) = tokio::join!(
        read_all(io.stdout.as_mut().unwrap()),
        read_all(io.stderr.as_mut().unwrap())
    );
    assert_eq!(&out[..4], b"out\n");
    assert_eq!(out.len(), 4 + 1048576);
    assert!(out[4..].iter().all(|&b| b == 0));
    assert_eq!(err, b"err\n");
    assert_eq!(wait_exit(&conn, UVM, pid).await, 7);
}

#[tokio::test]
async fn stdin_flows_and_end_of_input_is_seen() {
    let mut gcs = Gcs::start("stdin").await;
    let conn = gcs.connect().await;
    let (pid, mut io) = gcs
        .exec_uvm(&conn, &["sh", "-c", "cat; echo done"], (true, true, false))
        .await;
    let mut stdin = io.stdin.take().unwrap();
    stdin
        .write_all(b"hello through the bridge\n")
        .await
        .unwrap();
    stdin.shutdown().await.unwrap();
    let out = read_all(io.stdout.as_mut().unwrap()).await;
    assert_eq!(out, b"hello through the bridge\ndone\n");
    assert_eq!(wait_exit(&conn, UVM, pid).await, 0);
}

#[tokio::test]
async fn killed_by_signal_reports_128_plus_n() {
    let mut gcs = Gcs::start("sig").await;
    let conn = gcs.connect().await;
    let (pid, _io) = gcs
        .exec_uvm(&conn, &["sleep", "1000"], (false, false, false))
        .await;
    ok(&conn.call(signal_req(UVM, pid, 15)).await);
    assert_eq!(wait_exit(&conn, UVM, pid).await, 143);

    let (pid, _io) = gcs
        .exec_uvm(&conn, &["sleep", "1000"], (false, false, false))
        .await;
    // No options at all means kill.
    ok(&conn
        .call(Request::SignalProcess(SignalProcessRequest {
            base: base(UVM),
            process_id: pid,
            options: None,
        }))
        .await);
    assert_eq!(wait_exit(&conn, UVM, pid).await, 137);
    // An exited process cannot be signalled; a bogus signal number is refused.
    let r = conn.call(signal_req(UVM, pid, 9)).await;
    assert_eq!(r.base().result, hresult::E_NOT_FOUND);
    let (pid, _io) = gcs
        .exec_uvm(&conn, &["sleep", "1000"], (false, false, false))
        .await;
    let r = conn.call(signal_req(UVM, pid, 999)).await;
    assert_eq!(r.base().result, hresult::E_INVALID_ARG);
    assert!(r.base().message().contains("999"));
    ok(&conn.call(signal_req(UVM, pid, 9)).await);
    assert_eq!(wait_exit(&conn, UVM, pid).await, 137);
}

#[tokio::test]
async fn terminal_with_resize() {
    let mut gcs = Gcs::start("tty").await;
    let conn = gcs.connect().await;
    let params = ProcessParameters {
        command_args: vec![
            "sh".into(),
            "-c".into(),
            "stty size; read x; stty size; tty".into(),
        ],
        emulate_console: true,
        console_size: Some([24, 80]),
        create_std_in_pipe: true,
        create_std_out_pipe: true,
        ..Default::default()
    };
    let (resp, mut io) = gcs.exec_raw(&conn, UVM, params, (true, true, false)).await;
    ok(&resp);
    let Response::ExecuteProcess(e) = resp else {
        panic!()
    };
    let pid = e.process_id;
    let mut out = io.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        let n = within("first stty output", out.read(&mut buf))
            .await
            .unwrap();
        assert!(
            n > 0,
            "terminal closed early: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    ok(&conn
        .call(Request::ResizeConsole(ResizeConsoleRequest {
            base: base(UVM),
            process_id: pid,
            height: 40,
            width: 120,
        }))
        .await);
    io.stdin.as_mut().unwrap().write_all(b"\n").await.unwrap();
    let rest = read_all(&mut out).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("40 120"), "after resize: {text:?}");
    assert!(text.contains("/dev/pts/"), "not a terminal: {text:?}");
    assert_eq!(wait_exit(&conn, UVM, pid).await, 0);

    // A process without a console cannot be resized.
    let (pid, _io) = gcs
        .exec_uvm(&conn, &["sleep", "1000"], (false, false, false))
        .await;
    let r = conn
        .call(Request::ResizeConsole(ResizeConsoleRequest {
            base: base(UVM),
            process_id: pid,
            height: 1,
            width: 1,
        }))
        .await;
    assert_eq!(r.base().result, hresult::E_INVALID_ARG);
    ok(&conn.call(signal_req(UVM, pid, 9)).await);
}

#[tokio::test]
async fn process_list_and_wait_timeout() {
    let mut gcs = Gcs::start("props").await;
    let conn = gcs.connect().await;
    let (a, _) = gcs
        .exec_uvm(&conn, &["sleep", "1000"], (false, false, false))
        .await;
    let (b, _) = gcs
        .exec_uvm(&conn, &["sleep", "1001"], (false, false, false))
        .await;
    let listed = process_list(&conn, UVM).await;
    let mut pids: Vec<u32> = listed.iter().map(|d| d.process_id).collect();
    pids.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(pids, want);
    assert!(listed.iter().all(|d| d.image_name == "sleep"));

    let r = conn.call(wait_req(UVM, a, 50)).await;
    assert_eq!(r.base().result, hresult::VM_TIMEOUT);
    for pid in [a, b] {
        ok(&conn.call(signal_req(UVM, pid, 9)).await);
        assert_eq!(wait_exit(&conn, UVM, pid).await, 137);
    }
    // A second wait after delivery still tells the truth.
    assert_eq!(wait_exit(&conn, UVM, a).await, 137);
}

#[tokio::test]
async fn missing_command_is_a_clear_error_and_the_agent_keeps_serving() {
    let mut gcs = Gcs::start("nocmd").await;
    let conn = gcs.connect().await;
    let params = ProcessParameters {
        command_args: vec!["no-such-command-xyz".into()],
        ..Default::default()
    };
    let (r, _) = gcs.exec_raw(&conn, UVM, params, (false, true, false)).await;
    assert_ne!(r.base().result, 0);
    let msg = r.base().message();
    assert!(
        msg.contains("no-such-command-xyz") && msg.contains("No such file"),
        "{msg}"
    );
    let (pid, _) = gcs.exec_uvm(&conn, &["true"], (false, false, false)).await;
    assert_eq!(wait_exit(&conn, UVM, pid).await, 0);
}

#[tokio::test]
async fn dump_stacks_shows_state_and_uvm_shutdown_stops_the_agent() {
    let mut gcs = Gcs::start("down").await;
    let conn = gcs.connect().await;
    let (pid, mut io) = gcs
        .exec_uvm(&conn, &["sleep", "1000"], (false, true, false))
        .await;
    let r = conn
        .call(Request::DumpStacks(BaseRequest { base: base(UVM) }))
        .await;
    ok(&r);
    let Response::DumpStacks(d) = r else { panic!() };
    assert!(
        d.guest_stacks.contains(&format!("process {pid} ")),
        "{}",
        d.guest_stacks
    );

    ok(&conn
        .call(Request::ShutdownForced(BaseRequest { base: base(UVM) }))
        .await);
    // Its processes are killed (their output ends) and the agent exits cleanly.
    read_all(io.stdout.as_mut().unwrap()).await;
    conn.wait_closed().await;
    let status = within("ferry-gcs to exit", async {
        tokio::task::spawn_blocking(move || {
            let s = gcs.child.wait();
            (s, gcs)
        })
        .await
        .unwrap()
    })
    .await;
    assert!(status.0.unwrap().success());
}

#[tokio::test]
async fn isolated_agent_is_pid_1_of_its_own_namespaces_and_takes_its_processes_down() {
    if skip_unless_root("--isolate test") {
        return;
    }
    let mut gcs = Gcs::start_with("iso", &["--isolate", "--hostname=uvm-test"]).await;
    let conn = gcs.connect().await;
    let (pid, mut io) = gcs
        .exec_uvm(
            &conn,
            &["sh", "-c", "echo $PPID; hostname; exec sleep 1000"],
            (false, true, false),
        )
        .await;
    let mut out = io.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while seen.lines().count() < 2 {
        let n = within("output", out.read(&mut buf)).await.unwrap();
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(
        lines,
        ["1", "uvm-test"],
        "the agent is PID 1 in the UVM's namespace"
    );
    assert!(pid < 100, "pid {pid} is from the UVM's namespace");
    // SIGTERM to the agent: it stops, and its processes with it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gcs.pid() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    read_all(&mut out).await;
    conn.wait_closed().await;
}

/// Field 19 of /proc/<pid>/stat: the nice value (the command name, field 2, may hold spaces).
fn nice_of(pid: &str) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    after_comm.split(' ').nth(16).unwrap().parse().unwrap()
}

/// Polls (bounded) until the agent's nice value is `want`.
async fn agent_nice_becomes(pid: &str, want: i32, what: &str) {
    let t = std::time::Instant::now();
    while nice_of(pid) != want {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{what}: the agent's nice value stayed {} (want {want})",
            nice_of(pid)
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_agent_is_raised_above_its_workloads_only_after_its_host_changed() {
    if skip_unless_root("the_agent_is_raised_above_its_workloads_only_after_its_host_changed") {
        return;
    }
    let own = nice_of("self");
    let mut gcs = Gcs::start_with("nice", &["--reconnect-nice=-5"]).await;
    let agent = gcs.pid().to_string();
    let conn = gcs.connect().await;
    assert_eq!(
        nice_of(&agent),
        own,
        "at its own priority while its host stays"
    );
    // The host goes away: the agent, dialling the next one, is raised for a while.
    drop(conn);
    agent_nice_becomes(&agent, -5, "after the host left").await;
    let conn = gcs.connect().await;
    let (pid, mut io) = gcs
        .exec_uvm(
            &conn,
            &["sh", "-c", "cut -d ')' -f 2 /proc/self/stat"],
            (false, true, false),
        )
        .await;
    let out = String::from_utf8(read_all(io.stdout.as_mut().unwrap()).await).unwrap();
    let workload: i32 = out.split(' ').nth(17).unwrap().trim().parse().unwrap();
    assert_eq!(
        workload, own,
        "a workload runs at the agent's own priority, raised or not"
    );
    assert_eq!(wait_exit(&conn, UVM, pid).await, 0);
    agent_nice_becomes(&agent, own, "once the raise was over").await;
}
