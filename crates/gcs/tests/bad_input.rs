//! A host that sends garbage: every bad frame or request gets the right result code and a
//! message, and the agent keeps serving afterwards.

mod support;

use bridge::hresult;
use bridge::message::*;
use bridge::{UVM_CONTAINER_ID as UVM, hresult::describe};
use support::*;

const Z: &str = "00000000-0000-0000-0000-000000000000";

fn expect_code(r: &Response, code: i32, needle: &str) {
    expect_base(r.base(), code, needle)
}

fn expect_base(b: &ResponseBase, code: i32, needle: &str) {
    assert_eq!(
        b.result,
        code,
        "want {} got {}: {}",
        describe(code),
        describe(b.result),
        b.message()
    );
    assert!(
        b.message().contains(needle),
        "message {:?} lacks {needle:?}",
        b.message()
    );
}

/// Proves the agent still serves: a process runs to completion.
async fn still_serving(gcs: &Gcs, conn: &Conn) {
    let (pid, _) = gcs.exec_uvm(conn, &["true"], (false, false, false)).await;
    assert_eq!(wait_exit(conn, UVM, pid).await, 0);
}

#[tokio::test]
async fn requests_before_negotiation_and_bad_versions() {
    let mut gcs = Gcs::start("neg").await;
    let conn = gcs.accept().await;
    let r = conn.call(wait_req(UVM, 1, 0)).await;
    expect_code(&r, hresult::E_NOT_IMPL, "NegotiateProtocol");

    for (min, max) in [(1, 3), (5, 9), (6, 2)] {
        let r = conn
            .call(Request::NegotiateProtocol(NegotiateProtocolRequest {
                base: RequestBase::default(),
                minimum_version: min,
                maximum_version: max,
            }))
            .await;
        expect_code(
            &r,
            hresult::VM_UNSUPPORTED_PROTOCOL_VERSION,
            &min.to_string(),
        );
    }
    // Still not negotiated after failures; then a good negotiation works.
    let r = conn.call(wait_req(UVM, 1, 0)).await;
    expect_code(&r, hresult::E_NOT_IMPL, "");
    let n = conn.negotiate().await;
    assert_eq!(n.version, 4);
    let caps = bridge::negotiate::GuestCapabilities::from_value(
        &n.capabilities.guest_defined_capabilities,
    );
    assert!(caps.ferry_exit_records && caps.signal_process_supported);
    still_serving(&gcs, &conn).await;
}

#[tokio::test]
async fn malformed_frames_are_answered_and_survived() {
    let mut gcs = Gcs::start("frames").await;
    let conn = gcs.connect().await;

    // Unknown message number; unknown category; bad version byte.
    for raw in [0x10109901u32, 0x10200101, 0x10100102] {
        let (t, r) = conn.call_raw(raw, b"{}").await;
        // Answered under its own type with the kind bits set to "response".
        assert_eq!(t, raw - 0x1000_0000 + 0x2000_0000);
        expect_base(&r, hresult::VM_UNKNOWN_MESSAGE, "unknown message type");
    }
    still_serving(&gcs, &conn).await;
}

#[tokio::test]
async fn bodies_that_are_not_json_or_not_utf8() {
    let mut gcs = Gcs::start("json").await;
    let conn = gcs.connect().await;
    let (_, r) = conn.call_raw(0x10100601, b"{not json").await;
    expect_base(&r, hresult::VM_INVALID_JSON, "not valid JSON");
    let (_, r) = conn.call_raw(0x10100601, b"\xff\xfe{}").await;
    expect_base(&r, hresult::VM_INVALID_JSON, "UTF-8");
    // Valid JSON, wrong shape: ProcessParameters must be a string of JSON.
    let body = format!(
        r#"{{"ContainerId":"{Z}","ActivityId":"{Z}","Settings":{{"ProcessParameters":{{}}}}}}"#
    );
    let (_, r) = conn.call_raw(0x10100501, body.as_bytes()).await;
    expect_base(&r, hresult::VM_INVALID_JSON, "");
    // With and without a trailing newline, a good body works.
    let body =
        format!(r#"{{"ContainerId":"{Z}","ActivityId":"{Z}","ProcessId":999999,"TimeoutInMs":0}}"#);
    let (_, r) = conn
        .call_raw(0x10100601, format!("{body}\n").as_bytes())
        .await;
    expect_base(&r, hresult::E_NOT_FOUND, "999999");
    still_serving(&gcs, &conn).await;
}

#[tokio::test]
async fn oversized_frame_is_refused_without_losing_the_stream() {
    let mut gcs = Gcs::start_with("big", &["--max-frame-size=4096"]).await;
    let conn = gcs.connect().await;
    let mut body = format!(r#"{{"ContainerId":"{Z}","ActivityId":"{Z}","Pad":""#).into_bytes();
    body.extend(std::iter::repeat_n(b'x', 10_000));
    body.extend_from_slice(b"\"}");
    let (_, r) = conn.call_raw(0x10100601, &body).await;
    expect_base(&r, hresult::E_INVALID_ARG, "exceeds the limit of 4096");
    // The next frame on the same connection is read correctly.
    still_serving(&gcs, &conn).await;
}

#[tokio::test]
async fn undersized_frame_closes_the_connection_and_the_agent_reconnects() {
    let mut gcs = Gcs::start("tiny").await;
    let conn = gcs.connect().await;
    let id = conn.alloc_id();
    let rx = conn.expect(id);
    let header = bridge::Header {
        raw_type: 0x10100601,
        size: 8,
        id,
    };
    conn.send_bytes(&header.encode()).await.unwrap();
    let r = within("answer to an undersized frame", rx).await.unwrap();
    expect_code(
        &r,
        hresult::E_INVALID_ARG,
        "smaller than the 16-byte header",
    );
    conn.wait_closed().await;
    // A fresh connection works.
    let conn = gcs.connect().await;
    still_serving(&gcs, &conn).await;
}

#[tokio::test]
async fn half_written_frame_then_close() {
    // The test reads the agent's log.
    let mut gcs = Gcs::start_with("half", &["--log-level=debug"]).await;
    let conn = gcs.connect().await;
    // Half of an exec: had the agent acted on a partial frame, a file would appear.
    let marker = gcs.dir.0.join("ran");
    let params = ProcessParameters {
        command_args: vec!["touch".into(), marker.to_str().unwrap().into()],
        ..Default::default()
    };
    let bytes = exec_req(UVM, params, StdioPorts::default())
        .to_frame(conn.alloc_id())
        .unwrap()
        .encode(65536)
        .unwrap();
    let half = bytes.len() / 2;
    conn.send_bytes(&bytes[..half]).await.unwrap();
    drop(conn);
    let conn = gcs.connect().await;
    // The agent logged the old connection's end (before it dialled again) and why.
    let why = format!(
        "connection closed in the middle of a frame ({half} of {} bytes read)",
        bytes.len()
    );
    assert!(gcs.log().contains(&why), "the log lacks {why:?}");
    still_serving(&gcs, &conn).await;
    assert!(!marker.exists(), "a half-written request was executed");
    assert!(conn.strays.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_answer_over_the_frame_limit_becomes_an_error_and_the_agent_goes_on() {
    const LIMIT: u32 = 1024;
    let mut gcs = Gcs::start_with("bigout", &[&format!("--max-frame-size={LIMIT}")]).await;
    let conn = gcs.connect().await;
    let list = || conn.call(process_list_req(UVM));
    // Each process adds its command line to the list; start them until the answer no longer
    // fits (the padding, $0 of the script, makes a few enough).
    let pad = "p".repeat(150);
    let mut pids = Vec::new();
    let refused = loop {
        assert!(pids.len() < 20, "20 processes still fit in {LIMIT} bytes");
        let (pid, _) = gcs
            .exec_uvm(
                &conn,
                &["sh", "-c", "exec sleep 1000", &pad],
                (false, false, false),
            )
            .await;
        pids.push(pid);
        let r = list().await;
        if r.base().result != 0 {
            break r;
        }
        let Response::GetProperties(p) = r else {
            panic!()
        };
        assert_eq!(p.properties.0.process_list.len(), pids.len());
    };
    assert!(pids.len() > 1, "even one process did not fit");
    expect_code(
        &refused,
        hresult::E_FAIL,
        &format!("over the limit of {LIMIT}"),
    );
    // The connection and the agent go on; once the list is short again it is answered.
    still_serving(&gcs, &conn).await;
    for &pid in &pids[1..] {
        ok(&conn.call(signal_req(UVM, pid, 9)).await);
        assert_eq!(wait_exit(&conn, UVM, pid).await, 137);
    }
    let listed: Vec<u32> = process_list(&conn, UVM)
        .await
        .iter()
        .map(|d| d.process_id)
        .collect();
    assert_eq!(listed, [pids[0]]);
}

#[tokio::test]
async fn bad_ids_and_ports() {
    let mut gcs = Gcs::start("ids").await;
    let conn = gcs.connect().await;
    // As hcsshim's GCS: in an unknown container, the container is what is missing.
    let r = conn.call(wait_req("nosuch", 1, 0)).await;
    expect_code(&r, hresult::VM_SYSTEM_NOT_FOUND, "\"nosuch\"");
    let r = conn.call(signal_req("nosuch", 1, 9)).await;
    expect_code(&r, hresult::VM_SYSTEM_NOT_FOUND, "nosuch");
    for bad in ["../etc", "a/b", "x..y"] {
        let r = conn.call(signal_req(bad, 1, 9)).await;
        expect_code(&r, hresult::E_INVALID_ARG, "container id");
    }
    let r = conn.call(signal_req(UVM, 999_999, 9)).await;
    expect_code(&r, hresult::E_NOT_FOUND, "999999");

    // Stdio ports outside the allocated range (the bridge port itself, a low port).
    for port in [bridge::BRIDGE_PORT, 1024, u32::MAX] {
        let params = ProcessParameters {
            command_args: vec!["true".into()],
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
        let r = conn.call(req).await;
        expect_code(&r, hresult::E_INVALID_ARG, "outside the stdio port range");
    }
    // A port nobody listens on: a clear failure naming it.
    let params = ProcessParameters {
        command_args: vec!["true".into()],
        ..Default::default()
    };
    let port = gcs.alloc_port();
    let req = exec_req(
        UVM,
        params,
        StdioPorts {
            std_out: port,
            ..Default::default()
        },
    );
    let r = conn.call(req).await;
    expect_code(&r, hresult::E_FAIL, &format!("{port:#x}"));
    let r = conn
        .call(Request::ModifySettings(ModifySettingsRequest {
            base: base(UVM),
            request: serde_json::json!({"ResourceType": "MappedVirtualDisk", "RequestType": "Add"}),
        }))
        .await;
    expect_code(&r, hresult::E_NOT_IMPL, "MappedVirtualDisk");
    still_serving(&gcs, &conn).await;
}
