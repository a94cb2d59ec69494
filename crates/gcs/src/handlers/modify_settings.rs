use crate::error::{GcsError, Result};
use bridge::message::{BaseResponse, ModifySettingsRequest};

/// hcsshim uses ModifySettings to hot-plug disks, directories, network adapters and security
/// policy into a Linux UVM. ferry's UVMs get their storage at boot and do not hot-plug yet, so
/// every resource type is refused by name rather than silently accepted.
pub fn handle(req: &ModifySettingsRequest) -> Result<BaseResponse> {
    let what = req.resource_type().unwrap_or("(no ResourceType)");
    Err(GcsError::NotImplemented(format!(
        "ModifySettings for resource type {what:?} is not implemented by ferry-gcs"
    )))
}
