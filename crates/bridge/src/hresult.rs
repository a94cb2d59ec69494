//! Result codes (HRESULTs) carried in a response's `Result` field.
//!
//! The values are hcsshim's; they travel as signed 32-bit integers in JSON.

/// Success.
pub const S_OK: i32 = 0;
/// Element not found (`HRESULT_FROM_WIN32(ERROR_NOT_FOUND)`).
pub const E_NOT_FOUND: i32 = 0x8007_0490_u32 as i32;
/// Not implemented.
pub const E_NOT_IMPL: i32 = 0x8000_4001_u32 as i32;
/// Unspecified failure.
pub const E_FAIL: i32 = 0x8000_4005_u32 as i32;
/// Invalid argument.
pub const E_INVALID_ARG: i32 = 0x8007_0057_u32 as i32;
/// The operation timed out.
pub const VM_TIMEOUT: i32 = 0xC037_0109_u32 as i32;
/// A message of a type the receiver does not know.
pub const VM_UNKNOWN_MESSAGE: i32 = 0xC037_010B_u32 as i32;
/// The requested protocol version range is not supported.
pub const VM_UNSUPPORTED_PROTOCOL_VERSION: i32 = 0xC037_010C_u32 as i32;
/// The message body is not valid JSON for its type.
pub const VM_INVALID_JSON: i32 = 0xC037_010D_u32 as i32;
/// The compute system (container) does not exist.
pub const VM_SYSTEM_NOT_FOUND: i32 = 0xC037_010E_u32 as i32;
/// The compute system (container) already exists.
pub const VM_SYSTEM_ALREADY_EXISTS: i32 = 0xC037_010F_u32 as i32;

/// A short name for a known code, for logs and error messages.
pub fn name(code: i32) -> &'static str {
    match code {
        S_OK => "S_OK",
        E_NOT_FOUND => "E_NOT_FOUND",
        E_NOT_IMPL => "E_NOTIMPL",
        E_FAIL => "E_FAIL",
        E_INVALID_ARG => "E_INVALIDARG",
        VM_TIMEOUT => "HCS_E_TIMEOUT",
        VM_UNKNOWN_MESSAGE => "HCS_E_UNKNOWN_MESSAGE",
        VM_UNSUPPORTED_PROTOCOL_VERSION => "HCS_E_UNSUPPORTED_PROTOCOL_VERSION",
        VM_INVALID_JSON => "HCS_E_INVALID_JSON",
        VM_SYSTEM_NOT_FOUND => "HCS_E_SYSTEM_NOT_FOUND",
        VM_SYSTEM_ALREADY_EXISTS => "HCS_E_SYSTEM_ALREADY_EXISTS",
        _ => "unknown HRESULT",
    }
}

/// Formats a code the way Windows tools print it: `0x80070490 (E_NOT_FOUND)`.
pub fn describe(code: i32) -> String {
    format!("{:#010x} ({})", code as u32, name(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_hcsshim() {
        assert_eq!(E_NOT_FOUND as u32, 0x80070490);
        assert_eq!(E_NOT_IMPL as u32, 0x80004001);
        assert_eq!(E_FAIL as u32, 0x80004005);
        assert_eq!(VM_INVALID_JSON as u32, 0xC037010D);
        assert_eq!(VM_SYSTEM_NOT_FOUND as u32, 0xC037010E);
        assert_eq!(VM_UNSUPPORTED_PROTOCOL_VERSION as u32, 0xC037010C);
        assert_eq!(VM_TIMEOUT as u32, 0xC0370109);
        assert_eq!(VM_UNKNOWN_MESSAGE as u32, 0xC037010B);
        assert_eq!(describe(E_NOT_FOUND), "0x80070490 (E_NOT_FOUND)");
    }
}
