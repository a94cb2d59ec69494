use crate::error::{GcsError, Result};
use bridge::message::{NegotiateProtocolRequest, Response};
use bridge::negotiate::{GuestCapabilities, NegotiationError, guest_answer, select_version};

/// What ferry-gcs tells the host it can do.
pub fn capabilities() -> GuestCapabilities {
    GuestCapabilities {
        namespace_add_request_supported: false,
        signal_process_supported: true,
        dump_stacks_supported: true,
        delete_container_state_supported: true,
        ferry_exit_records: true,
        ferry_resumable_stdio: 1,
    }
}

pub fn handle(req: &NegotiateProtocolRequest) -> Result<Response> {
    match select_version(req.minimum_version, req.maximum_version) {
        Ok(_) => Ok(Response::NegotiateProtocol(guest_answer(&capabilities()))),
        Err(e @ NegotiationError::Unsupported { .. }) => {
            Err(GcsError::UnsupportedVersion(e.to_string()))
        }
        Err(e @ NegotiationError::InvalidRange { .. }) => {
            Err(GcsError::UnsupportedVersion(e.to_string()))
        }
    }
}
