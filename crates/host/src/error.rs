//! Errors of the host side, typed so callers can match on what went wrong.

use bridge::hresult;

#[derive(Debug, Clone, thiserror::Error)]
pub enum HostError {
    /// The guest does not know the process (or other object) named.
    #[error("not found: {0}")]
    NotFound(String),
    /// The guest does not know the container named.
    #[error("container not found: {0}")]
    ContainerNotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not implemented by the guest: {0}")]
    NotImplemented(String),
    /// The guest reported a timeout (a wait with a time limit that ran out).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The guest did not answer a call in time (see `ConnectionOptions::call_timeout`).
    #[error("no answer: {0}")]
    NoAnswer(String),
    #[error("protocol version not supported: {0}")]
    UnsupportedVersion(String),
    /// Any other failure the guest reported.
    #[error("guest error {}: {message}", hresult::describe(*.code))]
    Guest { code: i32, message: String },
    /// The bridge connection is gone; every outstanding call fails with this.
    #[error("guest connection closed: {0}")]
    ConnectionClosed(String),
    /// The guest broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("transport: {0}")]
    Transport(String),
    #[error("{0}")]
    Io(String),
}

impl HostError {
    /// Maps a failed response's result code and message to a typed error.
    pub fn from_result(code: i32, message: &str) -> HostError {
        let m = message.to_string();
        match code {
            hresult::E_NOT_FOUND => HostError::NotFound(m),
            hresult::VM_SYSTEM_NOT_FOUND => HostError::ContainerNotFound(m),
            hresult::VM_SYSTEM_ALREADY_EXISTS => HostError::AlreadyExists(m),
            hresult::E_INVALID_ARG => HostError::InvalidArgument(m),
            hresult::E_NOT_IMPL => HostError::NotImplemented(m),
            hresult::VM_TIMEOUT => HostError::Timeout(m),
            hresult::VM_UNSUPPORTED_PROTOCOL_VERSION => HostError::UnsupportedVersion(m),
            _ => HostError::Guest { code, message: m },
        }
    }

    /// The guest's own message (or this error's text), without the category prefix: for
    /// errors shown to people, who do not need the HRESULT.
    pub fn message(&self) -> String {
        match self {
            HostError::NotFound(m)
            | HostError::ContainerNotFound(m)
            | HostError::AlreadyExists(m)
            | HostError::InvalidArgument(m)
            | HostError::NotImplemented(m)
            | HostError::Timeout(m)
            | HostError::NoAnswer(m)
            | HostError::UnsupportedVersion(m)
            | HostError::Guest { message: m, .. } => m.clone(),
            other => other.to_string(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            HostError::NotFound(_) | HostError::ContainerNotFound(_)
        )
    }
}

impl From<transport::TransportError> for HostError {
    fn from(e: transport::TransportError) -> Self {
        HostError::Transport(e.to_string())
    }
}

pub type Result<T, E = HostError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_codes_become_typed_errors() {
        assert!(matches!(
            HostError::from_result(hresult::E_NOT_FOUND, "x"),
            HostError::NotFound(_)
        ));
        assert!(matches!(
            HostError::from_result(hresult::VM_SYSTEM_NOT_FOUND, "x"),
            HostError::ContainerNotFound(_)
        ));
        assert!(matches!(
            HostError::from_result(hresult::E_NOT_IMPL, "x"),
            HostError::NotImplemented(_)
        ));
        let e = HostError::from_result(hresult::E_FAIL, "boom");
        assert_eq!(e.to_string(), "guest error 0x80004005 (E_FAIL): boom");
    }
}
