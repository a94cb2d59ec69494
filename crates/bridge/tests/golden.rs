//! Golden vectors: frames built by hand, byte for byte, the way hcsshim's host and Linux GCS put
//! them on the wire. Each is decoded, checked field by field, re-encoded, and compared byte for
//! byte (where our field order matches Go's: everywhere but inside an OCI spec, see Create).

use bridge::message::*;
use bridge::{Frame, Rpc, hresult};
use serde_json::Value;

const Z: &str = "00000000-0000-0000-0000-000000000000";
/// A non-zero activity id, to tell an echoed one from a default.
const A: &str = "6b1c2b8e-5f43-4d0a-9a0e-2f0d7c1e9a31";

fn wire(raw_type: u32, id: u64, body: &str) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&raw_type.to_le_bytes());
    v.extend_from_slice(&((16 + body.len()) as u32).to_le_bytes());
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(body.as_bytes());
    v
}

/// Decodes `body` under `raw_type` both with and without hcsshim's trailing newline, and checks
/// both give the same message.
fn decode_both(raw_type: u32, id: u64, body: &str) -> Message {
    let bytes = wire(raw_type, id, body);
    let frame = Frame::decode(&bytes, 64 * 1024).expect("decodes");
    assert_eq!(frame.ident.to_u32(), raw_type);
    assert_eq!(frame.id, id);
    let msg = Message::from_frame(&frame).expect("parses");

    let with_newline = wire(raw_type, id, &format!("{body}\n"));
    let msg2 = Message::from_frame(&Frame::decode(&with_newline, 64 * 1024).unwrap()).unwrap();
    assert_eq!(msg, msg2, "trailing newline changed the meaning");
    msg
}

/// [`decode_both`], then checks that re-encoding gives back the exact bytes.
fn golden(raw_type: u32, id: u64, body: &str) -> Message {
    let bytes = wire(raw_type, id, body);
    let msg = decode_both(raw_type, id, body);
    let again = msg.to_frame(id).unwrap().encode(64 * 1024).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&again[16..]),
        body,
        "re-encoded body differs"
    );
    assert_eq!(again, bytes, "re-encoded frame differs");
    msg
}

/// [`decode_both`], for a body whose re-encoding can match only up to key order: checks the
/// re-encoded frame decodes to the same message and carries the same JSON, the `double_encoded`
/// top-level fields compared after decoding their strings (so nothing is dropped or added).
fn golden_up_to_key_order(raw_type: u32, id: u64, body: &str, double_encoded: &[&str]) -> Message {
    let msg = decode_both(raw_type, id, body);
    let again = Frame::decode(
        &msg.to_frame(id).unwrap().encode(64 * 1024).unwrap(),
        64 * 1024,
    )
    .expect("re-encoded frame decodes");
    assert_eq!((again.ident.to_u32(), again.id), (raw_type, id));
    assert_eq!(Message::from_frame(&again).unwrap(), msg, "round trip");

    let as_json = |bytes: &[u8]| {
        let mut v: Value = serde_json::from_slice(bytes).unwrap();
        for key in double_encoded {
            let inner = v[*key].as_str().expect("a string of JSON");
            v[*key] = serde_json::from_str(inner).unwrap();
        }
        v
    };
    // Value's maps compare regardless of key order.
    assert_eq!(
        as_json(&again.body),
        as_json(body.as_bytes()),
        "re-encoded JSON differs"
    );
    msg
}

#[test]
fn negotiate_protocol() {
    let body =
        format!(r#"{{"ContainerId":"","ActivityId":"{Z}","MinimumVersion":4,"MaximumVersion":4}}"#);
    let Message::Request(Request::NegotiateProtocol(r)) = golden(0x10100b01, 0, &body) else {
        panic!()
    };
    assert_eq!((r.minimum_version, r.maximum_version), (4, 4));

    let body = r#"{"Result":0,"Version":4,"Capabilities":{"SupportedSchemaVersions":[{"Major":2,"Minor":1}],"RuntimeOsType":"Linux","GuestDefinedCapabilities":{"NamespaceAddRequestSupported":false,"SignalProcessSupported":true,"DumpStacksSupported":true,"DeleteContainerStateSupported":true}}}"#;
    let Message::Response(Response::NegotiateProtocol(r)) = golden(0x20100b01, 0, body) else {
        panic!()
    };
    assert_eq!(r.version, 4);
    assert_eq!(r.capabilities.runtime_os_type, "Linux");
    let caps = bridge::negotiate::GuestCapabilities::from_value(
        &r.capabilities.guest_defined_capabilities,
    );
    assert!(caps.signal_process_supported && !caps.ferry_exit_records);
}

#[test]
fn create_with_double_encoded_oci_spec() {
    // As hcsshim's host writes it: Go's field order in the spec, and Go's HTML-safe escaping
    // (`&` as `\u0026`) in the inner JSON. Neither survives a re-encoding byte for byte:
    // oci-spec writes `root` and `mounts` before `process` and writes `&` as is. So this one is
    // compared as JSON (key order aside), with the inner string decoded.
    let config = r#"{"SchemaVersion":{"Major":2,"Minor":1},"OciBundlePath":"/run/gcs/c/web","OciSpecification":{"ociVersion":"1.1.0","process":{"terminal":false,"user":{"uid":0,"gid":0},"args":["/bin/sh","-c","echo hi \u0026\u0026 true"],"cwd":"/"},"root":{"path":"rootfs"}},"ScratchDirPath":"/run/scratch/web"}"#;
    let body = format!(
        r#"{{"ContainerId":"web","ActivityId":"{Z}","ContainerConfig":{}}}"#,
        serde_json::to_string(config).unwrap()
    );
    assert!(
        body.contains(r#"\"OciBundlePath\""#),
        "config is a string of JSON"
    );
    let Message::Request(Request::Create(c)) =
        golden_up_to_key_order(0x10100101, 7, &body, &["ContainerConfig"])
    else {
        panic!()
    };
    assert_eq!(c.base.container_id, "web");
    assert_eq!(c.base.activity_id, Z);
    assert!(c.supported_versions.is_none());
    let cfg = &c.container_config.0;
    assert_eq!(cfg.schema_version, SchemaVersion { major: 2, minor: 1 });
    assert_eq!(cfg.oci_bundle_path, "/run/gcs/c/web");
    assert_eq!(cfg.scratch_dir_path, "/run/scratch/web");
    let spec = cfg.oci_specification.as_ref().unwrap();
    assert_eq!(spec.version(), "1.1.0");
    assert_eq!(
        spec.root().as_ref().unwrap().path(),
        std::path::Path::new("rootfs")
    );
    let process = spec.process().as_ref().unwrap();
    assert_eq!(process.terminal(), Some(false));
    assert_eq!(process.cwd(), std::path::Path::new("/"));
    let args = process.args().as_ref().unwrap();
    assert_eq!(args, &["/bin/sh", "-c", "echo hi && true"]);
    // Re-encoding keeps the double encoding.
    let again = Request::Create(c).to_frame(7).unwrap();
    let outer: Value = serde_json::from_slice(&again.body).unwrap();
    assert!(outer["ContainerConfig"].is_string());

    golden(0x20100101, 7, r#"{"Result":0,"SelectedProtocolVersion":4}"#);
}

#[test]
fn lifecycle_requests_with_only_common_fields() {
    for (raw, rpc) in [
        (0x10100201, Rpc::Start),
        (0x10100301, Rpc::ShutdownGraceful),
        (0x10100401, Rpc::ShutdownForced),
        (0x10100c01, Rpc::DumpStacks),
        (0x10100d01, Rpc::DeleteContainerState),
    ] {
        let body = format!(r#"{{"ContainerId":"web","ActivityId":"{Z}"}}"#);
        let Message::Request(r) = golden(raw, 3, &body) else {
            panic!()
        };
        assert_eq!(r.rpc(), rpc);
        assert_eq!(r.base().container_id, "web");
        if rpc != Rpc::DumpStacks {
            golden(raw + 0x1000_0000, 3, r#"{"Result":0}"#);
        }
    }
    let Message::Response(Response::DumpStacks(d)) =
        golden(0x20100c01, 3, r#"{"Result":0,"GuestStacks":"goroutine 1"}"#)
    else {
        panic!()
    };
    assert_eq!(d.guest_stacks, "goroutine 1");
}

#[test]
fn execute_process() {
    let params = r#"{"CommandArgs":["sh","-c","cat"],"WorkingDirectory":"/","Environment":{"PATH":"/bin"},"EmulateConsole":true,"CreateStdInPipe":true,"CreateStdOutPipe":true,"CreateInUtilityVM":true}"#;
    let body = format!(
        r#"{{"ContainerId":"{Z}","ActivityId":"{Z}","Settings":{{"ProcessParameters":{},"VsockStdioRelaySettings":{{"StdIn":1073741825,"StdOut":1073741826}}}}}}"#,
        serde_json::to_string(params).unwrap()
    );
    let Message::Request(Request::ExecuteProcess(e)) = golden(0x10100501, 11, &body) else {
        panic!()
    };
    let p = &e.settings.process_parameters.0;
    assert_eq!(p.command_args, ["sh", "-c", "cat"]);
    assert!(p.emulate_console && p.create_std_in_pipe && p.create_std_out_pipe);
    assert!(!p.create_std_err_pipe);
    assert!(p.create_in_utility_vm);
    assert_eq!(p.environment["PATH"], "/bin");
    let ports = e.settings.vsock_stdio_relay_settings;
    assert_eq!(
        (ports.std_in, ports.std_out, ports.std_err),
        (0x40000001, 0x40000002, 0)
    );

    let Message::Response(Response::ExecuteProcess(r)) =
        golden(0x20100501, 11, r#"{"Result":0,"ProcessId":4242}"#)
    else {
        panic!()
    };
    assert_eq!(r.process_id, 4242);

    // hcsshim's host schema spells the flag "CreateInUtilityVm": accepted too.
    let p: ProcessParameters = serde_json::from_str(r#"{"CreateInUtilityVm":true}"#).unwrap();
    assert!(p.create_in_utility_vm);
}

#[test]
fn wait_signal_resize() {
    let body = format!(
        r#"{{"ContainerId":"web","ActivityId":"{Z}","ProcessId":42,"TimeoutInMs":4294967295}}"#
    );
    let Message::Request(Request::WaitForProcess(w)) = golden(0x10100601, 12, &body) else {
        panic!()
    };
    assert_eq!((w.process_id, w.timeout_in_ms), (42, bridge::INFINITE_WAIT));
    let Message::Response(Response::WaitForProcess(w)) =
        golden(0x20100601, 12, r#"{"Result":0,"ExitCode":137}"#)
    else {
        panic!()
    };
    assert_eq!(w.exit_code, 137);

    let body = format!(
        r#"{{"ContainerId":"web","ActivityId":"{Z}","ProcessId":42,"Options":{{"Signal":15}}}}"#
    );
    let Message::Request(Request::SignalProcess(s)) = golden(0x10100701, 13, &body) else {
        panic!()
    };
    assert_eq!(s.options.unwrap().signal, 15);

    let body = format!(
        r#"{{"ContainerId":"web","ActivityId":"{Z}","ProcessId":42,"Height":40,"Width":120}}"#
    );
    let Message::Request(Request::ResizeConsole(r)) = golden(0x10100801, 14, &body) else {
        panic!()
    };
    assert_eq!((r.height, r.width), (40, 120));
}

/// Success answers carrying only the common fields, as hcsshim's Linux GCS writes them: it echoes
/// the request's `ActivityId` in every response.
#[test]
fn responses_with_only_common_fields() {
    for (raw, rpc) in [
        (0x20100701, Rpc::SignalProcess),
        (0x20100801, Rpc::ResizeConsole),
        (0x20100a01, Rpc::ModifySettings),
    ] {
        let body = format!(r#"{{"Result":0,"ActivityId":"{A}"}}"#);
        let Message::Response(r) = golden(raw, 20, &body) else {
            panic!()
        };
        assert_eq!(r.rpc(), rpc);
        assert!(r.base().is_success());
        assert_eq!(r.base().activity_id.as_deref(), Some(A));
        assert_eq!(r.base().message(), "");
        assert!(r.base().error_records.is_empty());
    }
}

/// hcsshim's Linux GCS has no handler for UpdateContainer or LifecycleNotification and answers
/// "not implemented": the activity id, then the message both in `ErrorMessage` and in an error
/// record with the Go stack (its fields in the Linux GCS's order, `ActivityId` before
/// `ErrorMessage`).
#[test]
fn not_implemented_answers_from_the_linux_gcs() {
    for (raw, rpc) in [
        (0x20100e01u32, Rpc::UpdateContainer),
        (0x20100f01, Rpc::LifecycleNotification),
    ] {
        // The Linux GCS prints the request's type in decimal (its String() does not know these).
        let message = format!(
            "bridge: function not supported, header type: {}",
            raw - 0x1000_0000
        );
        let stack = r"github.com/Microsoft/hcsshim/internal/guest/bridge.UnknownMessage\n\t/src/internal/guest/bridge/bridge.go:45";
        let body = format!(
            r#"{{"Result":-2147467263,"ActivityId":"{A}","ErrorMessage":"{message}","ErrorRecords":[{{"Result":-2147467263,"Message":"{message}","StackTrace":"{stack}","ModuleName":"gcs","FileName":"bridge.go","Line":45,"FunctionName":"UnknownMessage"}}]}}"#
        );
        let Message::Response(r) = golden(raw, 21, &body) else {
            panic!()
        };
        assert_eq!(r.rpc(), rpc);
        let base = r.base();
        assert_eq!(base.result, hresult::E_NOT_IMPL);
        assert!(!base.is_success());
        assert_eq!(base.activity_id.as_deref(), Some(A));
        assert_eq!(base.message(), message);
        let [record] = base.error_records.as_slice() else {
            panic!("one error record: {:?}", base.error_records)
        };
        assert_eq!(record.result, hresult::E_NOT_IMPL);
        assert_eq!(record.message, message);
        assert_eq!(
            record.stack_trace.lines().collect::<Vec<_>>(),
            [
                "github.com/Microsoft/hcsshim/internal/guest/bridge.UnknownMessage",
                "\t/src/internal/guest/bridge/bridge.go:45"
            ]
        );
        assert_eq!(
            (
                record.module_name.as_str(),
                record.file_name.as_str(),
                record.line,
                record.function_name.as_str()
            ),
            ("gcs", "bridge.go", 45, "UnknownMessage")
        );
    }
}

#[test]
fn get_properties_double_encoded_both_ways() {
    let body = format!(
        r#"{{"ContainerId":"web","ActivityId":"{Z}","Query":"{{\"PropertyTypes\":[\"ProcessList\"]}}"}}"#
    );
    let Message::Request(Request::GetProperties(q)) = golden(0x10100901, 15, &body) else {
        panic!()
    };
    assert_eq!(q.query.0.property_types, ["ProcessList"]);
    let body =
        r#"{"Result":0,"Properties":"{\"ProcessList\":[{\"ProcessId\":1},{\"ProcessId\":7}]}"}"#;
    let Message::Response(Response::GetProperties(p)) = golden(0x20100901, 15, body) else {
        panic!()
    };
    let pids: Vec<u32> = p
        .properties
        .0
        .process_list
        .iter()
        .map(|d| d.process_id)
        .collect();
    assert_eq!(pids, [1, 7]);
}

#[test]
fn modify_and_update_keep_their_json() {
    let body = format!(
        r#"{{"ContainerId":"{Z}","ActivityId":"{Z}","Request":{{"ResourceType":"MappedVirtualDisk","RequestType":"Add","Settings":{{"MountPath":"/m","Lun":1}}}}}}"#
    );
    let Message::Request(Request::ModifySettings(m)) = golden(0x10100a01, 16, &body) else {
        panic!()
    };
    assert_eq!(m.resource_type(), Some("MappedVirtualDisk"));
    let body = format!(
        r#"{{"ContainerId":"web","ActivityId":"{Z}","Resources":{{"Memory":{{"Limit":1}}}}}}"#
    );
    golden(0x10100e01, 17, &body);
}

/// hcsshim defines no body for LifecycleNotification (it never sends one); the Windows HCS's
/// carries `Notification` (None, ColdStart, RestoreStart, Pause, Resume, Shutdown) and an
/// optional `NotificationData` of any shape. ferry keeps whatever follows the common fields.
#[test]
fn lifecycle_notification_request() {
    let body = format!(
        r#"{{"ContainerId":"web","ActivityId":"{A}","Notification":"RestoreStart","NotificationData":{{"Attempt":2}}}}"#
    );
    let msg = golden(0x10100f01, 18, &body);
    let Message::Request(Request::LifecycleNotification(n)) = &msg else {
        panic!()
    };
    assert_eq!(n.base.container_id, "web");
    assert_eq!(n.base.activity_id, A);
    // The common fields are not repeated among the rest.
    assert_eq!(
        n.rest.keys().collect::<Vec<_>>(),
        ["Notification", "NotificationData"]
    );
    assert_eq!(n.rest["Notification"], "RestoreStart");
    assert_eq!(n.rest["NotificationData"]["Attempt"], 2);

    // Key order carries no meaning (the HCS's serializer sorts members by name).
    let sorted = format!(
        r#"{{"ActivityId":"{A}","ContainerId":"web","Notification":"RestoreStart","NotificationData":{{"Attempt":2}}}}"#
    );
    assert_eq!(decode_both(0x10100f01, 18, &sorted), msg);
}

#[test]
fn container_notification() {
    let body = format!(
        r#"{{"ContainerId":"web","ActivityId":"{Z}","Type":"UnexpectedExit","Operation":"None","Result":137,"ResultInfo":"{{\"Reason\":\"killed\"}}"}}"#
    );
    let Message::Notification(n) = golden(0x30100101, 0, &body) else {
        panic!()
    };
    assert_eq!(n.base.container_id, "web");
    assert_eq!(n.kind, notification_type::UNEXPECTED_EXIT);
    assert_eq!(n.result, 137);
    assert_eq!(n.result_info.unwrap().0["Reason"], "killed");
    // hcsshim's Linux GCS sends an empty ResultInfo, or none at all
    let body = format!(
        r#"{{"ContainerId":"web","ActivityId":"{Z}","Type":"GracefulExit","Operation":"None","Result":0,"ResultInfo":""}}"#
    );
    let f = Frame::decode(&wire(0x30100101, 0, &body), 65536).unwrap();
    let Message::Notification(n) = Message::from_frame(&f).unwrap() else {
        panic!()
    };
    assert!(n.result_info.is_none());
}

#[test]
fn error_responses() {
    let body = r#"{"Result":-2147023728,"ErrorMessage":"process 9 not found","ErrorRecords":[{"Result":-2147023728,"Message":"process 9 not found","ModuleName":"ferry-gcs","FileName":"","Line":0}],"ExitCode":0}"#;
    let Message::Response(r) = golden(0x20100601, 21, body) else {
        panic!()
    };
    assert_eq!(r.base().result, hresult::E_NOT_FOUND);
    assert!(!r.base().is_success());
    assert_eq!(r.base().message(), "process 9 not found");
}

#[test]
fn bad_json_is_a_typed_error() {
    for body in [
        "{",
        "[]",
        r#"{"ContainerId":5}"#,
        r#"{"Settings":{"ProcessParameters":"{not json"}}"#,
    ] {
        let f = Frame::decode(&wire(0x10100501, 1, body), 65536).unwrap();
        let e = Message::from_frame(&f).unwrap_err();
        assert_eq!(e.hresult(), hresult::VM_INVALID_JSON, "{body}: {e}");
        assert_eq!(e.request_to_answer(), Some((1, 0x10100501)));
    }
}
