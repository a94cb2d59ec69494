//! ferry's Migration service (`proto/migration.proto`) on the containerd shim's socket: live
//! migration of the sandbox's UVM, driven call by call by an orchestrator, as hcsshim's is.
//!
//! A session walks one path per side and every call checks it is that call's turn:
//!
//! ```text
//! source:      PrepareAndExportSandbox -> TransferSandbox -> FinalizeSandbox(STOP)
//!                                     \-> Cancel / FinalizeSandbox(RESUME)   (nothing moved)
//! destination: ImportSandbox -> PrepareSandbox -> TransferSandbox -> FinalizeSandbox(RESUME)
//! ```
//!
//! The transfer is ferry's shim-to-shim migration (`crate::shim::migrate`): the source's ferry
//! shim sends memory, then its snapshot and captured output, to the address the destination
//! gave, and recovers (the VM runs on here) if anything fails before the switch-over. The
//! destination may be a containerd shim's PrepareSandbox or a `ferry uvm receive` endpoint.
//! The task keeps its id; its UVM keeps its name (the source's), in the destination's ferry
//! state directory.
//!
//! On the destination, containerd must know the tasks before they arrive: the orchestrator
//! creates each task (with the same id) in the destination's containerd with the runtime
//! option `incoming_session`, which makes nothing run and starts this shim; starting such a
//! task waits until FinalizeSandbox(RESUME), then attaches to the process that arrived.
//! PrepareSandbox starts ferry's receiving shim and answers the address for the source.

use super::config::Backend;
use super::proto::migration::*;
use super::proto::migration_ttrpc::Migration;
use super::task::{Service, fail};
use crate::control::{self, Reply, Request};
use crate::paths::UvmPaths;
use async_trait::async_trait;
use containerd_shim_protos::ttrpc::r#async::{ServerStreamSender, TtrpcContext};
use containerd_shim_protos::ttrpc::{self, Code};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::watch;

type Result<T> = ttrpc::Result<T>;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Longest session id accepted.
pub const MAX_SESSION_ID: usize = 128;
/// How long a transfer may take when the request gives no timeout.
const DEFAULT_TIMEOUT_MS: u64 = 10 * 60 * 1000;
/// The exported sandbox's format tag.
const EXPORT_FORMAT: &str = "ferry-sandbox-1";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    Exported,
    Imported,
    Prepared,
    Transferring,
    /// The VM runs on the destination; the source waits for FinalizeSandbox(STOP).
    Transferred,
    /// Ended without moving (the VM runs here): cancelled or failed, with why.
    NotMoved(String),
    Finalized,
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Exported => "exported",
            Stage::Imported => "imported",
            Stage::Prepared => "prepared",
            Stage::Transferring => "transferring",
            Stage::Transferred => "transferred",
            Stage::NotMoved(_) => "not moved",
            Stage::Finalized => "finalized",
        }
    }

    fn is_over(&self) -> bool {
        matches!(self, Stage::NotMoved(_) | Stage::Finalized)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Source,
    Destination,
}

struct Session {
    id: String,
    role: Role,
    /// Destination: the UVM that arrives (its name is the source's) and ferry's state root.
    arriving: Option<(std::path::PathBuf, String)>,
    options: Vec<u8>,
    stage: Mutex<Stage>,
    /// Every notification so far; a Notifications stream replays them, then follows.
    notes: watch::Sender<Vec<Notification>>,
    cancel: watch::Sender<bool>,
}

impl Session {
    fn stage(&self) -> Stage {
        self.stage.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, stage: Stage) {
        *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = stage;
    }

    fn note(&self, phase: &str, outcome: &str, message: &str, terminal: bool) {
        let n = Notification {
            session_id: self.id.clone(),
            phase: phase.into(),
            outcome: outcome.into(),
            unix_ms: now_ms(),
            message: message.into(),
            terminal,
            ..Default::default()
        };
        self.notes.send_modify(|v| v.push(n));
    }
}

pub struct MigrationService {
    sandbox: Arc<Service>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl MigrationService {
    pub fn new(sandbox: Arc<Service>) -> MigrationService {
        MigrationService {
            sandbox,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn session(&self, id: &str) -> Result<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| fail(Code::NOT_FOUND, format!("no migration session {id:?}")))
    }
}

/// A session id's rule (also for the runtime option `incoming_session`).
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn check_session_id(id: &str) -> Result<()> {
    if valid_session_id(id) {
        Ok(())
    } else {
        Err(fail(
            Code::INVALID_ARGUMENT,
            format!("invalid session id {id:?}: 1 to {MAX_SESSION_ID} of [A-Za-z0-9._-]"),
        ))
    }
}

fn out_of_order(call: &str, s: &Session, needs: &str) -> ttrpc::Error {
    fail(
        Code::FAILED_PRECONDITION,
        format!(
            "{call} on session {:?}: {needs}; the session is {}",
            s.id,
            s.stage().name()
        ),
    )
}

#[async_trait]
impl Migration for MigrationService {
    async fn prepare_and_export_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: PrepareAndExportSandboxRequest,
    ) -> Result<PrepareAndExportSandboxResponse> {
        check_session_id(&req.session_id)?;
        let plan = uvm::migration::QemuMigrationPlan::from_bytes(&req.init_options)
            .map_err(|e| fail(Code::INVALID_ARGUMENT, format!("init_options: {e}")))?;
        let uvm = self.sandbox.current_uvm().await.ok_or_else(|| {
            fail(
                Code::FAILED_PRECONDITION,
                "the sandbox has no UVM yet (create a task first)",
            )
        })?;
        if uvm.backend != Backend::Qemu {
            return Err(fail(
                Code::FAILED_PRECONDITION,
                "the sandbox runs on the local backend, which cannot move between hosts (configure backend \"qemu\")",
            ));
        }
        let session = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if sessions.contains_key(&req.session_id) {
                return Err(fail(
                    Code::ALREADY_EXISTS,
                    format!("migration session {:?} exists", req.session_id),
                ));
            }
            if let Some(busy) = sessions.values().find(|s| !s.stage().is_over()) {
                return Err(fail(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "migration session {:?} is in progress ({})",
                        busy.id,
                        busy.stage().name()
                    ),
                ));
            }
            let s = Arc::new(Session {
                id: req.session_id.clone(),
                role: Role::Source,
                arriving: None,
                options: req.init_options.clone(),
                stage: Mutex::new(Stage::Exported),
                notes: watch::channel(Vec::new()).0,
                cancel: watch::channel(false).0,
            });
            sessions.insert(req.session_id.clone(), s.clone());
            s
        };
        let tasks: Vec<_> = self
            .sandbox
            .task_ids()
            .into_iter()
            .map(|(id, execs)| serde_json::json!({"id": id, "execs": execs}))
            .collect();
        let config = serde_json::json!({
            "format": EXPORT_FORMAT,
            "session": req.session_id,
            "uvm": uvm.name,
            "tasks": tasks,
            "plan": format!("{plan:?}"),
        });
        session.note("setup_done", "", "sandbox exported", false);
        tracing::info!(session = %req.session_id, uvm = %uvm.name, "migration prepared on the source");
        Ok(PrepareAndExportSandboxResponse {
            config: serde_json::to_vec(&config).unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn import_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: ImportSandboxRequest,
    ) -> Result<ImportSandboxResponse> {
        check_session_id(&req.session_id)?;
        let config: serde_json::Value = serde_json::from_slice(&req.config).map_err(|e| {
            fail(
                Code::INVALID_ARGUMENT,
                format!("config: not an exported sandbox: {e}"),
            )
        })?;
        if config["format"] != EXPORT_FORMAT {
            return Err(fail(
                Code::INVALID_ARGUMENT,
                format!(
                    "config: format {} is not {EXPORT_FORMAT:?}",
                    config["format"]
                ),
            ));
        }
        if config["session"] != req.session_id.as_str() {
            return Err(fail(
                Code::INVALID_ARGUMENT,
                format!(
                    "config was exported for session {}, not {:?}",
                    config["session"], req.session_id
                ),
            ));
        }
        let name = config["uvm"].as_str().unwrap_or("").to_string();
        crate::paths::validate_uvm_name(&name)
            .map_err(|e| fail(Code::INVALID_ARGUMENT, format!("config: {e}")))?;
        let exported: Vec<String> = config["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["id"].as_str().map(String::from))
            .collect();
        let cfg = self.sandbox.incoming_config().ok_or_else(|| {
            fail(
                Code::FAILED_PRECONDITION,
                "this sandbox was not created to receive a migration (create its tasks with the runtime option incoming_session)",
            )
        })?;
        let mut here = self.sandbox.incoming_tasks(&req.session_id);
        here.sort();
        let mut want = exported.clone();
        want.sort();
        if here != want {
            return Err(fail(
                Code::FAILED_PRECONDITION,
                format!(
                    "the sandbox brings tasks {want:?}; tasks created here for session {:?}: {here:?}",
                    req.session_id
                ),
            ));
        }
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.contains_key(&req.session_id) {
            return Err(fail(
                Code::ALREADY_EXISTS,
                format!("migration session {:?} exists", req.session_id),
            ));
        }
        let s = Arc::new(Session {
            id: req.session_id.clone(),
            role: Role::Destination,
            arriving: Some((cfg.state_root(), name.clone())),
            options: Vec::new(),
            stage: Mutex::new(Stage::Imported),
            notes: watch::channel(Vec::new()).0,
            cancel: watch::channel(false).0,
        });
        s.note("setup_done", "", "sandbox imported", false);
        sessions.insert(req.session_id.clone(), s);
        tracing::info!(session = %req.session_id, uvm = %name, "migration imported on the destination");
        Ok(ImportSandboxResponse::default())
    }

    async fn prepare_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: PrepareSandboxRequest,
    ) -> Result<PrepareSandboxResponse> {
        let s = self.session(&req.session_id)?;
        if s.role != Role::Destination || s.stage() != Stage::Imported {
            return Err(out_of_order(
                "PrepareSandbox",
                &s,
                "it follows ImportSandbox on the destination, once",
            ));
        }
        uvm::migration::QemuMigrationPlan::from_bytes(&req.init_options)
            .map_err(|e| fail(Code::INVALID_ARGUMENT, format!("init_options: {e}")))?;
        let (root, name) = s.arriving.clone().expect("a destination session");
        let cfg = self.sandbox.incoming_config().unwrap_or_default();
        let mut extra = vec!["--backend=qemu".to_string(), "--incoming".to_string()];
        if !req.listen.is_empty() {
            extra.push(format!("--listen={}", req.listen));
        }
        extra.extend(cfg.qemu_args().shim_args());
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        crate::commands::spawn_shim(&root, &name, &extra)
            .await
            .map_err(|e| fail(Code::INTERNAL, format!("starting the receiver: {e}")))?;
        s.set(Stage::Prepared);
        s.note("prepared", "", "waiting for the source", false);
        let address = if req.listen.is_empty() {
            format!("unix:{}", UvmPaths::new(&root, &name).control().display())
        } else {
            format!("tcp:{}", req.listen)
        };
        Ok(PrepareSandboxResponse {
            address,
            ..Default::default()
        })
    }

    async fn transfer_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: TransferSandboxRequest,
        sink: ServerStreamSender<TransferSandboxResponse>,
    ) -> Result<()> {
        let s = self.session(&req.session_id)?;
        if s.role == Role::Destination {
            return self.receive(&s, &req, sink).await;
        }
        if req.address.is_empty() {
            return Err(fail(
                Code::INVALID_ARGUMENT,
                "TransferSandbox on the source needs the destination's address (unix:PATH, tcp:HOST:PORT or a ferry state directory)",
            ));
        }
        {
            let mut stage = s.stage.lock().unwrap_or_else(|p| p.into_inner());
            if *stage != Stage::Exported {
                drop(stage);
                return Err(out_of_order(
                    "TransferSandbox",
                    &s,
                    "it follows PrepareAndExportSandbox, once",
                ));
            }
            *stage = Stage::Transferring;
        }
        let uvm = self
            .sandbox
            .current_uvm()
            .await
            .ok_or_else(|| fail(Code::FAILED_PRECONDITION, "the sandbox has no UVM"))?;
        let timeout = match req.timeout_ms {
            0 => DEFAULT_TIMEOUT_MS,
            t => t,
        };
        let started = now_ms();
        let mut message_id = 0u32;
        let outcome = transfer(
            &uvm.root,
            &uvm.name,
            &req.address,
            &s,
            std::time::Duration::from_millis(timeout),
            |event: &serde_json::Value| {
                message_id += 1;
                let response = TransferSandboxResponse {
                    message_id,
                    event: event.to_string(),
                    start_time_unix_ms: started,
                    update_time_unix_ms: now_ms(),
                    ..Default::default()
                };
                let sink = &sink;
                async move {
                    // A caller that stopped listening does not stop the migration.
                    let _ = sink.send(&response).await;
                }
            },
        )
        .await;
        match outcome {
            Ok(()) => {
                s.set(Stage::Transferred);
                s.note(
                    "transferred",
                    "success",
                    "the sandbox runs on the destination; finalize with STOP",
                    false,
                );
                Ok(())
            }
            Err(e) => {
                let cancelled = *s.cancel.borrow();
                s.set(Stage::NotMoved(e.clone()));
                s.note(
                    "failed",
                    if cancelled {
                        "cancelled"
                    } else {
                        "source_failed"
                    },
                    &e,
                    true,
                );
                message_id += 1;
                let _ = sink
                    .send(&TransferSandboxResponse {
                        message_id,
                        error: e.clone(),
                        start_time_unix_ms: started,
                        update_time_unix_ms: now_ms(),
                        ..Default::default()
                    })
                    .await;
                Ok(())
            }
        }
    }

    async fn finalize_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: FinalizeSandboxRequest,
    ) -> Result<FinalizeSandboxResponse> {
        let s = self.session(&req.session_id)?;
        let action = req.action.enum_value_or_default();
        let stage = s.stage();
        if s.role == Role::Destination {
            return self.finalize_destination(&s, action).await;
        }
        match action {
            FinalizeAction::FINALIZE_ACTION_STOP => {
                if stage != Stage::Transferred {
                    return Err(out_of_order(
                        "FinalizeSandbox(STOP)",
                        &s,
                        "STOP on the source follows a completed TransferSandbox",
                    ));
                }
                // The VM is gone from here: forget it (its directory is the migrated record)
                // so Shutdown does not try to stop what runs elsewhere.
                if let Some(uvm) = self.sandbox.current_uvm().await {
                    let _ = std::fs::remove_dir_all(UvmPaths::new(&uvm.root, &uvm.name).dir);
                }
                self.sandbox.release_uvm().await;
                s.set(Stage::Finalized);
                s.note("done", "success", "source cleaned up", true);
                tracing::info!(session = %s.id, "migration finalized on the source");
            }
            FinalizeAction::FINALIZE_ACTION_RESUME => match stage {
                // Nothing moved: the VM runs here already (ferry recovers it on failure).
                Stage::Exported | Stage::NotMoved(_) => {
                    s.set(Stage::Finalized);
                    s.note("recovery_done", "success", "the sandbox runs here", true);
                }
                _ => {
                    return Err(out_of_order(
                        "FinalizeSandbox(RESUME)",
                        &s,
                        "RESUME on the source is for a migration that did not move the sandbox",
                    ));
                }
            },
            FinalizeAction::FINALIZE_ACTION_UNSPECIFIED => {
                return Err(fail(
                    Code::INVALID_ARGUMENT,
                    "FinalizeSandbox needs an action (STOP or RESUME)",
                ));
            }
        }
        Ok(FinalizeSandboxResponse::default())
    }

    async fn notifications(
        &self,
        _ctx: &TtrpcContext,
        req: NotificationsRequest,
        sink: ServerStreamSender<Notification>,
    ) -> Result<()> {
        let s = self.session(&req.session_id)?;
        let mut rx = s.notes.subscribe();
        let mut sent = 0;
        loop {
            let pending: Vec<Notification> = rx.borrow_and_update()[sent..].to_vec();
            for n in pending {
                sent += 1;
                sink.send(&n).await?;
                if n.terminal {
                    return Ok(());
                }
            }
            if rx.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    async fn cancel(&self, _ctx: &TtrpcContext, req: CancelRequest) -> Result<CancelResponse> {
        let s = self.session(&req.session_id)?;
        match (s.role, s.stage()) {
            // The transfer sees it and stops before the switch-over (or, past it, ends as it
            // would have).
            (_, Stage::Transferring) => {
                s.cancel.send_replace(true);
            }
            (Role::Destination, Stage::Imported | Stage::Prepared) => {
                self.give_up(&s, "cancelled before the transfer", "cancelled")
                    .await;
            }
            (Role::Source, Stage::Exported) => {
                s.set(Stage::NotMoved("cancelled before the transfer".into()));
                s.note("failed", "cancelled", "cancelled before the transfer", true);
            }
            (role, _) => {
                let moved = if role == Role::Destination {
                    "received"
                } else {
                    "moved"
                };
                return Err(out_of_order(
                    "Cancel",
                    &s,
                    &format!("only a session that has not {moved} the sandbox can be cancelled"),
                ));
            }
        }
        Ok(CancelResponse::default())
    }

    async fn cleanup(&self, _ctx: &TtrpcContext, req: CleanupRequest) -> Result<CleanupResponse> {
        let s = self.session(&req.session_id)?;
        if !s.stage().is_over() {
            return Err(out_of_order(
                "Cleanup",
                &s,
                "finalize or cancel the session first",
            ));
        }
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.session_id);
        Ok(CleanupResponse::default())
    }
}

impl MigrationService {
    /// Destination TransferSandbox: waits until ferry's receiver runs the arrived VM.
    async fn receive(
        &self,
        s: &Arc<Session>,
        req: &TransferSandboxRequest,
        sink: ServerStreamSender<TransferSandboxResponse>,
    ) -> Result<()> {
        {
            let mut stage = s.stage.lock().unwrap_or_else(|p| p.into_inner());
            if *stage != Stage::Prepared {
                drop(stage);
                return Err(out_of_order(
                    "TransferSandbox",
                    s,
                    "on the destination it follows PrepareSandbox, once",
                ));
            }
            *stage = Stage::Transferring;
        }
        let (root, name) = s.arriving.clone().expect("a destination session");
        let started = now_ms();
        let timeout = std::time::Duration::from_millis(match req.timeout_ms {
            0 => DEFAULT_TIMEOUT_MS,
            t => t,
        });
        let event = |id: u32, ev: serde_json::Value, error: String| TransferSandboxResponse {
            message_id: id,
            event: ev.to_string(),
            error,
            start_time_unix_ms: started,
            update_time_unix_ms: now_ms(),
            ..Default::default()
        };
        let _ = sink
            .send(&event(
                1,
                serde_json::json!({"phase": "waiting", "origin": "destination"}),
                String::new(),
            ))
            .await;
        let arrived = wait_running(&root, &name, timeout, s.cancel.subscribe()).await;
        match arrived {
            Ok(()) => {
                s.set(Stage::Transferred);
                s.note(
                    "transferred",
                    "success",
                    "the sandbox runs here; finalize with RESUME",
                    false,
                );
                let _ = sink
                    .send(&event(
                        2,
                        serde_json::json!({"phase": "received", "origin": "destination"}),
                        String::new(),
                    ))
                    .await;
            }
            Err(e) => {
                self.give_up(s, &e, "destination_failed").await;
                let _ = sink
                    .send(&event(
                        2,
                        serde_json::json!({"phase": "failed", "origin": "destination"}),
                        e,
                    ))
                    .await;
            }
        }
        Ok(())
    }

    async fn finalize_destination(
        &self,
        s: &Arc<Session>,
        action: FinalizeAction,
    ) -> Result<FinalizeSandboxResponse> {
        match action {
            FinalizeAction::FINALIZE_ACTION_RESUME => {
                if s.stage() != Stage::Transferred {
                    return Err(out_of_order(
                        "FinalizeSandbox(RESUME)",
                        s,
                        "RESUME on the destination follows a completed TransferSandbox",
                    ));
                }
                let (root, name) = s.arriving.clone().expect("a destination session");
                self.sandbox
                    .arrive(super::task::Uvm {
                        root,
                        name,
                        backend: Backend::Qemu,
                    })
                    .await;
                s.set(Stage::Finalized);
                s.note("done", "success", "the sandbox runs here", true);
                tracing::info!(session = %s.id, "migration finalized on the destination");
            }
            FinalizeAction::FINALIZE_ACTION_STOP => {
                if matches!(s.stage(), Stage::Finalized | Stage::Transferring) {
                    return Err(out_of_order(
                        "FinalizeSandbox(STOP)",
                        s,
                        "STOP on the destination discards a session that has not finished",
                    ));
                }
                self.give_up(s, "stopped by the orchestrator", "cancelled")
                    .await;
            }
            FinalizeAction::FINALIZE_ACTION_UNSPECIFIED => {
                return Err(fail(
                    Code::INVALID_ARGUMENT,
                    "FinalizeSandbox needs an action (STOP or RESUME)",
                ));
            }
        }
        Ok(FinalizeSandboxResponse::default())
    }

    /// Ends a destination session without the sandbox: the receiver (and any VM it started)
    /// goes, waiting starts fail with `why`.
    async fn give_up(&self, s: &Session, why: &str, outcome: &str) {
        if let Some((root, name)) = &s.arriving {
            super::task::stop_uvm(root, name).await;
        }
        self.sandbox.abandon(why);
        s.set(Stage::NotMoved(why.to_string()));
        s.note("failed", outcome, why, true);
    }
}

/// Polls ferry's receiving shim until it runs the arrived VM (there is no event to wait on
/// across processes; the receiver answers Info at once). Ends on `cancel` or `timeout`.
async fn wait_running(
    root: &std::path::Path,
    name: &str,
    timeout: std::time::Duration,
    mut cancel: watch::Receiver<bool>,
) -> std::result::Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match crate::client::request(root, name, &Request::Info).await {
            Ok((data, _)) if data["uvm"]["running"] == true => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(format!("the receiver went away: {e}")),
        }
        if *cancel.borrow() {
            return Err("cancelled".into());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("nothing arrived within {timeout:?}"));
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            _ = cancel.changed() => {}
        }
    }
}

/// Runs ferry's migration of UVM `name` to `to`, handing each event to `on_event` and
/// recording it as a notification; Err carries why the VM did not move (it runs here).
async fn transfer<F, Fut>(
    root: &std::path::Path,
    name: &str,
    to: &str,
    s: &Session,
    timeout: std::time::Duration,
    mut on_event: F,
) -> std::result::Result<(), String>
where
    F: FnMut(&serde_json::Value) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let control_path = UvmPaths::new(root, name).control();
    let stream = tokio::net::UnixStream::connect(&control_path)
        .await
        .map_err(|e| format!("cannot reach the UVM's ferry shim: {e}"))?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    control::write_line(
        &mut w,
        &Request::Migrate {
            to: to.to_string(),
            options: s.options.clone(),
            dry_run: false,
        },
    )
    .await
    .map_err(|e| format!("asking the ferry shim to migrate: {e}"))?;
    let mut cancel = s.cancel.subscribe();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut asked_to_stop = false;
    loop {
        let line = tokio::select! {
            line = control::read_line::<_, serde_json::Value>(&mut r) => line,
            _ = async { drop(cancel.wait_for(|c| *c).await) }, if !asked_to_stop => {
                asked_to_stop = true;
                let _ = w.write_all(b"cancel\n").await;
                continue;
            }
            _ = &mut deadline, if !asked_to_stop => {
                asked_to_stop = true;
                tracing::warn!(session = %s.id, ?timeout, "transfer timed out; cancelling");
                let _ = w.write_all(b"cancel\n").await;
                continue;
            }
        };
        let line = line.map_err(|e| format!("lost the ferry shim during the migration: {e}"))?;
        if let Some(ev) = line.get("event") {
            let phase = ev["phase"].as_str().unwrap_or("");
            let outcome = ev["outcome"].as_str().unwrap_or("");
            s.note(phase, outcome, ev["message"].as_str().unwrap_or(""), false);
            on_event(ev).await;
            continue;
        }
        let reply: Reply = serde_json::from_value(line)
            .map_err(|e| format!("the ferry shim's answer is not understood: {e}"))?;
        return if reply.ok {
            Ok(())
        } else {
            Err(reply
                .error
                .unwrap_or_else(|| "the migration failed".to_string()))
        };
    }
}
