//! AF_VSOCK via tokio-vsock.

use std::io;
use std::time::Duration;

use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener, VsockStream};

use crate::{BoxStream, TransportError};

pub(crate) async fn dial(
    cid: u32,
    port: u32,
    timeout: Duration,
) -> Result<BoxStream, TransportError> {
    let what = || format!("vsock connect to cid {cid} port {port}");
    match tokio::time::timeout(timeout, VsockStream::connect(VsockAddr::new(cid, port))).await {
        Err(_) => Err(TransportError::ConnectTimeout { port, timeout }),
        Ok(Ok(stream)) => Ok(Box::new(stream)),
        Ok(Err(e)) => Err(classify(port, what(), e)),
    }
}

pub(crate) fn listen(port: u32) -> Result<VsockPortListener, TransportError> {
    match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)) {
        Ok(listener) => Ok(VsockPortListener { port, listener }),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(TransportError::AddrInUse { port }),
        Err(e) => Err(classify(port, format!("vsock listen on port {port}"), e)),
    }
}

/// Separates "this machine has no usable vsock" (no point retrying) from
/// ordinary connect failures.
fn classify(port: u32, what: String, e: io::Error) -> TransportError {
    match e.raw_os_error() {
        Some(libc_errno::EAFNOSUPPORT) => {
            TransportError::Unsupported(format!("{what}: AF_VSOCK is not available: {e}"))
        }
        Some(libc_errno::ENODEV) => TransportError::Unsupported(format!(
            "{what}: no vsock transport (no VM or vhost-vsock): {e}"
        )),
        _ => TransportError::connect(port, what, e),
    }
}

/// The two errno values we single out; spelled here to avoid a libc dependency.
mod libc_errno {
    pub(super) const ENODEV: i32 = 19;
    pub(super) const EAFNOSUPPORT: i32 = 97;
}

pub(crate) struct VsockPortListener {
    port: u32,
    listener: VsockListener,
}

impl VsockPortListener {
    pub(crate) async fn accept(&mut self) -> Result<BoxStream, TransportError> {
        match self.listener.accept().await {
            Ok((stream, _peer)) => Ok(Box::new(stream)),
            Err(e) => Err(TransportError::io(
                format!("vsock accept on port {}", self.port),
                e,
            )),
        }
    }
}
