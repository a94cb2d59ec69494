//! Root filesystems copied into a QEMU guest.
//!
//! A container in a VM needs its root inside the VM. A host directory shared into the guest
//! would pin the VM to this host (a migration cannot take the share along); instead the client
//! streams the root as a tar and `tar -x`, run in the UVM itself, unpacks it under
//! [`GUEST_ROOTFS_DIR`]. The copy lives in guest memory and moves with it.
//!
//! Protocol (`Request::ImportRootfs`): reply `{"path": DIR}`, then the client sends the tar as
//! STDIN frames and STDIN_EOF; the shim answers with STDERR frames (tar's complaints, at most
//! [`MAX_STDERR`]) and EXIT (tar's exit code).

use super::Shim;
use super::backend::BackendKind;
use crate::control::{self, Reply, tag};
use bridge::message::ProcessParameters;
use host::{Container, Pipes};
use std::sync::Arc;
use tokio::io::BufReader;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Where imported roots live in the guest: `<dir>/<container>`.
pub const GUEST_ROOTFS_DIR: &str = "/containers";
/// tar's error output kept for the client.
const MAX_STDERR: usize = 64 * 1024;

pub async fn import(
    shim: Arc<Shim>,
    container: String,
    mut r: BufReader<OwnedReadHalf>,
    mut w: OwnedWriteHalf,
) {
    let started = start(&shim, &container).await;
    let (dir, process) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = control::write_line(&mut w, &Reply::error(e)).await;
            return;
        }
    };
    if control::write_line(&mut w, &Reply::ok(serde_json::json!({ "path": dir })))
        .await
        .is_err()
    {
        let _ = process.kill().await;
        return;
    }
    let (Some(mut stdin), Some(stderr)) = (process.take_stdin(), process.take_stderr()) else {
        let _ =
            control::write_frame(&mut w, tag::ERROR, b"the unpacking process has no pipes").await;
        return;
    };
    let complaints = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = stderr.copy_to(&mut all).await;
        all.truncate(MAX_STDERR);
        all
    });
    let mut payload = Vec::with_capacity(control::MAX_PAYLOAD);
    let fed = loop {
        let t = match control::read_frame_into(&mut r, &mut payload).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                break Err("the client went away before the end of the archive".to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => break Err(e.to_string()),
            Err(_) => {
                break Err("the client went away before the end of the archive".to_string());
            }
        };
        match t {
            tag::STDIN => {
                if let Err(e) = stdin.write_all(&payload).await {
                    break Err(format!("unpacking in the guest stopped reading: {e}"));
                }
            }
            tag::STDIN_EOF => break Ok(()),
            t => break Err(format!("unexpected frame {t} during a root import")),
        }
    };
    match fed {
        Ok(()) => {
            let _ = stdin.close().await;
        }
        Err(e) => {
            tracing::warn!(container = %container, error = %e, "root import abandoned");
            let _ = process.kill().await;
            let _ = control::write_frame(&mut w, tag::ERROR, e.as_bytes()).await;
            return;
        }
    }
    let code = process.wait().await;
    let complaints = complaints.await.unwrap_or_default();
    if !complaints.is_empty() {
        let _ = control::write_frame(&mut w, tag::STDERR, &complaints).await;
    }
    match code {
        Ok(code) => {
            tracing::info!(container = %container, dir = %dir, code, "root imported into the guest");
            let _ = control::write_frame(&mut w, tag::EXIT, &code.to_le_bytes()).await;
        }
        Err(e) => {
            let _ = control::write_frame(&mut w, tag::ERROR, e.message().as_bytes()).await;
        }
    }
}

/// Starts `tar -x` into a fresh directory in the guest.
async fn start(shim: &Shim, container: &str) -> Result<(String, host::Process), String> {
    bridge::validate_container_id(container).map_err(|e| e.to_string())?;
    if shim.kind != BackendKind::Qemu {
        return Err(format!(
            "UVM {:?} runs on the local backend, whose containers take host directories; nothing to import",
            shim.name
        ));
    }
    let dir = format!("{GUEST_ROOTFS_DIR}/{container}");
    let params = ProcessParameters {
        // The directory is $0 of the script: no quoting of the path into the command.
        command_args: vec![
            "/bin/sh".into(),
            "-c".into(),
            "rm -rf \"$0\" && mkdir -p \"$0\" && exec tar -x -f - -C \"$0\"".into(),
            dir.clone(),
        ],
        working_directory: "/".into(),
        environment: [("PATH".to_string(), "/bin:/sbin".to_string())].into(),
        create_in_utility_vm: true,
        ..Default::default()
    };
    let pipes = Pipes {
        stdin: true,
        stdout: false,
        stderr: true,
    };
    let process = Container::uvm(&shim.conn)
        .create_process(params, pipes)
        .await
        .map_err(|e| format!("cannot start unpacking in the guest: {}", e.message()))?;
    Ok((dir, process))
}
