//! The guest connection against a scripted fake guest that misbehaves on purpose.

use bridge::io::read_frame;
use bridge::message::*;
use bridge::{Frame, Identifier, Rpc};
use host::{ConnectionOptions, GuestConnection, HostError};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, DuplexStream};
use transport::{Side, Transport};

const PATIENCE: Duration = Duration::from_secs(20);

fn transport() -> Transport {
    // Only used for stdio listening, which these tests do not do.
    Transport::hybrid_vsock("/nonexistent/ferry-test", Side::Host)
}

/// The guest end: reads requests, writes whatever the script says.
struct FakeGuest {
    io: DuplexStream,
}

impl FakeGuest {
    async fn recv(&mut self) -> Frame {
        tokio::time::timeout(PATIENCE, read_frame(&mut self.io, 1 << 20))
            .await
            .expect("host sent nothing")
            .expect("host frame")
    }

    async fn send(&mut self, msg: &Message, id: u64) {
        let bytes = msg.to_frame(id).unwrap().encode(u32::MAX).unwrap();
        self.io.write_all(&bytes).await.unwrap();
    }

    async fn answer_negotiation(&mut self) {
        let f = self.recv().await;
        assert_eq!(f.ident, Identifier::Request(Rpc::NegotiateProtocol));
        assert_eq!(f.id, 0, "negotiation is the first request, id 0");
        let answer = bridge::negotiate::guest_answer(&Default::default());
        self.send(
            &Message::Response(Response::NegotiateProtocol(answer)),
            f.id,
        )
        .await;
    }
}

async fn connected(options: ConnectionOptions) -> (GuestConnection, FakeGuest) {
    let (host_end, guest_end) = tokio::io::duplex(1 << 20);
    let mut guest = FakeGuest { io: guest_end };
    let (conn, ()) = tokio::join!(
        GuestConnection::connect(transport(), Box::new(host_end), options),
        guest.answer_negotiation()
    );
    (conn.expect("negotiated"), guest)
}

fn wait(pid: u32) -> Request {
    Request::WaitForProcess(WaitForProcessRequest {
        base: RequestBase::for_container("c"),
        process_id: pid,
        timeout_in_ms: bridge::INFINITE_WAIT,
    })
}

fn exited(code: u32) -> Message {
    Message::Response(Response::WaitForProcess(WaitForProcessResponse {
        base: ResponseBase::ok(),
        exit_code: code,
    }))
}

fn code_of(r: Result<Response, HostError>) -> u32 {
    match r.expect("call succeeds") {
        Response::WaitForProcess(w) => w.exit_code,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn responses_in_any_order_reach_their_callers() {
    let (conn, mut guest) = connected(ConnectionOptions::default()).await;
    let mut receivers = Vec::new();
    for pid in 1..=3 {
        receivers.push(conn.send(&wait(pid)).await.unwrap());
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        let f = guest.recv().await;
        let Message::Request(Request::WaitForProcess(w)) = Message::from_frame(&f).unwrap() else {
            panic!()
        };
        ids.push((f.id, w.process_id));
    }
    // ids were allocated in send order, after the negotiation's 0
    assert_eq!(ids.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 3]);
    for (id, pid) in ids.into_iter().rev() {
        guest.send(&exited(pid * 10), id).await;
    }
    for (pid, (_, rx)) in (1..=3).zip(receivers) {
        assert_eq!(code_of(conn.await_reply(rx).await), pid * 10);
    }
}

#[tokio::test]
async fn strays_are_dropped_and_the_connection_survives() {
    let (conn, mut guest) = connected(ConnectionOptions::default()).await;
    let mut notes = conn.subscribe("known");
    // A response for an id nobody asked for, a notification for an unknown container, and a
    // request (guests serve no requests from hosts... nor hosts from guests).
    guest.send(&exited(1), 777).await;
    let note = |c: &str| ContainerNotification {
        base: RequestBase::for_container(c),
        kind: "UnexpectedExit".into(),
        operation: "None".into(),
        result: 1,
        result_info: None,
    };
    guest
        .send(&Message::Notification(note("stranger")), 0)
        .await;
    guest.send(&Message::Request(wait(5)), 9).await;
    guest.send(&Message::Notification(note("known")), 0).await;
    let got = tokio::time::timeout(PATIENCE, notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.base.container_id, "known");
    assert_eq!(conn.dropped_frames(), 3);
    // Still serving.
    let (id, rx) = conn.send(&wait(4)).await.unwrap();
    assert_eq!(guest.recv().await.id, id);
    guest.send(&exited(4), id).await;
    assert_eq!(code_of(conn.await_reply(rx).await), 4);
    assert!(conn.closed_reason().is_none());
}

#[tokio::test]
async fn a_response_of_the_wrong_type_does_not_complete_a_call() {
    let (conn, mut guest) = connected(ConnectionOptions::default()).await;
    let (id, rx) = conn.send(&wait(1)).await.unwrap();
    guest.recv().await;
    // An ExecuteProcess answer under the wait's id: dropped, the wait stays pending.
    let wrong = Message::Response(Response::ExecuteProcess(ExecuteProcessResponse {
        base: ResponseBase::ok(),
        process_id: 1,
    }));
    guest.send(&wrong, id).await;
    guest.send(&exited(2), id).await;
    assert_eq!(code_of(conn.await_reply(rx).await), 2);
    assert_eq!(conn.dropped_frames(), 1);
}

/// A guest that takes a request and never answers: the call fails, saying which and after how
/// long, and the connection goes on (the late answer is dropped). On a paused clock: the
/// 60 s pass at once.
#[tokio::test(start_paused = true)]
async fn a_call_the_guest_never_answers_fails_after_the_call_timeout() {
    let (conn, mut guest) = connected(ConnectionOptions::default()).await;
    let signal = |pid| {
        Request::SignalProcess(SignalProcessRequest {
            base: RequestBase::for_container("c"),
            process_id: pid,
            options: None,
        })
    };
    let started = tokio::time::Instant::now();
    let (answer, taken) = tokio::join!(conn.call(signal(7)), guest.recv());
    let err = answer.expect_err("no answer came");
    assert!(matches!(err, HostError::NoAnswer(_)), "{err:?}");
    let m = err.message();
    assert!(m.contains("SignalProcess") && m.contains("60 s"), "{m}");
    assert!(started.elapsed() >= ConnectionOptions::default().call_timeout);
    // The answer arrives after all: nobody waits for it any more.
    let ok = Message::Response(Response::SignalProcess(ResponseBase::ok().into()));
    guest.send(&ok, taken.id).await;
    // The next call is answered as usual.
    let (answer, ()) = tokio::join!(conn.call(signal(8)), async {
        let f = guest.recv().await;
        guest.send(&ok, f.id).await;
    });
    answer.expect("answered");
    assert_eq!(conn.dropped_frames(), 1, "the late answer was dropped");
    assert!(conn.closed_reason().is_none());
}

#[tokio::test]
async fn failures_become_typed_errors() {
    let (conn, mut guest) = connected(ConnectionOptions::default()).await;
    for (code, check) in [
        (
            bridge::hresult::E_NOT_FOUND,
            (|e: &HostError| matches!(e, HostError::NotFound(_))) as fn(&HostError) -> bool,
        ),
        (bridge::hresult::VM_SYSTEM_NOT_FOUND, |e| {
            matches!(e, HostError::ContainerNotFound(_))
        }),
        (bridge::hresult::E_NOT_IMPL, |e| {
            matches!(e, HostError::NotImplemented(_))
        }),
        (bridge::hresult::E_FAIL, |e| {
            matches!(e, HostError::Guest { .. })
        }),
    ] {
        let (id, rx) = conn.send(&wait(1)).await.unwrap();
        guest.recv().await;
        let f = Response::error_frame(Rpc::WaitForProcess, id, code, "nope");
        guest.io.write_all(&f.encode(65536).unwrap()).await.unwrap();
        let e = conn.await_reply(rx).await.unwrap_err();
        assert!(check(&e), "{code:#x} gave {e:?}");
        assert!(e.to_string().contains("nope"));
    }
}

#[tokio::test]
async fn an_oversized_frame_closes_the_connection_with_a_clear_error() {
    let options = ConnectionOptions {
        max_frame_size: 4096,
        ..Default::default()
    };
    let (conn, mut guest) = connected(options).await;
    let (_, rx) = conn.send(&wait(1)).await.unwrap();
    guest.recv().await;
    let big = Frame {
        ident: Identifier::Response(Rpc::WaitForProcess),
        id: 1,
        body: vec![b' '; 10_000],
    };
    guest
        .io
        .write_all(&big.encode(u32::MAX).unwrap())
        .await
        .unwrap();
    let e = conn.await_reply(rx).await.unwrap_err();
    assert!(matches!(e, HostError::ConnectionClosed(_)), "{e:?}");
    assert!(e.to_string().contains("exceeds the limit of 4096"), "{e}");
    let reason = tokio::time::timeout(PATIENCE, conn.closed()).await.unwrap();
    assert!(reason.contains("bad frame"), "{reason}");
    // New calls fail at once rather than hanging.
    assert!(matches!(
        conn.call(wait(2)).await,
        Err(HostError::ConnectionClosed(_))
    ));
}

#[tokio::test]
async fn a_header_claiming_a_huge_body_closes_the_connection_at_once() {
    let (conn, mut guest) = connected(ConnectionOptions::default()).await;
    let (_, rx) = conn.send(&wait(1)).await.unwrap();
    guest.recv().await;
    // 1 GiB announced, a few bytes sent, then silence: the host must not wait for the rest.
    let header = bridge::Header {
        raw_type: Identifier::CONTAINER_NOTIFICATION.to_u32(),
        size: 1 << 30,
        id: 0,
    };
    guest.io.write_all(&header.encode()).await.unwrap();
    guest.io.write_all(b"{\"ContainerId\":").await.unwrap();
    let e = tokio::time::timeout(PATIENCE, conn.await_reply(rx))
        .await
        .expect("the host waited for a body it will never use")
        .unwrap_err();
    assert!(e.to_string().contains("exceeds the limit"), "{e}");
}

#[tokio::test]
async fn a_notification_flood_for_a_known_container_is_bounded() {
    let options = ConnectionOptions {
        notification_queue: 4,
        ..Default::default()
    };
    let (conn, mut guest) = connected(options).await;
    let mut notes = conn.subscribe("known");
    let note = |n: i32| ContainerNotification {
        base: RequestBase::for_container("known"),
        kind: "UnexpectedExit".into(),
        operation: "None".into(),
        result: n,
        result_info: None,
    };
    for n in 0..1000 {
        guest.send(&Message::Notification(note(n)), 0).await;
    }
    // The connection is still served (so the flood has been read), and only the first few
    // notifications were kept.
    let (id, rx) = conn.send(&wait(4)).await.unwrap();
    assert_eq!(guest.recv().await.id, id);
    guest.send(&exited(4), id).await;
    assert_eq!(code_of(conn.await_reply(rx).await), 4);
    assert_eq!(conn.dropped_frames(), 996);
    for n in 0..4 {
        assert_eq!(notes.recv().await.unwrap().result, n);
    }
    assert!(
        notes.try_recv().is_none(),
        "more than the queue's bound kept"
    );
    // Once read, the queue takes notifications again.
    guest.send(&Message::Notification(note(7)), 0).await;
    assert_eq!(
        tokio::time::timeout(PATIENCE, notes.recv())
            .await
            .unwrap()
            .unwrap()
            .result,
        7
    );
}

#[tokio::test]
async fn notifications_kept_unread_are_bounded_in_bytes_across_containers() {
    let options = ConnectionOptions {
        notification_bytes: 16 * 1024,
        ..Default::default()
    };
    let (conn, mut guest) = connected(options).await;
    let mut a = conn.subscribe("a");
    let b = conn.subscribe("b");
    // ~4.1 KiB each: three fit in the budget, whichever containers they are for.
    let fat = |c: &str| ContainerNotification {
        base: RequestBase::for_container(c),
        kind: "x".repeat(4000),
        operation: "None".into(),
        result: 0,
        result_info: None,
    };
    for c in ["a", "a", "b", "b", "a", "b", "a", "b"] {
        guest.send(&Message::Notification(fat(c)), 0).await;
    }
    let (id, rx) = conn.send(&wait(1)).await.unwrap();
    assert_eq!(guest.recv().await.id, id);
    guest.send(&exited(1), id).await;
    conn.await_reply(rx).await.unwrap();
    assert_eq!(conn.dropped_frames(), 5);
    // Read ones give their bytes back; a dropped receiver gives back what it had queued.
    assert!(a.try_recv().is_some() && a.try_recv().is_some() && a.try_recv().is_none());
    drop(b);
    for c in ["a", "a", "a"] {
        guest.send(&Message::Notification(fat(c)), 0).await;
    }
    for _ in 0..3 {
        tokio::time::timeout(PATIENCE, a.recv())
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(conn.dropped_frames(), 5);
}

#[tokio::test]
async fn a_failed_negotiation_hangs_up_on_the_guest() {
    for answer in [
        // Refused.
        br#"{"Result":-2147467259,"ErrorMessage":"no"}"#.to_vec(),
        // Success, with capabilities that are not an object.
        br#"{"Result":0,"Version":4,"Capabilities":"nonsense"}"#.to_vec(),
        // A version nobody offered.
        br#"{"Result":0,"Version":5}"#.to_vec(),
    ] {
        let (host_end, guest_end) = tokio::io::duplex(1 << 16);
        let mut guest = FakeGuest { io: guest_end };
        let respond = async {
            let f = guest.recv().await;
            let frame = Frame {
                ident: Identifier::Response(Rpc::NegotiateProtocol),
                id: f.id,
                body: answer.clone(),
            };
            guest
                .io
                .write_all(&frame.encode(65536).unwrap())
                .await
                .unwrap();
        };
        let (r, ()) = tokio::join!(
            GuestConnection::connect(transport(), Box::new(host_end), Default::default()),
            respond
        );
        assert!(
            r.is_err(),
            "connected after {:?}",
            String::from_utf8_lossy(&answer)
        );
        // The host hung up: the guest reads the end of the stream, not silence.
        let end = tokio::time::timeout(PATIENCE, read_frame(&mut guest.io, 1 << 20))
            .await
            .expect("the host kept the connection open after a failed negotiation");
        assert!(end.is_err());
    }
}

#[tokio::test]
async fn a_guest_that_never_answers_negotiation_times_out() {
    let (host_end, guest_end) = tokio::io::duplex(1 << 16);
    let options = ConnectionOptions {
        negotiate_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let r = GuestConnection::connect(transport(), Box::new(host_end), options).await;
    let Err(e) = r else {
        panic!("connected without negotiating")
    };
    assert!(matches!(e, HostError::Timeout(_)), "{e:?}");
    assert!(e.to_string().contains("negotiation"), "{e}");
    drop(guest_end);
}

#[tokio::test]
async fn ports_and_ids_only_rise_and_adopted_calls_get_their_answers() {
    let (conn, mut guest) = connected(ConnectionOptions::default()).await;
    assert_eq!(conn.allocate_port().unwrap(), bridge::FIRST_STDIO_PORT);
    assert_eq!(conn.allocate_port().unwrap(), bridge::FIRST_STDIO_PORT + 1);
    conn.set_next_port(0x4000_0100);
    conn.set_next_port(0x4000_0010); // lower: ignored
    assert_eq!(conn.next_port(), 0x4000_0100);
    assert_eq!(conn.allocate_port().unwrap(), 0x4000_0100);

    assert_eq!(conn.next_id(), 1);
    conn.seed_next_id(500);
    conn.seed_next_id(20); // lower: ignored
    assert_eq!(conn.next_id(), 500);

    // Adopt id 42 (a wait a previous host sent) without sending anything.
    let adopted = conn.register_pending(42, Rpc::WaitForProcess).unwrap();
    assert!(conn.register_pending(42, Rpc::WaitForProcess).is_err());
    let (id, rx) = conn.send(&wait(9)).await.unwrap();
    assert_eq!(id, 500);
    assert_eq!(guest.recv().await.id, 500, "the adopted id was not sent");
    guest.send(&exited(7), 42).await;
    guest.send(&exited(9), 500).await;
    assert_eq!(code_of(conn.await_reply(adopted).await), 7);
    assert_eq!(code_of(conn.await_reply(rx).await), 9);
}
