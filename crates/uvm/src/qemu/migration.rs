//! Live migration of a QEMU UVM: the destination boots paused waiting for the stream
//! (`-incoming defer -S`), the source sends its state over QMP's `migrate`, and exactly one
//! side runs the guest afterwards.
//!
//! ```text
//! destination                        source
//! start_incoming(plan, addr)         (running)
//! wait_incoming(events) ┐            migrate_out(plan, addr, events, cancel)
//!                       │  memory →   SetupDone, TransferInProgress…, BlackoutStarted,
//!        OfflineDone ◄──┘             OfflineDone (QEMU's downtime) → Ok, VM paused here
//! resume_incoming()                   finalize_source(false): QEMU quits
//!   BlackoutExited, Done
//! connect_guest() → GuestConnection
//! ```
//!
//! On cancellation, a blackout over the threshold, a failure of either side or a stalled
//! transfer, the source cancels the migration, makes sure its VM runs again (QEMU restarts it
//! by itself after a failed migration; `cont` covers the rest), reports RecoveryDone and
//! Failed, and returns [`UvmError::Migration`]. The destination never runs the guest unless
//! [`QemuUvm::resume_incoming`] is called, and QEMU ends a destination whose stream broke.

use super::{Accel, QemuUvm, RECONNECT_PATIENCE, SOCKETS_TIMEOUT, wait_exit};
use crate::migration::{MemoryAddress, MigrationEvent, Origin, Outcome, Phase, QemuMigrationPlan};
use crate::qmp::Qmp;
use crate::{Result, UvmError};
use host::GuestConnection;
use serde_json::{Value, json};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

/// How often QEMU is asked for progress (QEMU has no progress event).
const POLL: Duration = Duration::from_millis(100);
/// … and while the guest is stopped, so a blackout over its threshold is caught early.
const POLL_BLACKOUT: Duration = Duration::from_millis(10);
/// How long a cancelled or failed migration may take to wind down on the source.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU may take to exit after `quit`.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the VM knows about migrations it takes part in.
#[derive(Default)]
pub(super) struct MigrationState {
    /// Booted (or to boot) waiting for an incoming migration, not resumed yet.
    pub(super) incoming: bool,
    /// Where this destination listens (its Unix socket is removed afterwards).
    address: Option<MemoryAddress>,
    /// The incoming state has arrived; the VM is paused and has never run here.
    loaded: bool,
    /// Where the destination's later events go (resume_incoming has no parameter for it).
    events: Option<UnboundedSender<MigrationEvent>>,
    /// The source's transfer completed: the guest runs (or will) on the destination.
    completed_out: bool,
    /// Options given by [`crate::UtilityVm::initialize_live_migration_on_source`].
    pub(super) plan: Option<QemuMigrationPlan>,
}

impl MigrationState {
    /// True while this side must not run the guest: a destination not resumed yet, or a
    /// source whose state went elsewhere.
    pub(super) fn must_not_run(&self) -> bool {
        self.incoming || self.completed_out
    }

    pub(super) fn check_may_run(&self) -> Result<()> {
        if self.incoming {
            return Err(UvmError::NotSupported(
                "this UVM is a migration destination: resume it with resume_incoming once its state has arrived".into(),
            ));
        }
        if self.completed_out {
            return Err(UvmError::NotSupported(
                "this UVM migrated away: it may run here again only through finalize_source(true), if the destination never ran".into(),
            ));
        }
        Ok(())
    }
}

/// Events go to whoever listens; one who stopped listening does not stop the migration.
fn send(events: &UnboundedSender<MigrationEvent>, event: MigrationEvent) {
    let _ = events.send(event);
}

/// Fills in the progress figures of `query-migrate`'s answer.
fn with_progress(mut e: MigrationEvent, info: &Value) -> MigrationEvent {
    let ram = &info["ram"];
    let n = |k: &str| ram[k].as_u64().unwrap_or(0);
    e.bytes = n("transferred");
    e.remaining = n("remaining");
    e.total = n("total");
    e.pass = n("dirty-sync-count");
    e.rate_bps = (ram["mbps"].as_f64().unwrap_or(0.0).max(0.0) * 1e6) as u64;
    e
}

fn status(info: &Value) -> &str {
    info["status"].as_str().unwrap_or("none")
}

fn is_stop(e: &Value) -> bool {
    e["event"] == "STOP"
}

async fn apply_plan(qmp: &mut Qmp, plan: &QemuMigrationPlan) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(plan.capabilities_arguments()),
    )
    .await?;
    if !plan.parameters.is_empty() {
        qmp.execute(
            "migrate-set-parameters",
            Some(Value::Object(plan.parameters.clone())),
        )
        .await?;
    }
    Ok(())
}

/// Removes a stale Unix socket at `address` (QEMU cannot listen where one is left).
fn remove_socket(address: &MemoryAddress) {
    use std::os::unix::fs::FileTypeExt;
    if let MemoryAddress::Unix(p) = address
        && std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
    {
        let _ = std::fs::remove_file(p);
    }
}

/// Why a transfer did not complete.
struct Abandoned {
    outcome: Outcome,
    message: String,
    /// QEMU itself is gone: nothing to recover.
    qemu_gone: bool,
}

fn abandoned(outcome: Outcome, message: impl Into<String>) -> Abandoned {
    Abandoned {
        outcome,
        message: message.into(),
        qemu_gone: false,
    }
}

impl QemuUvm {
    /// Destination: boots QEMU paused, waiting for a migration (no guest connection yet),
    /// applies `plan` (the same as the source's: multifd must match) and listens on
    /// `address`. Returns once QEMU listens.
    pub async fn start_incoming(
        &mut self,
        plan: &QemuMigrationPlan,
        address: &MemoryAddress,
    ) -> Result<()> {
        if self.is_running() {
            return Err(UvmError::AlreadyRunning);
        }
        plan.check_address(address)?;
        std::fs::create_dir_all(&self.config.state_dir)
            .map_err(|e| UvmError::io(format!("create {}", self.config.state_dir.display()), e))?;
        self.check_inputs()?;
        self.migration = MigrationState {
            incoming: true,
            address: Some(address.clone()),
            ..Default::default()
        };
        match self.boot_incoming(plan, address).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Nothing half-started stays behind.
                self.kill();
                self.wait_exited(QUIT_TIMEOUT).await;
                self.forget();
                remove_socket(address);
                Err(e)
            }
        }
    }

    async fn boot_incoming(
        &mut self,
        plan: &QemuMigrationPlan,
        address: &MemoryAddress,
    ) -> Result<()> {
        let accel = self.config.accel.resolve();
        self.accel = Some(accel);
        for sock in [self.agent_socket(), self.qmp_socket()] {
            let _ = std::fs::remove_file(sock);
        }
        remove_socket(address);
        let started = Instant::now();
        self.spawn_qemu(accel)?;
        let stream = self
            .connect_socket(&self.qmp_socket(), started + SOCKETS_TIMEOUT)
            .await?;
        let mut qmp = Qmp::handshake(stream).await?;
        apply_plan(&mut qmp, plan).await?;
        // QEMU binds the address before it answers.
        qmp.execute(
            "migrate-incoming",
            Some(json!({"uri": address.to_string()})),
        )
        .await?;
        self.qmp = Some(qmp);
        self.paused = true;
        self.started_at = Some(SystemTime::now());
        tracing::info!(
            name = %self.config.name,
            pid = self.pid,
            %address,
            elapsed = ?started.elapsed(),
            "QEMU UVM waiting for an incoming migration"
        );
        Ok(())
    }

    /// Destination: waits until the incoming state has loaded (the VM stays paused: see
    /// [`resume_incoming`](Self::resume_incoming)), reporting on `events`. When the incoming
    /// migration fails, QEMU is ended (nothing stays running) and the error says why. Waits
    /// as long as the source takes: bound it with a timeout or the source's cancellation.
    pub async fn wait_incoming(&mut self, events: &UnboundedSender<MigrationEvent>) -> Result<()> {
        if !self.migration.incoming || self.migration.loaded {
            return Err(UvmError::NotSupported(
                "wait_incoming: this UVM is not waiting for a migration (start it with start_incoming)".into(),
            ));
        }
        let exit = self.exit.clone().ok_or(UvmError::NotRunning)?;
        self.migration.events = Some(events.clone());
        let dst = Origin::Destination;
        let mut announced = false;
        let failure: (Outcome, String) = loop {
            let Some(qmp) = self.qmp.as_mut() else {
                return Err(UvmError::NotRunning);
            };
            let info = tokio::select! {
                r = qmp.execute("query-migrate", None) => r,
                status = wait_exit(exit.clone()) => Err(UvmError::Qmp(format!("QEMU exited ({status})"))),
            };
            let info = match info {
                Ok(i) => i,
                Err(e) => {
                    let status = wait_exit_soon(&exit).await;
                    // Killed from outside: this side failed; exited by itself: QEMU gives up
                    // on a broken incoming stream, the source's doing.
                    let outcome = match &status {
                        Some(s) if s.contains("signal") => Outcome::DestinationFailed,
                        Some(_) => Outcome::SourceFailed,
                        None => Outcome::DestinationFailed,
                    };
                    break (outcome, format!("{e}{}", self.failure_context()));
                }
            };
            match status(&info) {
                "completed" => {
                    let qmp = self.qmp.as_mut().ok_or(UvmError::NotRunning)?;
                    let run = qmp.execute("query-status", None).await?;
                    if run["status"] != "inmigrate" {
                        break_loaded(self, events, &info);
                        return Ok(());
                    }
                }
                "failed" => {
                    let why = info["error-desc"].as_str().unwrap_or("no reason given");
                    break (
                        Outcome::SourceFailed,
                        format!("the incoming migration failed: {why}"),
                    );
                }
                "cancelled" => {
                    break (
                        Outcome::Cancelled,
                        "the incoming migration was cancelled".into(),
                    );
                }
                "active" if !announced => {
                    announced = true;
                    send(
                        events,
                        MigrationEvent::new(dst, Phase::TransferInProgress)
                            .message("the source connected"),
                    );
                }
                _ => {}
            }
            let Some(qmp) = self.qmp.as_mut() else {
                return Err(UvmError::NotRunning);
            };
            // Polled, and cut short by QEMU's news of a status change.
            tokio::select! {
                _ = qmp.next_event_within(POLL, is_migration) => {}
                _ = wait_exit(exit.clone()) => {}
            }
        };
        let (outcome, message) = failure;
        tracing::warn!(name = %self.config.name, %outcome, %message, "incoming migration failed");
        send(
            events,
            MigrationEvent::new(dst, Phase::Failed)
                .outcome(outcome)
                .message(message.clone()),
        );
        let address = self.migration.address.clone();
        self.kill();
        self.wait_exited(QUIT_TIMEOUT).await;
        self.forget();
        if let Some(a) = address {
            remove_socket(&a);
        }
        Err(UvmError::Migration { outcome, message })
    }

    /// Destination: runs the guest (`cont`) once its state has arrived. Connect to the guest
    /// next with [`connect_guest`](Self::connect_guest).
    pub async fn resume_incoming(&mut self) -> Result<()> {
        if !self.migration.loaded {
            return Err(UvmError::NotSupported(
                "resume_incoming: no incoming migration has completed here (wait_incoming first)"
                    .into(),
            ));
        }
        let qmp = self.qmp.as_mut().ok_or(UvmError::NotRunning)?;
        qmp.execute("cont", None).await?;
        self.paused = false;
        self.migration.loaded = false;
        self.migration.incoming = false;
        if let Some(events) = self.migration.events.take() {
            let dst = Origin::Destination;
            send(
                &events,
                MigrationEvent::new(dst, Phase::BlackoutExited)
                    .outcome(Outcome::Success)
                    .message("the guest runs on the destination"),
            );
            send(
                &events,
                MigrationEvent::new(dst, Phase::Done).outcome(Outcome::Success),
            );
        }
        tracing::info!(name = %self.config.name, "resumed the migrated UVM");
        Ok(())
    }

    /// Connects to the guest agent and returns the negotiated connection: on a resumed
    /// destination (whose host channel was never connected) once the guest has started a new
    /// session (see [`QemuUvm::open_channel`]); on a VM already connected, by reconnecting.
    pub async fn connect_guest(&mut self) -> Result<GuestConnection> {
        if !self.is_running() {
            return Err(UvmError::NotRunning);
        }
        if self.paused {
            return Err(UvmError::NotSupported(
                "connect_guest: the VM is paused (its agent cannot answer); resume it first".into(),
            ));
        }
        if self.channel.is_some() {
            return self.reconnect().await;
        }
        let t = Instant::now();
        let conn = self.attach_channel(RECONNECT_PATIENCE).await?;
        tracing::info!(name = %self.config.name, elapsed = ?t.elapsed(), "connected to the guest agent");
        Ok(conn)
    }

    /// Opens the host's end of the channel to a guest that already runs (resumed after a
    /// migration, or adopted from another host process) once it has started a new session,
    /// for a caller that listens on ports before accepting the agent (a restore). Used
    /// instead of [`connect_guest`](Self::connect_guest). A guest whose session hello was of
    /// version [`RESET_VERSION`](transport::session_hello::RESET_VERSION) or later (as the
    /// previous host saw it: [`QemuUvm::set_session_hello`]) has its old session ended with a
    /// reset rather than a cut.
    pub async fn reopen_channel(&mut self) -> Result<transport::Transport> {
        let until = Instant::now() + self.config.connect_timeout;
        self.open_channel(until, RECONNECT_PATIENCE).await
    }

    /// Source: migrates the VM to the destination listening on `address`, reporting on
    /// `events`. Ok: the transfer completed, the VM is paused here (QEMU's `postmigrate`)
    /// and complete on the destination; call [`finalize_source`](Self::finalize_source).
    /// Err ([`UvmError::Migration`]): cancelled (`cancel` turned true), a blackout over the
    /// plan's threshold, a failure of either side, or no progress; the source runs again
    /// (RecoveryDone) and the destination must be discarded, never resumed, even when its
    /// `wait_incoming` succeeded (a cancellation can come after the last byte). So resume the
    /// destination only after this returned Ok (or after the source's OfflineDone event,
    /// which is sent only when the migration stands).
    pub async fn migrate_out(
        &mut self,
        plan: &QemuMigrationPlan,
        address: &MemoryAddress,
        events: &UnboundedSender<MigrationEvent>,
        cancel: watch::Receiver<bool>,
    ) -> Result<()> {
        if !self.is_running() {
            return Err(UvmError::NotRunning);
        }
        self.migration.check_may_run()?;
        plan.check_address(address)?;
        let exit = self.exit.clone().ok_or(UvmError::NotRunning)?;
        let accel = self.accel();
        let qmp = self.qmp.as_mut().ok_or(UvmError::NotRunning)?;
        let t = Instant::now();
        let run = qmp.execute("query-status", None).await?;
        let was_running = run["running"] == true;
        let capped = tcg_pass_cap(plan, accel);
        let plan = capped.as_ref().unwrap_or(plan);
        let result = transfer(qmp, plan, address, events, cancel, exit).await;
        match result {
            Ok(downtime) => {
                self.paused = true;
                self.migration.completed_out = true;
                tracing::info!(
                    name = %self.config.name,
                    %address,
                    elapsed = ?t.elapsed(),
                    downtime_ms = downtime,
                    "migrated the UVM out"
                );
                Ok(())
            }
            Err(a) => self.recover(a, was_running, events).await,
        }
    }

    /// Ends a migration that did not complete: stops QEMU migrating, runs the VM again if it
    /// ran before, reports RecoveryDone and Failed; always returns the migration's error.
    async fn recover(
        &mut self,
        a: Abandoned,
        was_running: bool,
        events: &UnboundedSender<MigrationEvent>,
    ) -> Result<()> {
        let src = Origin::Source;
        tracing::warn!(name = %self.config.name, outcome = %a.outcome, message = %a.message, "migration abandoned; recovering the source");
        let recovered = if a.qemu_gone {
            Err(UvmError::NotRunning)
        } else {
            self.resume_after_abandon(was_running).await
        };
        match &recovered {
            Ok(()) => send(
                events,
                MigrationEvent::new(src, Phase::RecoveryDone).outcome(Outcome::Success),
            ),
            Err(e) => send(
                events,
                MigrationEvent::new(src, Phase::RecoveryDone)
                    .outcome(Outcome::RecoveryFailed)
                    .message(e.to_string()),
            ),
        }
        send(
            events,
            MigrationEvent::new(src, Phase::Failed)
                .outcome(a.outcome)
                .message(a.message.clone()),
        );
        let message = match recovered {
            Ok(()) => a.message,
            Err(e) => format!("{}; and the source could not be resumed: {e}", a.message),
        };
        Err(UvmError::Migration {
            outcome: a.outcome,
            message,
        })
    }

    async fn resume_after_abandon(&mut self, was_running: bool) -> Result<()> {
        let qmp = self.qmp.as_mut().ok_or(UvmError::NotRunning)?;
        // A no-op once QEMU has given up by itself.
        let _ = qmp.execute("migrate_cancel", None).await;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let info = qmp.execute("query-migrate", None).await?;
            match status(&info) {
                "cancelled" | "failed" | "completed" | "none" => break,
                s if Instant::now() >= deadline => {
                    return Err(UvmError::Qmp(format!(
                        "the migration did not wind down within {SETTLE_TIMEOUT:?} (status {s})"
                    )));
                }
                // QEMU has no event for the end of a cancellation it already reported.
                _ => tokio::time::sleep(POLL_BLACKOUT).await,
            }
        }
        if was_running {
            // QEMU restarts a VM whose migration failed or was cancelled; after a completed
            // one (a cancellation that came too late) it stays in postmigrate.
            let run = qmp.execute("query-status", None).await?;
            if run["running"] != true {
                qmp.execute("cont", None).await?;
            }
            let run = qmp.execute("query-status", None).await?;
            if run["running"] != true {
                return Err(UvmError::Qmp(format!(
                    "the VM does not run after `cont` (status {})",
                    run["status"]
                )));
            }
        }
        self.paused = !was_running;
        Ok(())
    }

    /// Source, after [`migrate_out`](Self::migrate_out) returned Ok. `resume = false`: quits
    /// QEMU (the guest lives on the destination). `resume = true`: runs the guest here again
    /// instead; only allowed if the destination was never resumed (discard it), as both would
    /// then run the same guest from the same state.
    pub async fn finalize_source(&mut self, resume: bool) -> Result<()> {
        if !self.migration.completed_out {
            return Err(UvmError::NotSupported(
                "finalize_source: no completed outgoing migration to finalize".into(),
            ));
        }
        if resume {
            let qmp = self.qmp.as_mut().ok_or(UvmError::NotRunning)?;
            qmp.execute("cont", None).await?;
            self.paused = false;
            self.migration.completed_out = false;
            tracing::info!(name = %self.config.name, "resumed the source after a completed migration");
        } else {
            self.quit("the utility VM migrated to another host").await;
            tracing::info!(name = %self.config.name, "the source of a migration stopped");
        }
        Ok(())
    }

    /// [`crate::UtilityVm::finalize_live_migration`]: on a loaded destination, resume or
    /// discard it; on a completed source, [`finalize_source`](Self::finalize_source).
    pub(super) async fn finalize(&mut self, resume: bool) -> Result<()> {
        if self.migration.loaded {
            if resume {
                return self.resume_incoming().await;
            }
            self.quit("the migration destination was discarded").await;
            return Ok(());
        }
        self.finalize_source(resume).await
    }

    /// Ends QEMU without running the guest: `quit`, then a kill if it lingers.
    pub(super) async fn quit(&mut self, reason: &str) {
        self.disconnect(reason);
        if let Some(q) = self.qmp.as_mut() {
            // QEMU may close the connection before it answers.
            let _ = q.execute("quit", None).await;
        }
        if !self.wait_exited(QUIT_TIMEOUT).await {
            self.kill();
            self.wait_exited(QUIT_TIMEOUT).await;
        }
        let address = self.migration.address.clone();
        self.forget();
        if let Some(a) = address {
            remove_socket(&a);
        }
    }
}

/// The destination's state has arrived.
fn break_loaded(uvm: &mut QemuUvm, events: &UnboundedSender<MigrationEvent>, info: &Value) {
    uvm.migration.loaded = true;
    if let Some(a) = uvm.migration.address.clone() {
        remove_socket(&a);
    }
    send(
        events,
        with_progress(
            MigrationEvent::new(Origin::Destination, Phase::OfflineDone),
            info,
        )
        .outcome(Outcome::Success)
        .message("the VM state has arrived; paused until resumed"),
    );
    tracing::info!(name = %uvm.config.name, "incoming migration loaded");
}

/// QEMU's exit status if it exits within a moment (a QMP error often precedes the exit).
async fn wait_exit_soon(exit: &watch::Receiver<Option<String>>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(2), wait_exit(exit.clone()))
        .await
        .ok()
}

/// The source's side of the transfer: from `migrate` to `completed` (QEMU's downtime, ms)
/// or to the reason it was abandoned.
/// QEMU's report of a migration status change (with the `events` capability).
fn is_migration(e: &Value) -> bool {
    e["event"] == "MIGRATION"
}

async fn transfer(
    qmp: &mut Qmp,
    plan: &QemuMigrationPlan,
    address: &MemoryAddress,
    events: &UnboundedSender<MigrationEvent>,
    mut cancel: watch::Receiver<bool>,
    exit: watch::Receiver<Option<String>>,
) -> Result<Option<u64>, Abandoned> {
    let src = Origin::Source;
    let setup = async {
        apply_plan(qmp, plan).await?;
        // A STOP from before this migration is not its blackout.
        while qmp.take_event(is_stop).is_some() {}
        qmp.execute("migrate", Some(json!({"uri": address.to_string()})))
            .await
    };
    if let Err(e) = setup.await {
        return Err(abandoned(
            Outcome::SourceFailed,
            format!("cannot start the migration: {e}"),
        ));
    }
    send(events, MigrationEvent::new(src, Phase::SetupDone));
    let mut blackout_at: Option<Instant> = None;
    let mut forced = false;
    let mut last_bytes = 0;
    let mut last_move = Instant::now();
    let mut cancel_open = true;
    loop {
        if *cancel.borrow() {
            return Err(abandoned(Outcome::Cancelled, "the migration was cancelled"));
        }
        let info = match qmp.execute("query-migrate", None).await {
            Ok(i) => i,
            Err(e) => {
                let gone = wait_exit_soon(&exit).await;
                return Err(Abandoned {
                    outcome: Outcome::SourceFailed,
                    message: match gone {
                        Some(s) => format!("the source's QEMU exited ({s})"),
                        None => format!("lost control of the source's QEMU: {e}"),
                    },
                    qemu_gone: true,
                });
            }
        };
        let st = status(&info);
        let stopped = qmp.take_event(is_stop).is_some() || st == "device";
        if blackout_at.is_none() && (stopped || st == "completed") {
            blackout_at = Some(Instant::now());
            send(
                events,
                with_progress(MigrationEvent::new(src, Phase::BlackoutStarted), &info),
            );
        }
        match st {
            "completed" => {
                let downtime = info["downtime"].as_u64();
                // Checked before OfflineDone: a caller may take that event as leave to
                // resume the destination, and the source is about to run again.
                if let (Some(th), Some(d)) = (plan.blackout_cancel_threshold, downtime)
                    && u128::from(d) > th.as_millis()
                {
                    return Err(abandoned(
                        Outcome::Cancelled,
                        format!(
                            "the blackout took {d} ms, over the threshold of {} ms",
                            th.as_millis()
                        ),
                    ));
                }
                let mut done = with_progress(MigrationEvent::new(src, Phase::OfflineDone), &info)
                    .outcome(Outcome::Success);
                done.blackout_ms = downtime;
                send(events, done);
                return Ok(downtime);
            }
            "failed" => {
                let why = info["error-desc"].as_str().unwrap_or("no reason given");
                // The stream to the destination broke (a source-side problem fails `migrate`
                // itself, above).
                return Err(abandoned(
                    Outcome::DestinationFailed,
                    format!("the transfer failed: {why}"),
                ));
            }
            "cancelled" | "cancelling" => {
                return Err(abandoned(
                    Outcome::Cancelled,
                    "the migration was cancelled (by another QMP client)",
                ));
            }
            "setup" | "none" => {}
            _ => {
                let mut e =
                    with_progress(MigrationEvent::new(src, Phase::TransferInProgress), &info);
                if plan.perf_tracing {
                    tracing::info!(ram = %info["ram"], status = st, "migration progress");
                    e.message = Some(info["ram"].to_string());
                }
                let (bytes, pass) = (e.bytes, e.pass);
                if blackout_at.is_none() {
                    send(events, e);
                }
                if bytes != last_bytes {
                    last_bytes = bytes;
                    last_move = Instant::now();
                } else if last_move.elapsed() > plan.stall_timeout {
                    return Err(abandoned(
                        Outcome::DestinationFailed,
                        format!(
                            "no progress for {:?} (the destination stopped reading)",
                            plan.stall_timeout
                        ),
                    ));
                }
                if let Some(max) = plan.max_passes
                    && !forced
                    && pass >= max
                {
                    forced = true;
                    tracing::info!(pass, "pass limit reached; forcing the switchover");
                    let limit = json!({"downtime-limit": plan.forced_downtime_limit_ms});
                    if let Err(e) = qmp.execute("migrate-set-parameters", Some(limit)).await {
                        tracing::warn!(error = %e, "cannot force the switchover");
                    }
                }
            }
        }
        if let (Some(at), Some(th)) = (blackout_at, plan.blackout_cancel_threshold)
            && at.elapsed() > th
        {
            return Err(abandoned(
                Outcome::Cancelled,
                format!(
                    "the blackout lasted over the threshold of {} ms",
                    th.as_millis()
                ),
            ));
        }
        let wait = if blackout_at.is_some() {
            POLL_BLACKOUT
        } else {
            POLL
        };
        tokio::select! {
            // Polled, and cut short by QEMU's news of a status change.
            _ = qmp.next_event_within(wait, is_migration) => {}
            r = cancel.changed(), if cancel_open => {
                // A dropped sender can no longer cancel.
                if r.is_err() {
                    cancel_open = false;
                }
            }
        }
    }
}

/// Under TCG, a migration switches over after this many passes unless the options set a limit.
///
/// QEMU 7.2's TCG dirty tracking loses writes over long auto-converged migrations: guests
/// migrated after 83-286 passes came up with corrupt kernel memory (slab and list corruption,
/// segfaults), with ferry and with QEMU driven by hand over QMP alike, while migrations forced
/// to switch over by pass 10 stayed sound (see BENCHMARKS.md). KVM tracks dirty pages in the
/// kernel and keeps QEMU's behaviour.
pub const TCG_DEFAULT_MAX_PASSES: u64 = 30;

/// The plan with the TCG pass limit, when it applies and the options set none.
fn tcg_pass_cap(plan: &QemuMigrationPlan, accel: Accel) -> Option<QemuMigrationPlan> {
    if accel == Accel::Kvm || plan.max_passes.is_some() {
        return None;
    }
    tracing::info!(
        passes = TCG_DEFAULT_MAX_PASSES,
        "TCG: the switchover is forced after this many passes (set a pass limit to change it)"
    );
    Some(QemuMigrationPlan {
        max_passes: Some(TCG_DEFAULT_MAX_PASSES),
        ..plan.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::QemuConfig;

    #[test]
    fn tcg_caps_the_passes_unless_the_options_do() {
        let plan = QemuMigrationPlan::default();
        let capped = tcg_pass_cap(&plan, Accel::Tcg).unwrap();
        assert_eq!(capped.max_passes, Some(TCG_DEFAULT_MAX_PASSES));
        assert!(
            tcg_pass_cap(&plan, Accel::Kvm).is_none(),
            "KVM keeps QEMU's"
        );
        let own = QemuMigrationPlan {
            max_passes: Some(500),
            ..QemuMigrationPlan::default()
        };
        assert!(
            tcg_pass_cap(&own, Accel::Tcg).is_none(),
            "the caller's limit wins"
        );
    }

    fn uvm() -> QemuUvm {
        QemuUvm::new(QemuConfig::new(
            "t",
            "/s".into(),
            "/img/vmlinux".into(),
            "/img/initramfs.cpio".into(),
        ))
    }

    fn joined(vm: &QemuUvm) -> String {
        vm.command_line(Accel::Tcg)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn an_incoming_vm_waits_paused_for_the_stream() {
        let mut vm = uvm();
        assert!(!joined(&vm).contains("-incoming"));
        assert!(vm.migration.check_may_run().is_ok());
        vm.migration.incoming = true;
        assert!(
            joined(&vm).ends_with("-incoming defer -S"),
            "{}",
            joined(&vm)
        );
        assert!(vm.migration.must_not_run());
        let e = vm.migration.check_may_run().unwrap_err().to_string();
        assert!(e.contains("resume_incoming"), "{e}");
        vm.migration = MigrationState {
            completed_out: true,
            ..Default::default()
        };
        let e = vm.migration.check_may_run().unwrap_err().to_string();
        assert!(e.contains("finalize_source(true)"), "{e}");
    }

    #[tokio::test]
    async fn calls_out_of_order_are_refused() {
        let mut vm = uvm();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let (_c, cancel) = watch::channel(false);
        let plan = QemuMigrationPlan::default();
        let addr: MemoryAddress = "unix:/tmp/x.sock".parse().unwrap();
        assert!(matches!(
            vm.migrate_out(&plan, &addr, &tx, cancel).await,
            Err(UvmError::NotRunning)
        ));
        let e = vm.wait_incoming(&tx).await.unwrap_err().to_string();
        assert!(e.contains("start_incoming"), "{e}");
        let e = vm.resume_incoming().await.unwrap_err().to_string();
        assert!(e.contains("wait_incoming first"), "{e}");
        let e = vm.finalize_source(false).await.unwrap_err().to_string();
        assert!(e.contains("no completed outgoing migration"), "{e}");
        assert!(matches!(
            vm.connect_guest().await,
            Err(UvmError::NotRunning)
        ));
        // The plan's transport is checked before anything starts.
        let tcp_only = QemuMigrationPlan {
            transport: crate::migration::MemoryTransport::Tcp,
            ..QemuMigrationPlan::default()
        };
        let e = vm.start_incoming(&tcp_only, &addr).await.unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn progress_comes_from_query_migrate() {
        let info = json!({
            "status": "active",
            "ram": {
                "transferred": 1000, "remaining": 2000, "total": 268435456,
                "dirty-sync-count": 2, "mbps": 8.5
            }
        });
        let e = with_progress(
            MigrationEvent::new(Origin::Source, Phase::TransferInProgress),
            &info,
        );
        assert_eq!(
            (e.bytes, e.remaining, e.total, e.pass, e.rate_bps),
            (1000, 2000, 268435456, 2, 8_500_000)
        );
        assert_eq!(status(&info), "active");
        assert_eq!(status(&json!({})), "none");
    }
}
