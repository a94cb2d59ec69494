//! `containerd-shim-ferry-v1`: ferry as a containerd runtime v2 shim.
//!
//! containerd starts one shim per sandbox (`start`), which serves the Task service over ttrpc
//! on a socket containerd names, and runs `delete` to clean up after a shim that died. The
//! first task starts the sandbox's UVM through ferry's own per-UVM shim (the same executable,
//! run as `shim`); every later call is a request on that shim's control socket, so the `ferry`
//! CLI sees (and can migrate) what containerd runs: `ferry uvm ls` lists the sandbox as
//! `<namespace>-<id>`.
//!
//! Configuration: see [`config`] (`/etc/ferry/containerd-shim.json` or
//! `$FERRY_CONTAINERD_CONFIG`). Logs go where containerd collects a shim's logs (its own log,
//! at the level containerd runs with); `FERRY_LOG` filters ferry's part.

pub mod bundle;
pub mod config;
pub mod stdio;
pub mod task;

use async_trait::async_trait;
use containerd_shim::asynchronous::{ExitSignal, Shim, spawn};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use std::sync::Arc;

/// The runtime name containerd knows ferry by.
pub const RUNTIME_ID: &str = "io.containerd.ferry.v1";

/// Runs the shim as containerd asked (start, delete, or serve).
pub fn main() -> std::process::ExitCode {
    // tracing events become `log` records, which the framework sends to containerd.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(containerd_shim::asynchronous::run::<FerryShim>(
        RUNTIME_ID,
        Some(Config {
            default_log_level: "info".into(),
            // The shim waits for its own children (tar, ferry's shim); a reaper collecting
            // every child would take their exit statuses first.
            no_reaper: true,
            no_sub_reaper: true,
            ..Default::default()
        }),
    ));
    // Exit now: a blocking thread still opening a FIFO nobody will open must not keep the
    // shim alive (dropping the runtime would wait for it).
    std::process::exit(0)
}

struct FerryShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for FerryShim {
    type T = task::TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        FerryShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // One shim per sandbox: containers of a pod name their sandbox in this annotation
        // (CRI); alone, a container is its own sandbox.
        let grouping = opts.id.clone();
        spawn(opts, &grouping, Vec::new()).await
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // The shim is gone (crashed or killed): what it ran goes with it.
        let cfg = config::RuntimeConfig::load_file().unwrap_or_default();
        let name = config::uvm_name(&self.namespace, &self.id);
        task::stop_uvm(&cfg.state_root(), &name).await;
        if let Ok(bundle) = std::env::current_dir() {
            task::unmount_root(&config::bundle_rootfs(&bundle));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(
                containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                    ..Default::default()
                },
            )
            .into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        task::TaskService(Arc::new(task::Service::new(
            self.namespace.clone(),
            self.id.clone(),
            publisher,
            self.exit.clone(),
        )))
    }
}
