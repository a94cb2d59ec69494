//! Errors a request handler returns, each mapped to the result code hcsshim uses for it.

use bridge::hresult;

#[derive(Debug, thiserror::Error)]
pub enum GcsError {
    /// A process (or other object inside a container) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The container named by the request does not exist.
    #[error("{0}")]
    SystemNotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotImplemented(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    UnsupportedVersion(String),
    #[error("{0}")]
    Failed(String),
}

impl GcsError {
    pub fn hresult(&self) -> i32 {
        match self {
            GcsError::NotFound(_) => hresult::E_NOT_FOUND,
            GcsError::SystemNotFound(_) => hresult::VM_SYSTEM_NOT_FOUND,
            GcsError::AlreadyExists(_) => hresult::VM_SYSTEM_ALREADY_EXISTS,
            GcsError::InvalidArgument(_) => hresult::E_INVALID_ARG,
            GcsError::NotImplemented(_) => hresult::E_NOT_IMPL,
            GcsError::Timeout(_) => hresult::VM_TIMEOUT,
            GcsError::UnsupportedVersion(_) => hresult::VM_UNSUPPORTED_PROTOCOL_VERSION,
            GcsError::Failed(_) => hresult::E_FAIL,
        }
    }

    pub fn container_not_found(id: &str) -> GcsError {
        GcsError::SystemNotFound(format!("container {id:?} not found"))
    }

    pub fn process_not_found(pid: u32) -> GcsError {
        GcsError::NotFound(format!("process {pid} not found"))
    }
}

impl From<bridge::InvalidId> for GcsError {
    fn from(e: bridge::InvalidId) -> Self {
        GcsError::InvalidArgument(e.to_string())
    }
}

pub type Result<T, E = GcsError> = std::result::Result<T, E>;
