//! The reason ferry-gcs exists: the bridge breaks (host restart, migration) and nothing is
//! lost. Processes keep running, exits that happen while nobody is connected are reported with
//! their real codes, queued notifications arrive after the next negotiation, and answers to
//! waits asked on the old connection reach the new one.

mod support;

use bridge::UVM_CONTAINER_ID as UVM;
use bridge::message::*;
use support::*;
use tokio::io::AsyncReadExt;

/// A shell loop printing 0..n-1, one line per 10 ms, then exiting with `code`.
fn counter(n: u32, code: u32) -> String {
    format!("i=0; while [ $i -lt {n} ]; do echo $i; i=$((i+1)); sleep 0.01; done; exit {code}")
}

/// A counter that starts only once a line arrives on stdin: it cannot end before the test
/// has dropped the bridge, however slow the machine.
fn gated(n: u32, code: u32) -> String {
    format!("read go; {}", counter(n, code))
}

/// A counter printing one line per 10 ms until it gets SIGUSR1, then exiting with `code`: it
/// is writing when the bridge drops, and ends when the test says, not on a timer.
fn until_usr1(code: u32) -> String {
    format!(
        "trap 'stop=1' USR1; i=0; while [ -z \"$stop\" ]; do echo $i; i=$((i+1)); sleep 0.01; done; exit {code}"
    )
}

/// What the agent logs when a bridge dial fails (once per outage, then every 10 s).
const DIAL_FAILED: &str = "bridge not reachable";

fn line_count(out: &[u8]) -> usize {
    out.iter().filter(|&&b| b == b'\n').count()
}

/// Reads from `s` into `out` until it holds at least `n` lines.
async fn read_lines(s: &mut transport::BoxStream, out: &mut Vec<u8>, n: usize) {
    let mut buf = [0u8; 4096];
    while line_count(out) < n {
        let k = within("counter output", s.read(&mut buf)).await.unwrap();
        assert!(
            k > 0,
            "output ended early: {:?}",
            String::from_utf8_lossy(out)
        );
        out.extend_from_slice(&buf[..k]);
    }
}

fn assert_counter(out: &[u8], n: u32) {
    let text = String::from_utf8_lossy(out);
    let lines: Vec<&str> = text.lines().collect();
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(lines, want, "output has a gap or a duplicate");
}

fn exit_code_of(r: Response) -> u32 {
    match r {
        Response::WaitForProcess(w) => {
            assert_eq!(w.base.result, 0, "{}", w.base.message());
            w.exit_code
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn exit_while_disconnected_is_reported_after_reconnect() {
    if skip_unless_root("reconnect container test")
        || skip_unless_busybox("reconnect container test")
    {
        return;
    }
    // The test reads the agent's log (its failed dials, its recorded exits).
    let mut gcs = Gcs::start_with("recon", &["--log-level=debug"]).await;
    let conn = gcs.connect().await;
    let rootfs = busybox_rootfs(&gcs.dir.0);
    ok(&gcs
        .create_container(
            &conn,
            "c",
            container_spec(&rootfs, &["sh", "-c", &until_usr1(5)], false),
        )
        .await);
    let (resp, mut cio) = gcs
        .exec_raw(
            &conn,
            "c",
            ProcessParameters {
                create_std_out_pipe: true,
                ..Default::default()
            },
            (false, true, false),
        )
        .await;
    ok(&resp);
    let Response::ExecuteProcess(e) = resp else {
        panic!()
    };
    let init = e.process_id;
    let (upid, mut uio) = gcs
        .exec_uvm(&conn, &["sh", "-c", &until_usr1(6)], (false, true, false))
        .await;
    let (mut cout, mut uout) = (cio.stdout.take().unwrap(), uio.stdout.take().unwrap());
    let (mut cseen, mut useen) = (Vec::new(), Vec::new());
    // Both are writing when the bridge goes.
    read_lines(&mut cout, &mut cseen, 1).await;
    read_lines(&mut uout, &mut useen, 1).await;

    // Ask for the UVM process's exit, then take the host away entirely: its listener too.
    let (wait_id, _) = conn.send(&wait_req(UVM, upid, bridge::INFINITE_WAIT)).await;
    let failures = gcs.log_count(DIAL_FAILED);
    gcs.close_bridge();
    conn.close().await;
    gcs.log_grows(DIAL_FAILED, failures).await;

    // With no bridge at all, output keeps flowing (stdio has its own connections)...
    let (c_then, u_then) = (line_count(&cseen), line_count(&useen));
    read_lines(&mut cout, &mut cseen, c_then + 5).await;
    read_lines(&mut uout, &mut useen, u_then + 5).await;
    // ...and both processes end, their exits recorded by the agent.
    for pid in [init, upid] {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGUSR1,
        )
        .unwrap();
    }
    let (crest, urest) = tokio::join!(read_all(&mut cout), read_all(&mut uout));
    cseen.extend(crest);
    useen.extend(urest);
    let n = line_count(&cseen);
    assert!(n >= c_then + 5);
    assert_counter(&cseen, n as u32);
    let n = line_count(&useen);
    assert!(n >= u_then + 5);
    assert_counter(&useen, n as u32);
    gcs.exit_recorded(init).await;
    gcs.exit_recorded(upid).await;

    // The host comes back: the agent, still redialling, reaches it. The new connection adopts
    // the outstanding wait id, then negotiates.
    gcs.reopen_bridge().await;
    let conn = gcs.accept().await;
    let adopted = conn.expect(wait_id);
    conn.negotiate().await;
    assert_eq!(
        exit_code_of(within("the adopted wait", adopted).await.unwrap()),
        6
    );
    // The container's exit notification was queued and arrives now.
    let n = conn.next_notification().await;
    assert_eq!((n.base.container_id.as_str(), n.result), ("c", 5));
    // And a fresh wait reports the real code, not "not found" and not 0.
    assert_eq!(wait_exit(&conn, "c", init).await, 5);
    assert_eq!(wait_exit(&conn, UVM, upid).await, 6);
}

#[tokio::test]
async fn nothing_flows_before_negotiation() {
    let mut gcs = Gcs::start("preneg").await;
    let conn = gcs.connect().await;
    // Held on stdin until the bridge is gone: an exit answered on the old connection would
    // be lost with it (under load, "exit 9" alone could end before the drop).
    let (pid, mut io) = gcs
        .exec_uvm(&conn, &["sh", "-c", "read l; exit 9"], (true, true, false))
        .await;
    let (wait_id, _) = conn.send(&wait_req(UVM, pid, bridge::INFINITE_WAIT)).await;
    conn.close().await;
    let mut stdin = io.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"go\n")
        .await
        .unwrap();
    drop(stdin);
    read_all(io.stdout.as_mut().unwrap()).await;
    let conn = gcs.accept().await;
    let adopted = conn.expect(wait_id);
    // Before negotiating, a request is refused; the sticky answer must not have been sent
    // yet (it is only released by negotiation, so it cannot have arrived before this reply).
    let r = conn.call(wait_req(UVM, pid, 0)).await;
    assert_eq!(r.base().result, bridge::hresult::E_NOT_IMPL);
    assert!(conn.strays.lock().unwrap().is_empty());
    conn.negotiate().await;
    assert_eq!(
        exit_code_of(within("the adopted wait", adopted).await.unwrap()),
        9
    );
}

#[tokio::test]
async fn fifty_drops_with_several_processes_nothing_leaks() {
    const PROCS: u32 = 4;
    // The test reads the agent's log (its failed dials).
    let mut gcs = Gcs::start_with("drops", &["--log-level=debug"]).await;

    async fn cycle(gcs: &mut Gcs, round: u32) {
        // Every other round the host goes entirely (its listener too), so the agent's dials
        // fail until it is back; otherwise only the connection breaks.
        let host_gone = round % 2 == 1;
        let conn = gcs.connect().await;
        let mut running = Vec::new();
        for k in 0..PROCS {
            let code = (round * PROCS + k) % 200;
            // Gated: none may exit (and have its wait answered on this connection) before
            // the bridge is dropped.
            let script = gated(5, code);
            let (pid, io) = gcs
                .exec_uvm(&conn, &["sh", "-c", &script], (true, true, false))
                .await;
            let (id, _) = conn.send(&wait_req(UVM, pid, bridge::INFINITE_WAIT)).await;
            running.push((pid, id, code, io));
        }
        // Drop the bridge while they run, then let them finish.
        let failures = gcs.log_count(DIAL_FAILED);
        if host_gone {
            gcs.close_bridge();
        }
        conn.close().await;
        if host_gone {
            gcs.log_grows(DIAL_FAILED, failures).await;
        }
        for (_, _, _, io) in running.iter_mut() {
            tokio::io::AsyncWriteExt::write_all(io.stdin.as_mut().unwrap(), b"go\n")
                .await
                .unwrap();
        }
        for (pid, _, _, io) in running.iter_mut() {
            assert_counter(&read_all(io.stdout.as_mut().unwrap()).await, 5);
            if host_gone {
                // Its exit is recorded while no bridge exists.
                gcs.exit_recorded(*pid).await;
            }
        }
        if host_gone {
            gcs.reopen_bridge().await;
        }
        let conn = gcs.accept().await;
        let adopted: Vec<_> = running
            .iter()
            .map(|(_, id, _, _)| conn.expect(*id))
            .collect();
        conn.negotiate().await;
        for ((pid, _, code, _), rx) in running.into_iter().zip(adopted) {
            let got = exit_code_of(within("an adopted wait", rx).await.unwrap());
            assert_eq!(got, code, "process {pid}");
        }
        conn.close().await;
    }

    // Warm up (thread pools, the spawner), then measure.
    cycle(&mut gcs, 0).await;
    let before = fds_and_threads(gcs.pid());
    let outages = gcs.log_count(DIAL_FAILED);
    for round in 1..=50 {
        cycle(&mut gcs, round).await;
    }
    // Each round that took the host away cost the agent at least one failed dial.
    assert!(gcs.log_count(DIAL_FAILED) >= outages + 25);
    let conn = gcs.connect().await;
    let (pid, _) = gcs.exec_uvm(&conn, &["true"], (false, false, false)).await;
    assert_eq!(wait_exit(&conn, UVM, pid).await, 0);
    let after = fds_and_threads(gcs.pid());
    eprintln!("agent fds/threads before {before:?} after {after:?}");
    // One more connection is open now than at the first measurement (which was taken with
    // none): allow exactly that.
    assert!(after.0 <= before.0 + 1, "fd leak: {before:?} -> {after:?}");
    // tokio's blocking pool may keep a thread or two parked for a few seconds.
    assert!(
        after.1 <= before.1 + 2,
        "thread leak: {before:?} -> {after:?}"
    );
    assert!(gcs.child.try_wait().unwrap().is_none(), "agent died");
}

/// A sink that fails after `budget` more bytes, to break a stdio connection on purpose.
struct Breaking<'a> {
    out: &'a mut Vec<u8>,
    budget: usize,
}

impl tokio::io::AsyncWrite for Breaking<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.budget == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other("host goes away")));
        }
        let n = buf.len().min(self.budget);
        self.out.extend_from_slice(&buf[..n]);
        self.budget -= n;
        std::task::Poll::Ready(Ok(n))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn resumable_stdout_survives_broken_connections_without_gaps_or_duplicates() {
    let mut gcs = Gcs::start("resume").await;
    let conn = gcs.connect().await;
    let caps = conn.negotiate().await;
    let caps = bridge::negotiate::GuestCapabilities::from_value(
        &caps.capabilities.guest_defined_capabilities,
    );
    assert_eq!(caps.ferry_resumable_stdio, 1);
    let port = gcs.alloc_port();
    let mut listener = gcs.transport.listen(port).await.unwrap();
    let params = ProcessParameters {
        command_args: vec!["sh".into(), "-c".into(), counter(300, 0)],
        create_std_out_pipe: true,
        ferry_resumable_stdio: true,
        ..Default::default()
    };
    let req = exec_req(
        UVM,
        params,
        StdioPorts {
            std_out: port,
            ..Default::default()
        },
    );
    let (_, rx) = conn.send(&req).await;
    let Response::ExecuteProcess(e) = within("exec", rx).await.unwrap() else {
        panic!()
    };
    let (wait_id, _) = conn
        .send(&wait_req(UVM, e.process_id, bridge::INFINITE_WAIT))
        .await;
    let adopted = conn.expect(wait_id);

    // Break the stdout connection every 200 bytes; each time the agent dials again and the
    // stream resumes where the host stopped.
    let mut receiver = transport::resumable::Receiver::new(0);
    let mut got = Vec::new();
    let mut breaks = 0;
    while !receiver.finished() {
        let s = within("the agent to (re)dial stdout", listener.accept())
            .await
            .unwrap();
        let mut sink = Breaking {
            out: &mut got,
            budget: 200,
        };
        if receiver.serve(s, &mut sink).await.is_err() {
            breaks += 1;
        }
    }
    assert!(breaks >= 5, "only {breaks} breaks");
    assert_counter(&got, 300);
    assert_eq!(exit_code_of(within("exit", adopted).await.unwrap()), 0);
}
