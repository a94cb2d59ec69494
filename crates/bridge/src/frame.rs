//! Frames: a 16-byte little-endian header followed by a UTF-8 JSON body.
//!
//! ```text
//!  0..4   type  (u32, see [`crate::ident`])
//!  4..8   size  (u32, the whole frame, header included)
//!  8..16  id    (u64, the request id a response echoes; 0 for notifications)
//! ```

use crate::ident::{Identifier, UnknownType};
use serde::Serialize;

/// Size of the fixed header.
pub const HEADER_SIZE: usize = 16;
/// Default limit on a whole frame (header included), applied in both directions.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 64 * 1024;

/// A raw header, exactly as on the wire (not yet validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub raw_type: u32,
    pub size: u32,
    pub id: u64,
}

impl Header {
    pub fn decode(bytes: &[u8; HEADER_SIZE]) -> Header {
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[8..16]);
        Header {
            raw_type: u32_at(0),
            size: u32_at(4),
            id: u64::from_le_bytes(id),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..4].copy_from_slice(&self.raw_type.to_le_bytes());
        out[4..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out
    }

    /// Checks the size against the header length and `max_frame_size`, then the type. The size
    /// is checked first: when it is wrong the stream cannot be trusted, whatever the type says.
    pub fn validate(&self, max_frame_size: u32) -> Result<Identifier, FrameError> {
        if (self.size as usize) < HEADER_SIZE {
            return Err(FrameError::TooSmall {
                size: self.size,
                raw_type: self.raw_type,
                id: self.id,
            });
        }
        if self.size > max_frame_size {
            return Err(FrameError::TooLarge {
                size: self.size,
                limit: max_frame_size,
                raw_type: self.raw_type,
                id: self.id,
            });
        }
        Identifier::from_u32(self.raw_type).map_err(|UnknownType { raw }| FrameError::UnknownType {
            raw_type: raw,
            id: self.id,
        })
    }

    /// Length of the body that follows the header (0 when the size is invalid).
    pub fn body_len(&self) -> usize {
        (self.size as usize).saturating_sub(HEADER_SIZE)
    }
}

/// A frame whose header was validated; the body is still raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub ident: Identifier,
    pub id: u64,
    pub body: Vec<u8>,
}

/// Everything that can be wrong with a frame. Each variant keeps what is known of the header so
/// that a request can still be answered with an error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(
        "frame size {size} is smaller than the {HEADER_SIZE}-byte header (type {raw_type:#010x}, id {id})"
    )]
    TooSmall { size: u32, raw_type: u32, id: u64 },
    #[error(
        "frame size {size} exceeds the limit of {limit} bytes (type {raw_type:#010x}, id {id})"
    )]
    TooLarge {
        size: u32,
        limit: u32,
        raw_type: u32,
        id: u64,
    },
    #[error("unknown message type {raw_type:#010x} (id {id})")]
    UnknownType { raw_type: u32, id: u64 },
    #[error("{ident} (id {id}): body is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 {
        ident: Identifier,
        id: u64,
        offset: usize,
    },
    #[error("{ident} (id {id}): body is not valid JSON for this message: {reason}")]
    InvalidJson {
        ident: Identifier,
        id: u64,
        reason: String,
    },
    #[error("{ident} (id {id}): encoded frame would be {size} bytes, over the limit of {limit}")]
    EncodeTooLarge {
        ident: Identifier,
        id: u64,
        size: usize,
        limit: u32,
    },
}

impl FrameError {
    /// True when the byte stream can no longer be parsed after this error (the frame boundary is
    /// lost), so the connection must be closed after answering.
    pub fn is_stream_fatal(&self) -> bool {
        matches!(self, FrameError::TooSmall { .. })
    }

    /// The request id and raw type this error is about, when the frame was a request (so that an
    /// error response can be sent back).
    pub fn request_to_answer(&self) -> Option<(u64, u32)> {
        let (raw_type, id) = match *self {
            FrameError::TooSmall { raw_type, id, .. }
            | FrameError::TooLarge { raw_type, id, .. }
            | FrameError::UnknownType { raw_type, id } => (raw_type, id),
            FrameError::InvalidUtf8 { ident, id, .. }
            | FrameError::InvalidJson { ident, id, .. } => (ident.to_u32(), id),
            FrameError::EncodeTooLarge { .. } => return None,
        };
        crate::ident::raw_is_request(raw_type).then_some((id, raw_type))
    }

    /// The result code that answers this error.
    pub fn hresult(&self) -> i32 {
        use crate::hresult::*;
        match self {
            FrameError::UnknownType { .. } => VM_UNKNOWN_MESSAGE,
            FrameError::InvalidUtf8 { .. } | FrameError::InvalidJson { .. } => VM_INVALID_JSON,
            FrameError::TooSmall { .. } | FrameError::TooLarge { .. } => E_INVALID_ARG,
            FrameError::EncodeTooLarge { .. } => E_FAIL,
        }
    }
}

impl Frame {
    /// Builds a frame whose body is `payload` as JSON.
    pub fn new<T: Serialize + ?Sized>(
        ident: Identifier,
        id: u64,
        payload: &T,
    ) -> Result<Frame, FrameError> {
        let body = serde_json::to_vec(payload).map_err(|e| FrameError::InvalidJson {
            ident,
            id,
            reason: e.to_string(),
        })?;
        Ok(Frame { ident, id, body })
    }

    /// Decodes a frame from a complete buffer (header and body), as a fuzzer or a test would.
    pub fn decode(bytes: &[u8], max_frame_size: u32) -> Result<Frame, FrameError> {
        let head: &[u8; HEADER_SIZE] =
            match bytes.get(..HEADER_SIZE).and_then(|h| h.try_into().ok()) {
                Some(h) => h,
                None => {
                    return Err(FrameError::TooSmall {
                        size: bytes.len() as u32,
                        raw_type: 0,
                        id: 0,
                    });
                }
            };
        let header = Header::decode(head);
        let ident = header.validate(max_frame_size)?;
        let body = &bytes[HEADER_SIZE..];
        if body.len() != header.body_len() {
            // A buffer that disagrees with its own header is a truncated (or padded) frame.
            return Err(FrameError::TooSmall {
                size: bytes.len() as u32,
                raw_type: header.raw_type,
                id: header.id,
            });
        }
        Ok(Frame {
            ident,
            id: header.id,
            body: body.to_vec(),
        })
    }

    /// The body as text, checked for UTF-8.
    pub fn text(&self) -> Result<&str, FrameError> {
        std::str::from_utf8(&self.body).map_err(|e| FrameError::InvalidUtf8 {
            ident: self.ident,
            id: self.id,
            offset: e.valid_up_to(),
        })
    }

    /// Parses the body as `T`. Trailing whitespace (hcsshim's encoder adds a newline) is accepted.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, FrameError> {
        let text = self.text()?;
        serde_json::from_str(text).map_err(|e| FrameError::InvalidJson {
            ident: self.ident,
            id: self.id,
            reason: e.to_string(),
        })
    }

    /// Header plus body, refusing to produce a frame over `max_frame_size`.
    pub fn encode(&self, max_frame_size: u32) -> Result<Vec<u8>, FrameError> {
        let size = HEADER_SIZE + self.body.len();
        if size > max_frame_size as usize {
            return Err(FrameError::EncodeTooLarge {
                ident: self.ident,
                id: self.id,
                size,
                limit: max_frame_size,
            });
        }
        let header = Header {
            raw_type: self.ident.to_u32(),
            size: size as u32,
            id: self.id,
        };
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&self.body);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::Rpc;

    fn raw(raw_type: u32, size: u32, id: u64, body: &[u8]) -> Vec<u8> {
        let mut v = Header { raw_type, size, id }.encode().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn header_is_little_endian() {
        let h = Header {
            raw_type: 0x10100101,
            size: 0x20,
            id: 0x0102030405060708,
        };
        assert_eq!(
            h.encode(),
            [
                0x01, 0x01, 0x10, 0x10, 0x20, 0, 0, 0, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02,
                0x01
            ]
        );
        assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn bad_sizes_and_types() {
        let e = Frame::decode(&raw(0x10100101, 8, 3, b""), 1024).unwrap_err();
        assert!(matches!(e, FrameError::TooSmall { size: 8, id: 3, .. }));
        assert!(e.is_stream_fatal());
        assert_eq!(e.request_to_answer(), Some((3, 0x10100101)));

        let e = Frame::decode(&raw(0x10100101, 2048, 4, b"{}"), 1024).unwrap_err();
        assert!(matches!(
            e,
            FrameError::TooLarge {
                size: 2048,
                limit: 1024,
                ..
            }
        ));
        assert!(!e.is_stream_fatal());

        let e = Frame::decode(&raw(0x10109901, 18, 5, b"{}"), 1024).unwrap_err();
        assert_eq!(
            e,
            FrameError::UnknownType {
                raw_type: 0x10109901,
                id: 5
            }
        );
        assert_eq!(e.hresult(), crate::hresult::VM_UNKNOWN_MESSAGE);

        // truncated: header promises more than the buffer holds
        let e = Frame::decode(&raw(0x10100101, 40, 6, b"{}"), 1024).unwrap_err();
        assert!(matches!(e, FrameError::TooSmall { .. }));
        assert!(Frame::decode(&[1, 2, 3], 1024).is_err());
    }

    #[test]
    fn body_checks() {
        let f = Frame::decode(&raw(0x10100601, 18, 1, b"\xff{"), 1024).unwrap();
        assert!(matches!(
            f.text(),
            Err(FrameError::InvalidUtf8 { offset: 0, .. })
        ));
        let f = Frame::decode(&raw(0x10100601, 19, 1, b"{x}"), 1024).unwrap();
        let e = f.parse::<serde_json::Value>().unwrap_err();
        assert_eq!(e.hresult(), crate::hresult::VM_INVALID_JSON);
    }

    #[test]
    fn encode_respects_limit() {
        let f = Frame {
            ident: Identifier::Response(Rpc::GetProperties),
            id: 9,
            body: vec![b' '; 100],
        };
        assert!(f.encode(116).is_ok());
        assert!(matches!(
            f.encode(115),
            Err(FrameError::EncodeTooLarge { size: 116, .. })
        ));
    }
}
