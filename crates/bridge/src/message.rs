//! Typed payloads of every v4 message, with hcsshim's exact JSON field names.
//!
//! Unknown fields are ignored on input (the protocol grows by adding fields), missing optional
//! fields take their defaults, and fields hcsshim omits when empty are omitted here too.

use crate::frame::{Frame, FrameError};
use crate::ident::{Identifier, Rpc};
use crate::json_string::{self, JsonString};
use oci_spec::runtime::{Process as OciProcess, Spec as OciSpec};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

#[cfg(test)]
use proptest::strategy::Strategy as _;
#[cfg(test)]
use proptest_derive::Arbitrary;

/// The all-zero GUID hcsshim sends when a request has no activity.
pub const ZERO_GUID: &str = "00000000-0000-0000-0000-000000000000";

fn zero_guid() -> String {
    ZERO_GUID.to_string()
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[cfg(test)]
pub(crate) mod strategies {
    use oci_spec::runtime::{Process as OciProcess, Root as OciRoot, Spec as OciSpec};
    use proptest::prelude::*;
    use serde_json::Value;

    /// Small JSON values (no floats: they do not round-trip bit-exactly through text).
    pub fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-zA-Z]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    pub fn opt_json() -> impl Strategy<Value = Option<Value>> {
        proptest::option::of(json().prop_filter("null means absent", |v| !v.is_null()))
    }

    /// Extra top-level fields of a generic request (never one of the common field names).
    pub fn extra_fields() -> impl Strategy<Value = std::collections::BTreeMap<String, Value>> {
        prop::collection::btree_map("x[a-z]{1,5}", json(), 0..3)
    }

    pub fn object() -> impl Strategy<Value = Value> {
        prop::collection::btree_map("[a-zA-Z]{1,6}", json(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    /// An OCI process: the crate's full default (capabilities, rlimits, no-new-privileges) or a
    /// bare one, with generated args, env, cwd, terminal and user. Built with setters rather
    /// than parsed from JSON, so that a field the codec drops shows up as a difference.
    pub fn oci_process() -> impl Strategy<Value = OciProcess> {
        (
            any::<bool>(),
            prop::collection::vec(".{0,8}", 1..4),
            proptest::option::of(prop::collection::vec("[A-Z]{1,4}=[ -~]{0,6}", 0..3)),
            "/[ -~]{0,8}",
            proptest::option::of(any::<bool>()),
            (
                any::<u32>(),
                any::<u32>(),
                proptest::option::of("[a-z]{1,8}"),
            ),
        )
            .prop_map(|(bare, args, env, cwd, terminal, (uid, gid, username))| {
                let mut p = OciProcess::default();
                if bare {
                    p.set_capabilities(None)
                        .set_rlimits(None)
                        .set_no_new_privileges(None);
                }
                p.set_args(Some(args))
                    .set_env(env)
                    .set_cwd(cwd.into())
                    .set_terminal(terminal);
                p.user_mut()
                    .set_uid(uid)
                    .set_gid(gid)
                    .set_username(username);
                p
            })
    }

    /// An OCI spec: the crate's default (mounts, Linux namespaces, masked paths...) or one without
    /// mounts and Linux section, with generated version, hostname, root, process, annotations.
    pub fn oci_spec() -> impl Strategy<Value = OciSpec> {
        (
            any::<bool>(),
            "1\\.[0-2]\\.[0-9]",
            proptest::option::of("[a-z][a-z0-9-]{0,8}"),
            proptest::option::of(("[ -~]{1,8}", proptest::option::of(any::<bool>()))),
            proptest::option::of(oci_process()),
            proptest::option::of(prop::collection::hash_map("[a-z.]{1,8}", ".{0,6}", 0..3)),
        )
            .prop_map(|(bare, version, hostname, root, process, annotations)| {
                let mut s = OciSpec::default();
                if bare {
                    s.set_mounts(None).set_linux(None);
                }
                let root = root.map(|(path, readonly)| {
                    let mut r = OciRoot::default();
                    r.set_path(path.into()).set_readonly(readonly);
                    r
                });
                s.set_version(version)
                    .set_hostname(hostname)
                    .set_root(root)
                    .set_process(process)
                    .set_annotations(annotations);
                s
            })
    }

    pub fn opt_oci_spec() -> impl Strategy<Value = Option<Box<OciSpec>>> {
        proptest::option::of(oci_spec().prop_map(Box::new))
    }

    pub fn opt_oci_process() -> impl Strategy<Value = Option<Box<OciProcess>>> {
        proptest::option::of(oci_process().prop_map(Box::new))
    }
}

// ---------------------------------------------------------------------------------------------
// Common parts

/// Fields every request (and the container notification) carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct RequestBase {
    #[serde(default)]
    pub container_id: String,
    #[serde(default = "zero_guid")]
    pub activity_id: String,
    /// OpenCensus span context, passed through untouched.
    #[serde(rename = "ocsc", default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, proptest(strategy = "strategies::opt_json()"))]
    pub span_context: Option<Value>,
}

impl Default for RequestBase {
    fn default() -> Self {
        RequestBase {
            container_id: String::new(),
            activity_id: zero_guid(),
            span_context: None,
        }
    }
}

impl RequestBase {
    pub fn for_container(id: impl Into<String>) -> Self {
        RequestBase {
            container_id: id.into(),
            ..Default::default()
        }
    }

    /// Reads just the common fields of a request body, for answering a request whose own fields
    /// failed to parse.
    pub fn peek(body: &[u8]) -> Option<RequestBase> {
        serde_json::from_slice(body).ok()
    }
}

/// One entry of a response's `ErrorRecords`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase", default)]
pub struct ErrorRecord {
    pub result: i32,
    pub message: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stack_trace: String,
    pub module_name: String,
    pub file_name: String,
    pub line: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub function_name: String,
}

/// Fields every response carries.
///
/// In the order hcsshim's Linux GCS writes them (`MessageResponseBase`: `ActivityId` before
/// `ErrorMessage`; the host's decoding struct has them the other way round, which no decoder
/// minds), so that an error answer from ferry-gcs matches the Linux GCS's byte for byte.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ResponseBase {
    /// An HRESULT; see [`crate::hresult`].
    pub result: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_id: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_records: Vec<ErrorRecord>,
}

impl ResponseBase {
    pub fn ok() -> Self {
        ResponseBase::default()
    }

    /// A failure with a message, also recorded as an error record as hcsshim's GCS does.
    pub fn error(result: i32, message: impl Into<String>) -> Self {
        let message = message.into();
        ResponseBase {
            result,
            error_records: vec![ErrorRecord {
                result,
                message: message.clone(),
                module_name: "ferry-gcs".into(),
                ..Default::default()
            }],
            error_message: message,
            activity_id: None,
        }
    }

    pub fn is_success(&self) -> bool {
        self.result >= 0
    }

    /// The best human-readable reason for a failure.
    pub fn message(&self) -> &str {
        if !self.error_message.is_empty() {
            &self.error_message
        } else {
            self.error_records
                .first()
                .map(|r| r.message.as_str())
                .unwrap_or("")
        }
    }
}

/// `{Major, Minor}` schema version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase", default)]
pub struct SchemaVersion {
    pub major: u32,
    pub minor: u32,
}

// ---------------------------------------------------------------------------------------------
// Requests

/// A request with nothing but the common fields: Start, ShutdownGraceful, ShutdownForced,
/// DumpStacks, DeleteContainerState.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct BaseRequest {
    #[serde(flatten)]
    pub base: RequestBase,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct NegotiateProtocolRequest {
    #[serde(flatten)]
    pub base: RequestBase,
    pub minimum_version: u32,
    pub maximum_version: u32,
}

/// `ContainerConfig` of a Create request (hcsshim's `VMHostedContainerSettingsV2`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default)]
    pub schema_version: SchemaVersion,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub oci_bundle_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, proptest(strategy = "strategies::opt_oci_spec()"))]
    pub oci_specification: Option<Box<OciSpec>>,
    #[serde(default)]
    pub scratch_dir_path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ContainerCreateRequest {
    #[serde(flatten)]
    pub base: RequestBase,
    pub container_config: JsonString<ContainerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, proptest(strategy = "strategies::opt_json()"))]
    pub supported_versions: Option<Value>,
}

/// What an ExecuteProcess request starts (hcsshim's `ProcessParameters`).
///
/// Three cases, as in hcsshim: a process in the UVM (`CreateInUtilityVM`, or the UVM's container
/// id), the first process of a container (no `OciProcess`: the container spec's process runs),
/// or another process in a running container (`OciProcess` set).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase", default)]
pub struct ProcessParameters {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub command_line: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command_args: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub working_directory: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(skip_serializing_if = "is_false")]
    pub emulate_console: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_size: Option<[u16; 2]>,
    #[serde(skip_serializing_if = "is_false")]
    pub create_std_in_pipe: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub create_std_out_pipe: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub create_std_err_pipe: bool,
    #[serde(
        rename = "CreateInUtilityVM",
        alias = "CreateInUtilityVm",
        skip_serializing_if = "is_false"
    )]
    pub create_in_utility_vm: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, proptest(strategy = "strategies::opt_oci_spec()"))]
    pub oci_specification: Option<Box<OciSpec>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, proptest(strategy = "strategies::opt_oci_process()"))]
    pub oci_process: Option<Box<OciProcess>>,
    /// ferry extension: carry this process's stdio as resumable streams (offsets, acks,
    /// re-dial after a break), when the guest announced `FerryResumableStdio`. A plain hcsshim
    /// host never sets it and gets raw byte streams.
    #[serde(rename = "FerryResumableStdio", skip_serializing_if = "is_false")]
    pub ferry_resumable_stdio: bool,
}

/// The ports the guest dials for a process's stdio (0 = no pipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase", default)]
pub struct StdioPorts {
    #[serde(skip_serializing_if = "is_zero")]
    pub std_in: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub std_out: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub std_err: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ExecuteProcessSettings {
    pub process_parameters: JsonString<ProcessParameters>,
    #[serde(default)]
    pub vsock_stdio_relay_settings: StdioPorts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ExecuteProcessRequest {
    #[serde(flatten)]
    pub base: RequestBase,
    pub settings: ExecuteProcessSettings,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct WaitForProcessRequest {
    #[serde(flatten)]
    pub base: RequestBase,
    pub process_id: u32,
    /// Milliseconds; [`crate::INFINITE_WAIT`] waits forever.
    #[serde(default = "infinite")]
    pub timeout_in_ms: u32,
}

fn infinite() -> u32 {
    crate::INFINITE_WAIT
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase", default)]
pub struct SignalProcessOptions {
    /// A Linux signal number; 0 means kill (SIGKILL).
    pub signal: i32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct SignalProcessRequest {
    #[serde(flatten)]
    pub base: RequestBase,
    pub process_id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<SignalProcessOptions>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ResizeConsoleRequest {
    #[serde(flatten)]
    pub base: RequestBase,
    pub process_id: u32,
    pub height: u16,
    pub width: u16,
}

/// The property types a GetProperties query may ask for.
pub mod property_type {
    pub const PROCESS_LIST: &str = "ProcessList";
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase", default)]
pub struct PropertyQuery {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub property_types: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct GetPropertiesRequest {
    #[serde(flatten)]
    pub base: RequestBase,
    pub query: JsonString<PropertyQuery>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ModifySettingsRequest {
    #[serde(flatten)]
    pub base: RequestBase,
    /// A `ModificationRequest` (`ResourceType`, `RequestType`, `Settings`), kept as JSON: its
    /// shape depends on the resource type.
    #[serde(default)]
    #[cfg_attr(test, proptest(strategy = "strategies::json()"))]
    pub request: Value,
}

impl ModifySettingsRequest {
    /// The `ResourceType` being modified, if the request names one.
    pub fn resource_type(&self) -> Option<&str> {
        self.request.get("ResourceType").and_then(Value::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct UpdateContainerRequest {
    #[serde(flatten)]
    pub base: RequestBase,
    #[serde(default)]
    #[cfg_attr(test, proptest(strategy = "strategies::json()"))]
    pub resources: Value,
}

/// LifecycleNotification requests: the common fields plus whatever else, kept as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct GenericRequest {
    #[serde(flatten)]
    pub base: RequestBase,
    #[serde(flatten)]
    #[cfg_attr(test, proptest(strategy = "strategies::extra_fields()"))]
    pub rest: BTreeMap<String, Value>,
}

// ---------------------------------------------------------------------------------------------
// Responses

/// Negotiation capabilities (hcsshim's `GcsCapabilities`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase", default)]
pub struct GcsCapabilities {
    #[serde(skip_serializing_if = "is_false")]
    pub send_host_create_message: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub send_host_start_message: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub hv_socket_config_on_startup: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub send_lifecycle_notifications: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub supported_schema_versions: Vec<SchemaVersion>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub runtime_os_type: String,
    /// Any JSON object, passed through to the host's clients. ferry puts its own extensions here
    /// (see [`crate::negotiate::GuestCapabilities`]).
    #[serde(skip_serializing_if = "Value::is_null")]
    #[cfg_attr(test, proptest(strategy = "strategies::object()"))]
    pub guest_defined_capabilities: Value,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct NegotiateProtocolResponse {
    #[serde(flatten)]
    pub base: ResponseBase,
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub capabilities: GcsCapabilities,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ContainerCreateResponse {
    #[serde(flatten)]
    pub base: ResponseBase,
    #[serde(default)]
    pub selected_protocol_version: u32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ExecuteProcessResponse {
    #[serde(flatten)]
    pub base: ResponseBase,
    #[serde(default)]
    pub process_id: u32,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct WaitForProcessResponse {
    #[serde(flatten)]
    pub base: ResponseBase,
    #[serde(default)]
    pub exit_code: u32,
}

/// One process in a GetProperties `ProcessList`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ProcessDetails {
    pub process_id: u32,
    /// The program (argv[0]); a ferry addition, ignored by hosts that do not know it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_name: String,
    /// Ferry additions, ignored by hosts that do not know them: the ports the process's
    /// resumable stdio streams re-dial, its command line and whether it has a terminal, so
    /// that a host which lost track of a process (killed between starting it and recording
    /// it) can take it over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ferry_stdio: Option<StdioPorts>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ferry_args: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ferry_terminal: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase", default)]
pub struct Properties {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub process_list: Vec<ProcessDetails>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct GetPropertiesResponse {
    #[serde(flatten)]
    pub base: ResponseBase,
    #[serde(default)]
    pub properties: JsonString<Properties>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct DumpStacksResponse {
    #[serde(flatten)]
    pub base: ResponseBase,
    #[serde(default)]
    pub guest_stacks: String,
}

// ---------------------------------------------------------------------------------------------
// Notifications

/// Values of a container notification's `Type`.
pub mod notification_type {
    pub const GRACEFUL_EXIT: &str = "GracefulExit";
    pub const FORCED_EXIT: &str = "ForcedExit";
    pub const UNEXPECTED_EXIT: &str = "UnexpectedExit";
    pub const NONE: &str = "None";
}

/// Values of a container notification's `Operation`.
pub mod active_operation {
    pub const NONE: &str = "None";
    pub const SHUTDOWN: &str = "Shutdown";
    pub const TERMINATE: &str = "Terminate";
}

/// Sent by the guest (type `0x30100101`, id 0) when a container's init process exits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub struct ContainerNotification {
    #[serde(flatten)]
    pub base: RequestBase,
    #[serde(rename = "Type")]
    pub kind: String,
    pub operation: String,
    /// The init process's exit code.
    pub result: i32,
    #[serde(
        default,
        with = "json_string::optional",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(strategies::json().prop_map(JsonString))")
    )]
    pub result_info: Option<JsonString<Value>>,
}

// ---------------------------------------------------------------------------------------------
// Dispatch by identifier

macro_rules! by_rpc {
    ($(#[$m:meta])* $name:ident, $kindfn:path, $base:ty, $basefield:ident, { $($rpc:ident => $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq)]
        pub enum $name {
            $($rpc($ty),)*
        }

        impl $name {
            pub fn rpc(&self) -> Rpc {
                match self {
                    $($name::$rpc(_) => Rpc::$rpc,)*
                }
            }

            pub fn base(&self) -> &$base {
                match self {
                    $($name::$rpc(m) => &m.$basefield,)*
                }
            }

            pub fn base_mut(&mut self) -> &mut $base {
                match self {
                    $($name::$rpc(m) => &mut m.$basefield,)*
                }
            }

            /// Parses a body of the given message.
            pub fn parse(rpc: Rpc, frame: &Frame) -> Result<Self, FrameError> {
                Ok(match rpc {
                    $(Rpc::$rpc => $name::$rpc(frame.parse()?),)*
                })
            }

            /// A frame carrying this payload under `id`.
            pub fn to_frame(&self, id: u64) -> Result<Frame, FrameError> {
                let ident = $kindfn(self.rpc());
                match self {
                    $($name::$rpc(m) => Frame::new(ident, id, m),)*
                }
            }
        }
    };
}

by_rpc!(
    /// A decoded request.
    Request, Identifier::Request, RequestBase, base, {
    Create => ContainerCreateRequest,
    Start => BaseRequest,
    ShutdownGraceful => BaseRequest,
    ShutdownForced => BaseRequest,
    ExecuteProcess => ExecuteProcessRequest,
    WaitForProcess => WaitForProcessRequest,
    SignalProcess => SignalProcessRequest,
    ResizeConsole => ResizeConsoleRequest,
    GetProperties => GetPropertiesRequest,
    ModifySettings => ModifySettingsRequest,
    NegotiateProtocol => NegotiateProtocolRequest,
    DumpStacks => BaseRequest,
    DeleteContainerState => BaseRequest,
    UpdateContainer => UpdateContainerRequest,
    LifecycleNotification => GenericRequest,
});

/// A response with nothing but the common fields.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct BaseResponse {
    #[serde(flatten)]
    pub base: ResponseBase,
}

impl From<ResponseBase> for BaseResponse {
    fn from(base: ResponseBase) -> Self {
        BaseResponse { base }
    }
}

by_rpc!(
    /// A decoded response.
    Response, Identifier::Response, ResponseBase, base, {
    Create => ContainerCreateResponse,
    Start => BaseResponse,
    ShutdownGraceful => BaseResponse,
    ShutdownForced => BaseResponse,
    ExecuteProcess => ExecuteProcessResponse,
    WaitForProcess => WaitForProcessResponse,
    SignalProcess => BaseResponse,
    ResizeConsole => BaseResponse,
    GetProperties => GetPropertiesResponse,
    ModifySettings => BaseResponse,
    NegotiateProtocol => NegotiateProtocolResponse,
    DumpStacks => DumpStacksResponse,
    DeleteContainerState => BaseResponse,
    UpdateContainer => BaseResponse,
    LifecycleNotification => BaseResponse,
});

/// Any decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Request(Request),
    Response(Response),
    Notification(ContainerNotification),
}

impl Message {
    /// Decodes a validated frame's body according to its identifier.
    pub fn from_frame(frame: &Frame) -> Result<Message, FrameError> {
        Ok(match frame.ident {
            Identifier::Request(rpc) => Message::Request(Request::parse(rpc, frame)?),
            Identifier::Response(rpc) => Message::Response(Response::parse(rpc, frame)?),
            Identifier::Notification(_) => Message::Notification(frame.parse()?),
        })
    }

    pub fn to_frame(&self, id: u64) -> Result<Frame, FrameError> {
        match self {
            Message::Request(r) => r.to_frame(id),
            Message::Response(r) => r.to_frame(id),
            Message::Notification(n) => Frame::new(Identifier::CONTAINER_NOTIFICATION, id, n),
        }
    }
}

impl Response {
    /// The response to request `id` of kind `rpc` carrying only the common fields (an error,
    /// typically). Every response type has defaults for its own fields, so this is valid for all
    /// of them.
    pub fn base_frame(rpc: Rpc, id: u64, base: &ResponseBase) -> Frame {
        Frame {
            ident: Identifier::Response(rpc),
            id,
            // ResponseBase always serialises.
            body: serde_json::to_vec(base).unwrap_or_default(),
        }
    }

    /// An error response to request `id`.
    pub fn error_frame(rpc: Rpc, id: u64, result: i32, message: impl Into<String>) -> Frame {
        Self::base_frame(rpc, id, &ResponseBase::error(result, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodes `msg` as a frame, decodes the bytes and checks the same message comes back.
    fn through_the_wire(msg: Message, id: u64) -> Result<(), TestCaseError> {
        let bytes = msg
            .to_frame(id)
            .and_then(|f| f.encode(u32::MAX))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let frame =
            Frame::decode(&bytes, u32::MAX).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(frame.id, id);
        let back = Message::from_frame(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, msg);
        Ok(())
    }

    macro_rules! round_trip {
        ($($test:ident: $ty:ty => $wrap:expr;)*) => {
            proptest! {
                #![proptest_config(ProptestConfig::with_cases(64))]
                $(
                    #[test]
                    fn $test(payload: $ty, id: u64) {
                        // plain JSON round trip
                        let text = serde_json::to_string(&payload).unwrap();
                        let back: $ty = serde_json::from_str(&text).unwrap();
                        prop_assert_eq!(&back, &payload);
                        // and as a whole frame under its identifier
                        through_the_wire($wrap(payload), id)?;
                    }
                )*
            }
        };
    }

    round_trip! {
        negotiate_req: NegotiateProtocolRequest => |p| Message::Request(Request::NegotiateProtocol(p));
        create_req: ContainerCreateRequest => |p| Message::Request(Request::Create(p));
        start_req: BaseRequest => |p| Message::Request(Request::Start(p));
        shutdown_graceful_req: BaseRequest => |p| Message::Request(Request::ShutdownGraceful(p));
        shutdown_forced_req: BaseRequest => |p| Message::Request(Request::ShutdownForced(p));
        exec_req: ExecuteProcessRequest => |p| Message::Request(Request::ExecuteProcess(p));
        wait_req: WaitForProcessRequest => |p| Message::Request(Request::WaitForProcess(p));
        signal_req: SignalProcessRequest => |p| Message::Request(Request::SignalProcess(p));
        resize_req: ResizeConsoleRequest => |p| Message::Request(Request::ResizeConsole(p));
        props_req: GetPropertiesRequest => |p| Message::Request(Request::GetProperties(p));
        modify_req: ModifySettingsRequest => |p| Message::Request(Request::ModifySettings(p));
        dump_req: BaseRequest => |p| Message::Request(Request::DumpStacks(p));
        delete_req: BaseRequest => |p| Message::Request(Request::DeleteContainerState(p));
        update_req: UpdateContainerRequest => |p| Message::Request(Request::UpdateContainer(p));
        lifecycle_req: GenericRequest => |p| Message::Request(Request::LifecycleNotification(p));
        negotiate_resp: NegotiateProtocolResponse => |p| Message::Response(Response::NegotiateProtocol(p));
        create_resp: ContainerCreateResponse => |p| Message::Response(Response::Create(p));
        start_resp: BaseResponse => |p| Message::Response(Response::Start(p));
        exec_resp: ExecuteProcessResponse => |p| Message::Response(Response::ExecuteProcess(p));
        wait_resp: WaitForProcessResponse => |p| Message::Response(Response::WaitForProcess(p));
        signal_resp: BaseResponse => |p| Message::Response(Response::SignalProcess(p));
        resize_resp: BaseResponse => |p| Message::Response(Response::ResizeConsole(p));
        modify_resp: BaseResponse => |p| Message::Response(Response::ModifySettings(p));
        update_resp: BaseResponse => |p| Message::Response(Response::UpdateContainer(p));
        lifecycle_resp: BaseResponse => |p| Message::Response(Response::LifecycleNotification(p));
        props_resp: GetPropertiesResponse => |p| Message::Response(Response::GetProperties(p));
        dump_resp: DumpStacksResponse => |p| Message::Response(Response::DumpStacks(p));
        notification: ContainerNotification => Message::Notification;
    }

    #[test]
    fn error_frames_parse_as_every_response_type() {
        for rpc in Rpc::ALL {
            let f = Response::error_frame(rpc, 42, crate::hresult::E_NOT_FOUND, "no such process");
            assert_eq!(f.id, 42);
            let Message::Response(r) = Message::from_frame(&f).unwrap() else {
                panic!("not a response")
            };
            assert_eq!(r.rpc(), rpc);
            assert_eq!(r.base().result, crate::hresult::E_NOT_FOUND);
            assert_eq!(r.base().message(), "no such process");
        }
    }
}
