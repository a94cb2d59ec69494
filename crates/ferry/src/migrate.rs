//! `ferry migrate` and `ferry uvm receive`: the command-line side of live migration (the
//! shims do the work; see [`crate::shim::migrate`]).

use crate::cli::MigrateArgs;
use crate::commands::{Outcome, print_json, spawn_shim};
use crate::control::{self, Reply, Request};
use crate::paths::{self, UvmPaths};
use crate::shim::backend::QemuArgs;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::Path;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use uvm::migration::{
    CompressionSettings, InitializeOptions, MemoryTransferThrottleParams, MemoryTransport,
};
use uvm::{MigrationEvent, Phase};

/// The options message the flags describe (validated by the source's shim, which refuses
/// bad values before anything moves).
fn options(a: &MigrateArgs) -> Result<Vec<u8>, String> {
    if let Some(f) = &a.options_file {
        let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        if bytes.len() > 64 * 1024 {
            return Err(format!("{}: larger than 64 KiB", f.display()));
        }
        // Decoded here too, for an error that names the file.
        uvm::migration::decode(&bytes).map_err(|e| format!("{}: {e}", f.display()))?;
        return Ok(bytes);
    }
    let throttle = MemoryTransferThrottleParams {
        skip_throttling: a.no_throttle.then_some(true),
        throttling_scale: a.throttle_scale,
        minimum_throttle_percentage: a.min_throttle,
        maximum_number_of_brownout_transfer_passes: a.max_passes,
        target_blackout_transfer_time: a.target_blackout_ms,
        blackout_time_threshold_for_cancelling_migration: a.cancel_blackout_over_ms,
        ..Default::default()
    };
    let o = InitializeOptions {
        memory_transport: match a.transport.as_deref() {
            Some("tcp") => MemoryTransport::Tcp,
            Some(_) => MemoryTransport::Unix,
            None if a.to.starts_with("tcp:") => MemoryTransport::Tcp,
            None => MemoryTransport::Unix,
        } as i32,
        memory_transfer_throttle_params: (throttle != MemoryTransferThrottleParams::default())
            .then_some(throttle),
        compression_settings: a.compress_workers.map(|n| CompressionSettings {
            throttle_worker_count: Some(n),
        }),
        cancel_if_blackout_threshold_exceeds: a.cancel_blackout_over_ms.is_some(),
        max_bandwidth_bytes_per_second: a.max_bandwidth,
        ..Default::default()
    };
    Ok(uvm::migration::encode(&o))
}

mod sandbox {
    //! `ferry migrate --containerd SOURCE --to DEST`: the reference orchestrator of the
    //! Migration service two containerd shims serve (see `crate::containerd::migration`).

    use super::{MigrateArgs, Outcome, options};
    use crate::containerd::proto::migration::*;
    use crate::containerd::proto::migration_ttrpc::MigrationClient;
    use containerd_shim_protos::ttrpc;

    fn ctx() -> ttrpc::context::Context {
        ttrpc::context::with_timeout(0)
    }

    /// A shim's ttrpc address: given, or read from its bundle's `address` file.
    fn address(what: &str, given: &str) -> Result<String, String> {
        if given.starts_with("unix://") {
            return Ok(given.to_string());
        }
        let file = std::path::Path::new(given).join("address");
        std::fs::read_to_string(&file)
            .map(|a| a.trim().to_string())
            .map_err(|e| {
                format!("{what} {given}: not a unix:// address nor a bundle with an address file ({}: {e})", file.display())
            })
    }

    async fn connect(what: &str, given: &str) -> Result<MigrationClient, String> {
        let address = address(what, given)?;
        let client = ttrpc::r#async::Client::connect(&address)
            .await
            .map_err(|e| format!("{what} shim at {address}: {e}"))?;
        Ok(MigrationClient::new(client))
    }

    fn why(e: ttrpc::Error) -> String {
        match e {
            ttrpc::Error::RpcStatus(s) => s.message,
            other => other.to_string(),
        }
    }

    pub async fn migrate(a: MigrateArgs, json: bool) -> Outcome {
        let opts = options(&a)?;
        uvm::QemuMigrationPlan::from_bytes(&opts).map_err(|e| format!("migration options: {e}"))?;
        let src = connect("source", &a.uvm).await?;
        let dst = connect("destination", &a.to).await?;
        let session = a.session.clone().unwrap_or_else(|| {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            format!("ferry-{ms}")
        });
        let say = |what: &str| {
            if json {
                println!("{}", serde_json::json!({"session": session, "step": what}));
            } else {
                eprintln!("{session}: {what}");
            }
        };
        let exported = src
            .prepare_and_export_sandbox(
                ctx(),
                &PrepareAndExportSandboxRequest {
                    session_id: session.clone(),
                    init_options: opts.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("source: {}", why(e)))?;
        say("exported");
        let prepared = async {
            dst.import_sandbox(
                ctx(),
                &ImportSandboxRequest {
                    session_id: session.clone(),
                    config: exported.config.clone(),
                    ..Default::default()
                },
            )
            .await?;
            dst.prepare_sandbox(
                ctx(),
                &PrepareSandboxRequest {
                    session_id: session.clone(),
                    init_options: opts.clone(),
                    listen: a.listen.clone().unwrap_or_default(),
                    ..Default::default()
                },
            )
            .await
        }
        .await;
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                let e = format!("destination: {}", why(e));
                abandon(&src, &dst, &session).await;
                return Err(e);
            }
        };
        say(&format!("destination ready at {}", prepared.address));
        let transferred = transfer(&src, &dst, &session, &prepared.address, json).await;
        if let Err(e) = transferred {
            abandon(&src, &dst, &session).await;
            return Err(format!("{e} (the sandbox runs on the source)"));
        }
        src.finalize_sandbox(
            ctx(),
            &FinalizeSandboxRequest {
                session_id: session.clone(),
                action: FinalizeAction::FINALIZE_ACTION_STOP.into(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("source finalize: {}", why(e)))?;
        dst.finalize_sandbox(
            ctx(),
            &FinalizeSandboxRequest {
                session_id: session.clone(),
                action: FinalizeAction::FINALIZE_ACTION_RESUME.into(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("destination finalize: {}", why(e)))?;
        for c in [&src, &dst] {
            let _ = c
                .cleanup(
                    ctx(),
                    &CleanupRequest {
                        session_id: session.clone(),
                        ..Default::default()
                    },
                )
                .await;
        }
        say("done: the sandbox runs on the destination");
        Ok(0)
    }

    /// Both transfer streams to their ends; Ctrl-C cancels both sides.
    async fn transfer(
        src: &MigrationClient,
        dst: &MigrationClient,
        session: &str,
        address: &str,
        json: bool,
    ) -> Result<(), String> {
        let mut dst_stream = dst
            .transfer_sandbox(
                ctx(),
                &TransferSandboxRequest {
                    session_id: session.to_string(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("destination: {}", why(e)))?;
        let mut src_stream = src
            .transfer_sandbox(
                ctx(),
                &TransferSandboxRequest {
                    session_id: session.to_string(),
                    address: address.to_string(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("source: {}", why(e)))?;
        let mut cancelled = false;
        loop {
            let next = tokio::select! {
                r = src_stream.recv() => r,
                _ = tokio::signal::ctrl_c(), if !cancelled => {
                    cancelled = true;
                    eprintln!("{session}: cancelling (the sandbox goes on running on the source)…");
                    let req = CancelRequest { session_id: session.to_string(), ..Default::default() };
                    let _ = src.cancel(ctx(), &req).await;
                    continue;
                }
            };
            match next.map_err(|e| format!("source: {}", why(e)))? {
                Some(r) if !r.error.is_empty() => return Err(format!("source: {}", r.error)),
                Some(r) => {
                    if json {
                        println!("{}", r.event);
                    }
                }
                None => break,
            }
        }
        while let Some(r) = dst_stream
            .recv()
            .await
            .map_err(|e| format!("destination: {}", why(e)))?
        {
            if !r.error.is_empty() {
                return Err(format!("destination: {}", r.error));
            }
        }
        Ok(())
    }

    /// Ends a session that did not move the sandbox, on both sides.
    async fn abandon(src: &MigrationClient, dst: &MigrationClient, session: &str) {
        let cancel = CancelRequest {
            session_id: session.to_string(),
            ..Default::default()
        };
        let _ = dst.cancel(ctx(), &cancel).await;
        let _ = src
            .finalize_sandbox(
                ctx(),
                &FinalizeSandboxRequest {
                    session_id: session.to_string(),
                    action: FinalizeAction::FINALIZE_ACTION_RESUME.into(),
                    ..Default::default()
                },
            )
            .await;
        let _ = dst
            .finalize_sandbox(
                ctx(),
                &FinalizeSandboxRequest {
                    session_id: session.to_string(),
                    action: FinalizeAction::FINALIZE_ACTION_STOP.into(),
                    ..Default::default()
                },
            )
            .await;
    }
}

/// Turns DEST into an endpoint; a state directory on this machine gets a receiver if it has
/// none yet.
async fn endpoint(name: &str, to: &str, root: &Path) -> Result<String, String> {
    if to.starts_with("unix:") || to.starts_with("tcp:") {
        return Ok(to.to_owned());
    }
    let dir = std::path::absolute(to).map_err(|e| format!("--to {to}: {e}"))?;
    if dir == std::path::absolute(root).unwrap_or_default() {
        return Err(format!(
            "--to {to} is this UVM's own state directory; migrate to another ferry host"
        ));
    }
    if !dir.is_dir() {
        return Err(format!(
            "--to {to}: not unix:PATH, tcp:HOST:PORT or an existing directory"
        ));
    }
    let control = UvmPaths::new(&dir, name).control();
    if UnixStream::connect(&control).await.is_err() {
        spawn_shim(&dir, name, &["--backend=qemu", "--incoming"]).await?;
    }
    Ok(format!("unix:{}", control.display()))
}

pub async fn migrate(root: &Path, a: MigrateArgs, json: bool) -> Outcome {
    if a.containerd {
        return sandbox::migrate(a, json).await;
    }
    paths::validate_uvm_name(&a.uvm)?;
    let options = options(&a)?;
    // Refused here already, before a receiver is started for a bad request.
    uvm::QemuMigrationPlan::from_bytes(&options).map_err(|e| format!("migration options: {e}"))?;
    let to = endpoint(&a.uvm, &a.to, root).await?;
    let control = UvmPaths::new(root, &a.uvm).control();
    let stream = UnixStream::connect(&control)
        .await
        .map_err(|e| format!("UVM {:?} is not running here ({e})", a.uvm))?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let request = Request::Migrate {
        to: to.clone(),
        options,
        dry_run: a.dry_run,
    };
    control::write_line(&mut w, &request)
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut view = View::new(json, a.dry_run);
    let mut cancelled = false;
    loop {
        let line = tokio::select! {
            line = control::read_line::<_, serde_json::Value>(&mut r) => line,
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                cancelled = true;
                view.note("cancelling (the UVM goes on running here)…");
                let _ = w.write_all(b"cancel\n").await;
                continue;
            }
        };
        let line = line.map_err(|e| format!("the shim of {:?} stopped answering: {e}", a.uvm))?;
        if let Some(ev) = line.get("event") {
            if let Ok(ev) = serde_json::from_value::<MigrationEvent>(ev.clone()) {
                view.event(&ev);
            }
            continue;
        }
        let reply: Reply =
            serde_json::from_value(line).map_err(|e| format!("bad reply from the shim: {e}"))?;
        view.finish();
        if !reply.ok {
            return Err(reply.error.unwrap_or_else(|| "migration failed".into()));
        }
        if json {
            // One JSON object per line, like the events before it.
            println!("{}", reply.data);
        } else if a.dry_run {
            println!("{}: ok to migrate to {to} (nothing moved)", a.uvm);
        } else {
            println!(
                "{} migrated to {to} in {} ms",
                a.uvm,
                reply.data["total_ms"].as_u64().unwrap_or_default()
            );
        }
        return Ok(0);
    }
}

/// How progress is shown: a bar on a terminal, JSON lines with `--json`, phase lines else.
struct View {
    json: bool,
    bar: Option<ProgressBar>,
}

impl View {
    fn new(json: bool, dry_run: bool) -> View {
        let bar = (!json && !dry_run && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{bar:30}] {bytes}/{total_bytes} {msg} (eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        View { json, bar }
    }

    fn note(&self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None if !self.json => eprintln!("{text}"),
            None => {}
        }
    }

    fn event(&mut self, ev: &MigrationEvent) {
        if self.json {
            if let Ok(s) = serde_json::to_string(ev) {
                println!("{s}");
            }
            return;
        }
        if let Some(b) = &self.bar
            && ev.phase == Phase::TransferInProgress
        {
            b.set_length(ev.total.max(ev.bytes));
            b.set_position(ev.bytes);
            b.set_message(format!(
                "pass {}, {:.0} MB/s",
                ev.pass,
                ev.rate_bps as f64 / 8e6
            ));
            return;
        }
        let mut line = format!("{:?}", ev.phase);
        if let Some(o) = ev.outcome {
            line.push_str(&format!(" ({o})"));
        }
        if let Some(ms) = ev.blackout_ms {
            line.push_str(&format!(", blackout {ms} ms"));
        }
        if ev.phase == Phase::TransferInProgress {
            line.push_str(&format!(
                ": {} of {} MiB, pass {}",
                ev.bytes >> 20,
                ev.total >> 20,
                ev.pass
            ));
        }
        if let Some(m) = &ev.message {
            line.push_str(&format!(": {m}"));
        }
        self.note(&line);
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// `ferry uvm receive NAME`: a host process waiting for NAME to migrate here.
pub async fn receive(
    root: &Path,
    name: &str,
    listen: Option<String>,
    memory_port: Option<u16>,
    qemu: &QemuArgs,
    json: bool,
) -> Outcome {
    paths::validate_uvm_name(name)?;
    let control = UvmPaths::new(root, name).control();
    if UnixStream::connect(&control).await.is_ok() {
        return Err(format!(
            "UVM {name:?} already has a host process here (`ferry uvm inspect {name}`)"
        ));
    }
    let mut extra = vec!["--backend=qemu".to_owned(), "--incoming".to_owned()];
    if let Some(l) = &listen {
        extra.push(format!("--listen={l}"));
    }
    if let Some(p) = memory_port {
        extra.push(format!("--memory-port={p}"));
    }
    extra.extend(qemu.shim_args());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let pid = spawn_shim(root, name, &extra).await?;
    if json {
        print_json(&serde_json::json!({"receiving": name, "shim_pid": pid, "control": control}));
    } else {
        println!("unix:{}", control.display());
        if let Some(l) = listen {
            println!("tcp:{l}");
        }
    }
    Ok(0)
}
