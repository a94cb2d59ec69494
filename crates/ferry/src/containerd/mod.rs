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
pub mod migration;
pub mod stdio;
pub mod task;

/// The Migration service's generated messages and ttrpc stubs (`proto/migration.proto`).
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod proto {
    pub mod migration {
        include!(concat!(env!("OUT_DIR"), "/migration/migration.rs"));
    }
    pub mod migration_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/migration/migration_ttrpc.rs"));
    }
}

use async_trait::async_trait;
use containerd_shim::asynchronous::{ExitSignal, Shim, spawn};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use std::sync::Arc;

/// The runtime name containerd knows ferry by.
pub const RUNTIME_ID: &str = "io.containerd.ferry.v1";

fn config() -> Config {
    Config {
        default_log_level: "info".into(),
        // The shim waits for its own children (tar, ferry's shim); a reaper collecting
        // every child would take their exit statuses first.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}

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
    let args: Vec<_> = std::env::args_os().collect();
    let flags = containerd_shim::parse(&args[1..]);
    match flags {
        // Serving: ours, to put the Migration service on the socket beside the Task service.
        Ok(flags) if !flags.socket.is_empty() && flags.action.is_empty() => {
            if let Err(e) = runtime.block_on(serve(flags)) {
                eprintln!("{RUNTIME_ID}: {e}");
                std::process::exit(1);
            }
        }
        // start, delete, -v, and errors: containerd-shim's bootstrap.
        _ => runtime.block_on(containerd_shim::asynchronous::run::<FerryShim>(
            RUNTIME_ID,
            Some(config()),
        )),
    }
    // Exit now: a blocking thread still opening a FIFO nobody will open must not keep the
    // shim alive (dropping the runtime would wait for it).
    std::process::exit(0)
}

/// The shim's server: containerd's Task service and ferry's Migration service on the socket
/// containerd named, until Shutdown.
async fn serve(flags: Flags) -> Result<(), String> {
    use containerd_shim_protos::ttrpc::r#async::Server;
    use containerd_shim_protos::ttrpc::r#async::transport::Listener;
    if let Err(e) = containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)
    {
        eprintln!("{RUNTIME_ID}: logging to containerd: {e}");
    }
    // containerd signals its shims only to kill them; the rest is noise (and a closed FIFO's
    // SIGPIPE must be an error on the write, not our end).
    ignore_signals();
    let ttrpc_address = std::env::var("TTRPC_ADDRESS")
        .map_err(|_| "TTRPC_ADDRESS is not set (containerd sets it)".to_string())?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .map_err(|e| format!("connecting to containerd at {ttrpc_address}: {e}"))?;
    let exit = Arc::new(ExitSignal::default());
    let service = Arc::new(task::Service::new(
        flags.namespace.clone(),
        flags.id.clone(),
        publisher,
        exit.clone(),
    ));
    let tasks = containerd_shim_protos::shim_async::create_task(Arc::new(task::TaskService(
        service.clone(),
    )));
    let migration = proto::migration_ttrpc::create_migration(Arc::new(
        migration::MigrationService::new(service.clone()),
    ));
    let path = flags
        .socket
        .strip_prefix("unix://")
        .unwrap_or(&flags.socket)
        .to_string();
    let listener = bind(&path).await?;
    let listener = Listener::try_from(listener).map_err(|e| format!("listening on {path}: {e}"))?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(tasks)
        .register_service(migration);
    server
        .start()
        .await
        .map_err(|e| format!("serving on {path}: {e}"))?;
    // `start` reads our stdout until it closes: that is how it knows we serve.
    // SAFETY: dup2 on the process's own standard descriptors.
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
    tracing::info!(socket = %path, "serving the Task and Migration services");
    exit.wait().await;
    tracing::info!("shutting down");
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Binds the shim's socket; a stale socket file of a dead shim is replaced.
async fn bind(path: &str) -> Result<std::os::unix::net::UnixListener, String> {
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(format!("{path} is served by another shim"));
            }
            let _ = std::fs::remove_file(path);
            std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("listening on {path}: {e}"))
        }
        Err(e) => Err(format!("listening on {path}: {e}")),
    }
}

fn ignore_signals() {
    use tokio::signal::unix::{SignalKind, signal};
    for kind in [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::pipe(),
    ] {
        if let Ok(mut s) = signal(kind) {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    tracing::debug!(signal = ?kind, "ignored");
                }
            });
        }
    }
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
        // One shim per task for now: each container is a sandbox of its own (grouping a
        // pod's containers by CRI's sandbox annotation is not done yet).
        let grouping = opts.id.clone();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // In the bundle (our working directory): containerd reconnects to a running shim
        // through it after a restart, and an orchestrator finds the Migration service there.
        std::fs::write("address", &address).map_err(|e| Error::IoError {
            context: "writing the bundle's address file".into(),
            err: e,
        })?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // The shim is gone (crashed or killed): what it ran goes with it. Only the UVM the
        // bundle records: one that moved away, or never started, is not ours to stop.
        if let Ok(bundle) = std::env::current_dir() {
            if let Some((root, name)) = task::recorded_uvm(&bundle) {
                task::stop_uvm(&root, &name).await;
                let _ = std::fs::remove_file(bundle.join(task::UVM_RECORD));
            }
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
