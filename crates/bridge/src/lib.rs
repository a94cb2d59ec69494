//! The GCS bridge protocol, version 4, as spoken between hcsshim's host side and its Linux guest
//! agent (GCS) — and between ferry's host side and `ferry-gcs`.
//!
//! This crate is the wire and nothing else: no sockets, no processes.
//!
//! * [`frame`] — the 16-byte little-endian header (`type`, `size`, `id`) and the JSON body;
//! * [`ident`] — the bit layout of `type` and every v4 message identifier;
//! * [`hresult`] — result codes as named constants;
//! * [`message`] — typed request, response and notification payloads with hcsshim's JSON names;
//! * [`json_string`] — fields that carry JSON inside a JSON string;
//! * [`negotiate`] — protocol negotiation and capabilities;
//! * [`io`] (feature `tokio`) — reading and writing frames on an async byte stream.

pub mod frame;
pub mod hresult;
pub mod ident;
#[cfg(feature = "tokio")]
pub mod io;
pub mod json_string;
pub mod message;
pub mod negotiate;

pub use frame::{DEFAULT_MAX_FRAME_SIZE, Frame, FrameError, HEADER_SIZE, Header};
pub use ident::{Identifier, Kind, Rpc};
pub use json_string::JsonString;

/// The vsock port the guest agent dials to reach the host's bridge.
pub const BRIDGE_PORT: u32 = 0x4000_0000;
/// The first port the host hands out for stdio pipes; ports below it (and the bridge port) are
/// never valid stdio ports.
pub const FIRST_STDIO_PORT: u32 = 0x4000_0001;
/// The container id that names the utility VM itself: requests for it run in the UVM, not in a
/// container.
pub const UVM_CONTAINER_ID: &str = "00000000-0000-0000-0000-000000000000";
/// `TimeoutInMs` value meaning "wait forever".
pub const INFINITE_WAIT: u32 = 0xffff_ffff;

/// True when `port` may name a stdio pipe: inside the range the host allocates from.
pub fn is_valid_stdio_port(port: u32) -> bool {
    (FIRST_STDIO_PORT..u32::MAX).contains(&port)
}

/// Why a container id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("container id is empty")]
    Empty,
    #[error("container id is {len} bytes long; at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error(
        "container id {id:?} contains {what}; ids may use letters, digits, '-', '_' and '.', must start with a letter or digit, and may not contain \"..\""
    )]
    BadCharacter { id: String, what: &'static str },
}

/// Longest container id accepted (ids become directory names in the guest).
pub const MAX_CONTAINER_ID_LEN: usize = 128;

/// Validates a container id that will be used as a path component in the guest.
pub fn validate_container_id(id: &str) -> Result<(), InvalidId> {
    if id.is_empty() {
        return Err(InvalidId::Empty);
    }
    if id.len() > MAX_CONTAINER_ID_LEN {
        return Err(InvalidId::TooLong {
            len: id.len(),
            max: MAX_CONTAINER_ID_LEN,
        });
    }
    let shown = || id.chars().take(MAX_CONTAINER_ID_LEN).collect::<String>();
    if id.contains("..") {
        return Err(InvalidId::BadCharacter {
            id: shown(),
            what: "\"..\"",
        });
    }
    if id.contains('/') {
        return Err(InvalidId::BadCharacter {
            id: shown(),
            what: "'/'",
        });
    }
    let first_ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !first_ok || !rest_ok {
        return Err(InvalidId::BadCharacter {
            id: shown(),
            what: "a character outside [A-Za-z0-9._-]",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        assert!(validate_container_id(UVM_CONTAINER_ID).is_ok());
        assert!(validate_container_id("web-1.a_b").is_ok());
        assert_eq!(validate_container_id(""), Err(InvalidId::Empty));
        for bad in [
            "a/b", "..", "a..b", "../etc", ".hidden", "-x", "a b", "a\0b", "é",
        ] {
            assert!(validate_container_id(bad).is_err(), "{bad:?} accepted");
        }
        let long = "a".repeat(MAX_CONTAINER_ID_LEN + 1);
        assert!(matches!(
            validate_container_id(&long),
            Err(InvalidId::TooLong { .. })
        ));
    }

    #[test]
    fn stdio_port_range() {
        assert!(!is_valid_stdio_port(0));
        assert!(!is_valid_stdio_port(BRIDGE_PORT));
        assert!(!is_valid_stdio_port(1024));
        assert!(is_valid_stdio_port(FIRST_STDIO_PORT));
        assert!(is_valid_stdio_port(0xffff_fffe));
        assert!(!is_valid_stdio_port(u32::MAX));
    }
}
