//! Protocol negotiation. Only version 4 exists; until a connection has negotiated it, every
//! other request is answered "not implemented".

use crate::message::{GcsCapabilities, NegotiateProtocolResponse, ResponseBase, SchemaVersion};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The one protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error(
        "no common protocol version: the peer offers {min}..={max}, this side speaks only {PROTOCOL_VERSION}"
    )]
    Unsupported { min: u32, max: u32 },
    #[error("invalid version range: minimum {min} is greater than maximum {max}")]
    InvalidRange { min: u32, max: u32 },
}

/// Picks the version for a `MinimumVersion..=MaximumVersion` offer.
pub fn select_version(min: u32, max: u32) -> Result<u32, NegotiationError> {
    if min > max {
        return Err(NegotiationError::InvalidRange { min, max });
    }
    if (min..=max).contains(&PROTOCOL_VERSION) {
        Ok(PROTOCOL_VERSION)
    } else {
        Err(NegotiationError::Unsupported { min, max })
    }
}

/// The guest-defined capabilities object: hcsshim's Linux GCS fields plus ferry's extensions.
/// A plain hcsshim host ignores the `Ferry*` fields; a ferry host uses them only when present.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct GuestCapabilities {
    pub namespace_add_request_supported: bool,
    pub signal_process_supported: bool,
    pub dump_stacks_supported: bool,
    pub delete_container_state_supported: bool,
    /// The guest keeps each process's exit record until a WaitForProcess has delivered it, so a
    /// host that re-subscribes after a reconnect gets the real exit code.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ferry_exit_records: bool,
    /// Version of ferry's resumable stdio streams (0 = not supported).
    #[serde(skip_serializing_if = "is_zero")]
    pub ferry_resumable_stdio: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl GuestCapabilities {
    /// Reads the capabilities from a negotiation answer; anything unreadable counts as "none".
    pub fn from_value(v: &Value) -> GuestCapabilities {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The successful answer a Linux guest gives to a negotiation.
pub fn guest_answer(caps: &GuestCapabilities) -> NegotiateProtocolResponse {
    NegotiateProtocolResponse {
        base: ResponseBase::ok(),
        version: PROTOCOL_VERSION,
        capabilities: GcsCapabilities {
            supported_schema_versions: vec![SchemaVersion { major: 2, minor: 1 }],
            runtime_os_type: "Linux".into(),
            guest_defined_capabilities: caps.to_value(),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_selection() {
        assert_eq!(select_version(4, 4), Ok(4));
        assert_eq!(select_version(1, 9), Ok(4));
        assert_eq!(
            select_version(1, 3),
            Err(NegotiationError::Unsupported { min: 1, max: 3 })
        );
        assert_eq!(
            select_version(5, 7),
            Err(NegotiationError::Unsupported { min: 5, max: 7 })
        );
        assert_eq!(
            select_version(5, 4),
            Err(NegotiationError::InvalidRange { min: 5, max: 4 })
        );
    }

    #[test]
    fn capabilities_round_trip_and_tolerate_garbage() {
        let caps = GuestCapabilities {
            signal_process_supported: true,
            ferry_exit_records: true,
            ferry_resumable_stdio: 1,
            ..Default::default()
        };
        let answer = guest_answer(&caps);
        let text = serde_json::to_string(&answer).unwrap();
        assert!(text.contains(r#""RuntimeOsType":"Linux""#), "{text}");
        assert!(text.contains(r#""FerryExitRecords":true"#), "{text}");
        let back: crate::message::NegotiateProtocolResponse = serde_json::from_str(&text).unwrap();
        assert_eq!(
            GuestCapabilities::from_value(&back.capabilities.guest_defined_capabilities),
            caps
        );
        // hcsshim's guest sends only its own fields: no ferry extensions.
        let plain = serde_json::json!({"SignalProcessSupported": true});
        let got = GuestCapabilities::from_value(&plain);
        assert!(got.signal_process_supported && !got.ferry_exit_records);
        assert_eq!(
            GuestCapabilities::from_value(&serde_json::json!(7)),
            GuestCapabilities::default()
        );
    }
}
