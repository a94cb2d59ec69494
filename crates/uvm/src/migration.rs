//! Live-migration options, addresses and notifications.
//!
//! The options are a protobuf message, [`InitializeOptions`], field-compatible with hcsshim's
//! `pkg/migration/migration_options.proto` (our own copy is `proto/migration_options.proto`;
//! ferry's extensions use field numbers from 100 up, which hcsshim skips). The QEMU backend
//! turns them into a [`QemuMigrationPlan`]: QEMU migration capabilities and parameters plus
//! what ferry enforces itself while it watches the transfer. Every option maps onto something
//! or is refused with a message naming the field; out-of-range values are errors, never
//! silently clamped.
//!
//! | option | QEMU / ferry | allowed |
//! |---|---|---|
//! | (always) | capability `events` on | |
//! | `memory_transport` | the address scheme: TCP needs `tcp:`, UNIX needs `unix:`, UNSPECIFIED takes either | 0, 1, 2 |
//! | `compression_settings` present | capability `multifd` on, `multifd-compression` = `zstd`, `multifd-channels` = `throttle_worker_count` (absent: 2) | 1–255 workers |
//! | `…throttle_params.skip_throttling` | true: capability `auto-converge` off (the throttle fields below are still range-checked, then unused); false or absent: `auto-converge` on | |
//! | `…throttling_scale` | `cpu-throttle-increment`, rounded; QEMU's largest step is 99 %, so 100 means 99 | 1–100 (%) |
//! | `…minimum_throttle_percentage` | `cpu-throttle-initial` (the first throttle step) | 1–99 (%) |
//! | `…target_number_of_brownout_transfer_passes` | refused: QEMU has no pass target (use the maximum, or the blackout time) | absent |
//! | `…starting_brownout_pass_number_for_throttling` | refused: QEMU's auto-converge decides itself when to start (dirty rate outpacing the transfer) | absent |
//! | `…maximum_number_of_brownout_transfer_passes` | ferry: when QEMU's `dirty-sync-count` reaches it, `downtime-limit` is raised to the cancel threshold (else QEMU's maximum) so QEMU stops the VM and switches over; absent under TCG: 30 (`TCG_DEFAULT_MAX_PASSES`, a QEMU TCG dirty-tracking bug) | 1–10000 |
//! | `…target_blackout_transfer_time` | `downtime-limit` (ms) | 1–2000000 |
//! | `…blackout_time_threshold_for_cancelling_migration` | ferry: with `cancel_if_blackout_threshold_exceeds`, a blackout longer than this is cancelled and the source resumed (checked while the VM is stopped and against QEMU's reported downtime) | 1–2000000, ≥ target |
//! | `cancel_if_blackout_threshold_exceeds` | enables that watchdog; needs the threshold | |
//! | `checksum_verification` | refused when true: QEMU cannot checksum migrated memory | false |
//! | `perf_tracing_enabled` | ferry: every transfer event carries QEMU's RAM statistics in `message`, also logged | |
//! | `prepare_memory_transfer_mode` | ferry: the no-progress timeout grows from 60 s to 600 s | |
//! | `max_bandwidth_bytes_per_second` (ferry, 100) | `max-bandwidth` (absent: QEMU's default) | 1024–2⁴⁰ |
//!
//! Both sides must apply the same plan: multifd and its channel count are negotiated, not
//! discovered, so a destination started without them cannot load a multifd stream.

use crate::{Result, UvmError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// The generated protobuf types (`proto/migration_options.proto`).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/ferry.migration.rs"));
}

pub use proto::{
    CompressionSettings, InitializeOptions, MemoryTransferThrottleParams, MemoryTransport,
};

/// QEMU's largest `downtime-limit`, in ms (2000 s).
pub const QEMU_MAX_DOWNTIME_MS: u64 = 2_000_000;
/// Default multifd channel count when compression is asked for without a worker count.
const DEFAULT_MULTIFD_CHANNELS: u32 = 2;
const MAX_PASSES: u32 = 10_000;
const MIN_BANDWIDTH: u64 = 1024;
const MAX_BANDWIDTH: u64 = 1 << 40;
/// How long a transfer may make no progress before it is given up as failed.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
const STALL_TIMEOUT_PREPARE: Duration = Duration::from_secs(600);
/// Longest address accepted (QEMU URI); a Unix path is further bounded by sun_path.
const MAX_ADDRESS: usize = 256;
const MAX_UNIX_PATH: usize = 107;

fn invalid(msg: impl Into<String>) -> UvmError {
    UvmError::Options(msg.into())
}

/// Decodes protobuf-encoded [`InitializeOptions`].
pub fn decode(bytes: &[u8]) -> Result<InitializeOptions> {
    <InitializeOptions as prost::Message>::decode(bytes).map_err(|e| {
        invalid(format!(
            "cannot decode the migration options (protobuf): {e}"
        ))
    })
}

/// Encodes [`InitializeOptions`] (the inverse of [`decode`]).
pub fn encode(options: &InitializeOptions) -> Vec<u8> {
    prost::Message::encode_to_vec(options)
}

/// What QEMU is told, and what ferry enforces, for one migration.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuMigrationPlan {
    /// The transport the options demand; `Unspecified` accepts either address scheme.
    pub transport: MemoryTransport,
    /// `migrate-set-capabilities`, in order.
    pub capabilities: Vec<(&'static str, bool)>,
    /// `migrate-set-parameters` arguments.
    pub parameters: Map<String, Value>,
    /// Cancel (and resume the source) when the blackout lasts longer.
    pub blackout_cancel_threshold: Option<Duration>,
    /// At this many passes (`dirty-sync-count`), force the switchover.
    pub max_passes: Option<u64>,
    /// The `downtime-limit` that forces the switchover.
    pub forced_downtime_limit_ms: u64,
    /// Attach QEMU's RAM statistics to every transfer event.
    pub perf_tracing: bool,
    /// Give up a transfer whose byte count does not move for this long.
    pub stall_timeout: Duration,
}

impl Default for QemuMigrationPlan {
    /// The plan of default options: events on, auto-converge on, QEMU's defaults otherwise.
    fn default() -> QemuMigrationPlan {
        QemuMigrationPlan {
            transport: MemoryTransport::Unspecified,
            capabilities: vec![("events", true), ("auto-converge", true)],
            parameters: Map::new(),
            blackout_cancel_threshold: None,
            max_passes: None,
            forced_downtime_limit_ms: QEMU_MAX_DOWNTIME_MS,
            perf_tracing: false,
            stall_timeout: STALL_TIMEOUT,
        }
    }
}

/// `Some(v)` checked against `lo..=hi`; the error names the field.
fn ranged<T: PartialOrd + std::fmt::Display + Copy>(
    field: &str,
    value: Option<T>,
    lo: T,
    hi: T,
    unit: &str,
) -> Result<Option<T>> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) => Err(invalid(format!(
            "migration option {field} = {v} is out of range (allowed: {lo}-{hi}{unit})"
        ))),
        v => Ok(v),
    }
}

impl QemuMigrationPlan {
    /// Decodes protobuf options and converts them.
    pub fn from_bytes(bytes: &[u8]) -> Result<QemuMigrationPlan> {
        QemuMigrationPlan::from_options(&decode(bytes)?)
    }

    /// Converts options to a plan (the table in the module documentation).
    pub fn from_options(o: &InitializeOptions) -> Result<QemuMigrationPlan> {
        let mut plan = QemuMigrationPlan {
            capabilities: vec![("events", true)],
            ..QemuMigrationPlan::default()
        };
        plan.transport = MemoryTransport::try_from(o.memory_transport).map_err(|_| {
            invalid(format!(
                "migration option memory_transport = {} is unknown (allowed: 0 unspecified, 1 TCP, 2 UNIX)",
                o.memory_transport
            ))
        })?;
        if o.checksum_verification {
            return Err(invalid(
                "migration option checksum_verification is not supported: QEMU cannot checksum migrated memory (leave it false)",
            ));
        }
        plan.perf_tracing = o.perf_tracing_enabled;
        plan.stall_timeout = if o.prepare_memory_transfer_mode {
            STALL_TIMEOUT_PREPARE
        } else {
            STALL_TIMEOUT
        };
        if let Some(bw) = ranged(
            "max_bandwidth_bytes_per_second",
            o.max_bandwidth_bytes_per_second,
            MIN_BANDWIDTH,
            MAX_BANDWIDTH,
            " bytes/s",
        )? {
            plan.parameters.insert("max-bandwidth".into(), json!(bw));
        }

        let t = o.memory_transfer_throttle_params.unwrap_or_default();
        let f = |name: &str| format!("memory_transfer_throttle_params.{name}");
        if t.target_number_of_brownout_transfer_passes.is_some() {
            return Err(invalid(format!(
                "migration option {} is not supported: QEMU has no pass target (set {} or {} instead)",
                f("target_number_of_brownout_transfer_passes"),
                f("maximum_number_of_brownout_transfer_passes"),
                f("target_blackout_transfer_time"),
            )));
        }
        if t.starting_brownout_pass_number_for_throttling.is_some() {
            return Err(invalid(format!(
                "migration option {} is not supported: QEMU's auto-converge decides itself when to start throttling",
                f("starting_brownout_pass_number_for_throttling"),
            )));
        }
        let scale = match t.throttling_scale {
            Some(s) if s.is_nan() => {
                return Err(invalid(format!(
                    "migration option {} is not a number (allowed: 1-100 %)",
                    f("throttling_scale")
                )));
            }
            s => ranged(&f("throttling_scale"), s, 1.0, 100.0, " %")?,
        };
        let minimum = ranged(
            &f("minimum_throttle_percentage"),
            t.minimum_throttle_percentage,
            1,
            99,
            " %",
        )?;
        if t.skip_throttling != Some(true) {
            plan.capabilities.push(("auto-converge", true));
            if let Some(s) = scale {
                // In range, so the rounded value fits; QEMU's step tops out at 99.
                let step = (s.round() as u64).min(99);
                plan.parameters
                    .insert("cpu-throttle-increment".into(), json!(step));
            }
            if let Some(m) = minimum {
                plan.parameters
                    .insert("cpu-throttle-initial".into(), json!(m));
            }
        }
        plan.max_passes = ranged(
            &f("maximum_number_of_brownout_transfer_passes"),
            t.maximum_number_of_brownout_transfer_passes,
            1,
            MAX_PASSES,
            "",
        )?
        .map(u64::from);
        let target = ranged(
            &f("target_blackout_transfer_time"),
            t.target_blackout_transfer_time.map(u64::from),
            1,
            QEMU_MAX_DOWNTIME_MS,
            " ms",
        )?;
        if let Some(ms) = target {
            plan.parameters.insert("downtime-limit".into(), json!(ms));
        }
        let threshold = ranged(
            &f("blackout_time_threshold_for_cancelling_migration"),
            t.blackout_time_threshold_for_cancelling_migration
                .map(u64::from),
            1,
            QEMU_MAX_DOWNTIME_MS,
            " ms",
        )?;
        if let (Some(th), Some(tg)) = (threshold, target)
            && th < tg
        {
            return Err(invalid(format!(
                "migration option {} = {th} ms is below {} = {tg} ms: every blackout on target would be cancelled",
                f("blackout_time_threshold_for_cancelling_migration"),
                f("target_blackout_transfer_time"),
            )));
        }
        if o.cancel_if_blackout_threshold_exceeds {
            let th = threshold.ok_or_else(|| {
                invalid(format!(
                    "migration option cancel_if_blackout_threshold_exceeds needs {}",
                    f("blackout_time_threshold_for_cancelling_migration")
                ))
            })?;
            plan.blackout_cancel_threshold = Some(Duration::from_millis(th));
            // Forcing the switchover must not itself cause a cancelled blackout.
            plan.forced_downtime_limit_ms = th;
        }

        if let Some(c) = &o.compression_settings {
            let channels = ranged(
                "compression_settings.throttle_worker_count",
                c.throttle_worker_count,
                1,
                255,
                "",
            )?
            .unwrap_or(DEFAULT_MULTIFD_CHANNELS);
            plan.capabilities.push(("multifd", true));
            plan.parameters
                .insert("multifd-compression".into(), json!("zstd"));
            plan.parameters
                .insert("multifd-channels".into(), json!(channels));
        }
        Ok(plan)
    }

    /// The arguments of `migrate-set-capabilities`.
    pub fn capabilities_arguments(&self) -> Value {
        let caps: Vec<Value> = self
            .capabilities
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        json!({ "capabilities": caps })
    }

    /// Refuses an address whose scheme the options rule out.
    pub fn check_address(&self, address: &MemoryAddress) -> Result<()> {
        let ok = match self.transport {
            MemoryTransport::Unspecified => true,
            MemoryTransport::Tcp => matches!(address, MemoryAddress::Tcp(_)),
            MemoryTransport::Unix => matches!(address, MemoryAddress::Unix(_)),
        };
        if ok {
            Ok(())
        } else {
            Err(invalid(format!(
                "migration address {address} does not match memory_transport {}",
                self.transport.as_str_name()
            )))
        }
    }
}

/// Where the destination listens for the memory stream: QEMU's URI syntax.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MemoryAddress {
    /// `host:port` (an IPv6 host in brackets).
    Tcp(String),
    /// An absolute socket path (both sides on one machine).
    Unix(PathBuf),
}

impl MemoryAddress {
    pub fn transport(&self) -> MemoryTransport {
        match self {
            MemoryAddress::Tcp(_) => MemoryTransport::Tcp,
            MemoryAddress::Unix(_) => MemoryTransport::Unix,
        }
    }

    /// A validated `unix:` address.
    pub fn unix(path: impl Into<PathBuf>) -> Result<MemoryAddress> {
        let path = path.into();
        let s = path.to_str().ok_or_else(|| {
            invalid(format!(
                "migration socket path {} is not UTF-8",
                path.display()
            ))
        })?;
        format!("unix:{s}").parse()
    }
}

impl std::fmt::Display for MemoryAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryAddress::Tcp(hp) => write!(f, "tcp:{hp}"),
            MemoryAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for MemoryAddress {
    type Err = UvmError;

    fn from_str(s: &str) -> Result<MemoryAddress> {
        let bad = |why: &str| invalid(format!("migration address {s:?}: {why}"));
        if s.len() > MAX_ADDRESS {
            return Err(bad(&format!("longer than {MAX_ADDRESS} bytes")));
        }
        // QEMU's option syntax splits on commas; NUL cannot cross into C.
        if s.contains([',', '\0']) || s.chars().any(char::is_control) {
            return Err(bad("commas and control characters are not allowed"));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(bad("the port must be 1-65535")),
            }
            let bare = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let host_ok = !bare.is_empty()
                && bare
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
                // A bare IPv6 address would make the port ambiguous.
                && (bare.len() != host.len() || !bare.contains(':'));
            if !host_ok {
                return Err(bad(
                    "the host must be a name, an IPv4 address or an [IPv6] address",
                ));
            }
            return Ok(MemoryAddress::Tcp(rest.to_owned()));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(bad("the socket path must be absolute"));
            }
            if path.len() > MAX_UNIX_PATH {
                return Err(bad(&format!(
                    "the socket path is longer than {MAX_UNIX_PATH} bytes"
                )));
            }
            return Ok(MemoryAddress::Unix(PathBuf::from(path)));
        }
        Err(bad("expected tcp:HOST:PORT or unix:/PATH"))
    }
}

/// Which side reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Source,
    Destination,
}

/// The migration's phases (hcsshim's Migration service `Phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    SetupDone,
    TransferInProgress,
    BlackoutStarted,
    OfflineDone,
    BlackoutExited,
    Done,
    RecoveryDone,
    Failed,
}

/// How a phase ended (hcsshim's `PhaseState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Cancelled,
    GuestCancelled,
    SourceFailed,
    DestinationFailed,
    RecoveryFailed,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Success => "success",
            Outcome::Cancelled => "cancelled",
            Outcome::GuestCancelled => "cancelled by the guest",
            Outcome::SourceFailed => "source failed",
            Outcome::DestinationFailed => "destination failed",
            Outcome::RecoveryFailed => "recovery failed",
        })
    }
}

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub struct MigrationEvent {
    pub origin: Origin,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// When it was reported, ms since the epoch.
    pub unix_ms: u64,
    /// Bytes transferred so far.
    #[serde(default)]
    pub bytes: u64,
    /// Bytes QEMU still has to send in this pass.
    #[serde(default)]
    pub remaining: u64,
    /// The guest's memory size.
    #[serde(default)]
    pub total: u64,
    /// Memory passes so far (QEMU's `dirty-sync-count`).
    #[serde(default)]
    pub pass: u64,
    /// Transfer rate, bits per second (QEMU's `mbps` × 10⁶).
    #[serde(default)]
    pub rate_bps: u64,
    /// How long the guest was stopped (QEMU's downtime on OfflineDone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blackout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Now, in ms since the epoch (the time base of [`MigrationEvent::unix_ms`]).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl MigrationEvent {
    /// An event stamped now, without progress figures.
    pub fn new(origin: Origin, phase: Phase) -> MigrationEvent {
        MigrationEvent {
            origin,
            phase,
            outcome: None,
            unix_ms: unix_ms_now(),
            bytes: 0,
            remaining: 0,
            total: 0,
            pass: 0,
            rate_bps: 0,
            blackout_ms: None,
            message: None,
        }
    }

    pub fn outcome(mut self, outcome: Outcome) -> MigrationEvent {
        self.outcome = Some(outcome);
        self
    }

    pub fn message(mut self, message: impl Into<String>) -> MigrationEvent {
        self.message = Some(message.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> MemoryTransferThrottleParams {
        MemoryTransferThrottleParams::default()
    }

    fn with_throttle(t: MemoryTransferThrottleParams) -> InitializeOptions {
        InitializeOptions {
            memory_transfer_throttle_params: Some(t),
            ..Default::default()
        }
    }

    fn refused(o: &InitializeOptions, needle: &str) {
        match QemuMigrationPlan::from_options(o) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => {
                let s = e.to_string();
                assert!(s.contains(needle), "{needle:?} not in {s:?}");
            }
        }
    }

    #[test]
    fn default_options_give_events_and_auto_converge() {
        let plan = QemuMigrationPlan::from_options(&InitializeOptions::default()).unwrap();
        assert_eq!(plan, QemuMigrationPlan::default());
        assert_eq!(
            plan.capabilities_arguments(),
            json!({"capabilities": [
                {"capability": "events", "state": true},
                {"capability": "auto-converge", "state": true},
            ]})
        );
    }

    #[test]
    fn good_options_become_qemu_parameters() {
        let o = InitializeOptions {
            memory_transport: MemoryTransport::Tcp as i32,
            memory_transfer_throttle_params: Some(MemoryTransferThrottleParams {
                skip_throttling: Some(false),
                throttling_scale: Some(100.0),
                minimum_throttle_percentage: Some(20),
                maximum_number_of_brownout_transfer_passes: Some(30),
                target_blackout_transfer_time: Some(50),
                blackout_time_threshold_for_cancelling_migration: Some(500),
                ..throttle()
            }),
            compression_settings: Some(CompressionSettings {
                throttle_worker_count: Some(4),
            }),
            perf_tracing_enabled: true,
            cancel_if_blackout_threshold_exceeds: true,
            prepare_memory_transfer_mode: true,
            max_bandwidth_bytes_per_second: Some(10 << 30),
            ..Default::default()
        };
        let plan = QemuMigrationPlan::from_options(&o).unwrap();
        assert_eq!(plan.transport, MemoryTransport::Tcp);
        assert_eq!(
            plan.capabilities,
            vec![("events", true), ("auto-converge", true), ("multifd", true)]
        );
        assert_eq!(
            Value::Object(plan.parameters.clone()),
            json!({
                "max-bandwidth": 10u64 << 30,
                "cpu-throttle-increment": 99,
                "cpu-throttle-initial": 20,
                "downtime-limit": 50,
                "multifd-compression": "zstd",
                "multifd-channels": 4,
            })
        );
        assert_eq!(
            plan.blackout_cancel_threshold,
            Some(Duration::from_millis(500))
        );
        assert_eq!(plan.forced_downtime_limit_ms, 500);
        assert_eq!(plan.max_passes, Some(30));
        assert!(plan.perf_tracing);
        assert_eq!(plan.stall_timeout, STALL_TIMEOUT_PREPARE);
        assert!(
            plan.check_address(&"tcp:10.0.0.2:4444".parse().unwrap())
                .is_ok()
        );
        let e = plan
            .check_address(&"unix:/tmp/m.sock".parse().unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("MEMORY_TRANSPORT_TCP"), "{e}");
    }

    #[test]
    fn skipped_throttling_turns_auto_converge_off_but_still_checks_ranges() {
        let t = MemoryTransferThrottleParams {
            skip_throttling: Some(true),
            throttling_scale: Some(50.4),
            ..throttle()
        };
        let plan = QemuMigrationPlan::from_options(&with_throttle(t)).unwrap();
        assert_eq!(plan.capabilities, vec![("events", true)]);
        assert!(plan.parameters.is_empty());
        let t = MemoryTransferThrottleParams {
            throttling_scale: Some(150.0),
            ..t
        };
        refused(&with_throttle(t), "throttling_scale = 150");
        // Rounded, not truncated.
        let t = MemoryTransferThrottleParams {
            throttling_scale: Some(50.6),
            ..throttle()
        };
        let plan = QemuMigrationPlan::from_options(&with_throttle(t)).unwrap();
        assert_eq!(plan.parameters["cpu-throttle-increment"], json!(51));
    }

    #[test]
    fn out_of_range_and_unsupported_values_are_refused_by_name() {
        for (scale, shown) in [
            (0.0, "= 0 "),
            (150.0, "= 150 "),
            (-1.0, "= -1 "),
            (100.5, "= 100.5"),
        ] {
            let t = MemoryTransferThrottleParams {
                throttling_scale: Some(scale),
                ..throttle()
            };
            refused(
                &with_throttle(t),
                &format!("memory_transfer_throttle_params.throttling_scale {shown}"),
            );
        }
        let t = MemoryTransferThrottleParams {
            throttling_scale: Some(f64::NAN),
            ..throttle()
        };
        refused(&with_throttle(t), "throttling_scale is not a number");
        let unknown = InitializeOptions {
            memory_transport: 7,
            ..Default::default()
        };
        refused(&unknown, "memory_transport = 7 is unknown");
        refused(
            &InitializeOptions {
                checksum_verification: true,
                ..Default::default()
            },
            "checksum_verification is not supported",
        );
        refused(
            &InitializeOptions {
                cancel_if_blackout_threshold_exceeds: true,
                ..Default::default()
            },
            "needs memory_transfer_throttle_params.blackout_time_threshold_for_cancelling_migration",
        );
        let cases: Vec<(MemoryTransferThrottleParams, &str)> = vec![
            (
                MemoryTransferThrottleParams {
                    minimum_throttle_percentage: Some(100),
                    ..throttle()
                },
                "minimum_throttle_percentage = 100 is out of range (allowed: 1-99 %)",
            ),
            (
                MemoryTransferThrottleParams {
                    target_blackout_transfer_time: Some(0),
                    ..throttle()
                },
                "target_blackout_transfer_time = 0 is out of range",
            ),
            (
                MemoryTransferThrottleParams {
                    target_blackout_transfer_time: Some(300),
                    blackout_time_threshold_for_cancelling_migration: Some(100),
                    ..throttle()
                },
                "is below",
            ),
            (
                MemoryTransferThrottleParams {
                    maximum_number_of_brownout_transfer_passes: Some(0),
                    ..throttle()
                },
                "maximum_number_of_brownout_transfer_passes = 0",
            ),
            (
                MemoryTransferThrottleParams {
                    target_number_of_brownout_transfer_passes: Some(5),
                    ..throttle()
                },
                "target_number_of_brownout_transfer_passes is not supported",
            ),
            (
                MemoryTransferThrottleParams {
                    starting_brownout_pass_number_for_throttling: Some(2),
                    ..throttle()
                },
                "starting_brownout_pass_number_for_throttling is not supported",
            ),
        ];
        for (t, needle) in cases {
            refused(&with_throttle(t), needle);
        }
        for workers in [0, 256] {
            refused(
                &InitializeOptions {
                    compression_settings: Some(CompressionSettings {
                        throttle_worker_count: Some(workers),
                    }),
                    ..Default::default()
                },
                &format!("compression_settings.throttle_worker_count = {workers}"),
            );
        }
        refused(
            &InitializeOptions {
                max_bandwidth_bytes_per_second: Some(0),
                ..Default::default()
            },
            "max_bandwidth_bytes_per_second = 0",
        );
    }

    #[test]
    fn protobuf_roundtrip_and_wire_compatibility() {
        let o = InitializeOptions {
            memory_transport: MemoryTransport::Unix as i32,
            memory_transfer_throttle_params: Some(MemoryTransferThrottleParams {
                throttling_scale: Some(25.0),
                target_blackout_transfer_time: Some(40),
                ..throttle()
            }),
            compression_settings: Some(CompressionSettings {
                throttle_worker_count: Some(2),
            }),
            cancel_if_blackout_threshold_exceeds: false,
            max_bandwidth_bytes_per_second: Some(1 << 20),
            ..Default::default()
        };
        let bytes = encode(&o);
        assert_eq!(decode(&bytes).unwrap(), o);
        let plan = QemuMigrationPlan::from_bytes(&bytes).unwrap();
        assert_eq!(plan.parameters["downtime-limit"], json!(40));

        // Bytes as hcsshim's Go encoder writes them: field 1 varint 1 (TCP); field 2
        // (throttle params) holding field 2 as a double (25.0) and field 7 varint 40;
        // field 4 false is omitted; field 8 (compatibility data, unknown to us) skipped.
        let mut wire = vec![0x08, 0x01, 0x12, 0x0b, 0x11];
        wire.extend_from_slice(&25.0f64.to_le_bytes());
        wire.extend_from_slice(&[0x38, 40, 0x42, 0x02, 0x0a, 0x00]);
        let o = decode(&wire).unwrap();
        assert_eq!(o.memory_transport, MemoryTransport::Tcp as i32);
        let t = o.memory_transfer_throttle_params.unwrap();
        assert_eq!(t.throttling_scale, Some(25.0));
        assert_eq!(t.target_blackout_transfer_time, Some(40));

        let e = decode(&[0x12, 0x7f]).unwrap_err();
        assert!(e.to_string().contains("cannot decode"), "{e}");
    }

    #[test]
    fn addresses_parse_display_and_refuse_junk() {
        for good in [
            "tcp:127.0.0.1:4444",
            "tcp:host-1.example:1",
            "tcp:[::1]:65535",
            "unix:/run/ferry/mig.sock",
        ] {
            let a: MemoryAddress = good.parse().unwrap();
            assert_eq!(a.to_string(), good);
        }
        assert_eq!(
            "unix:/a/b".parse::<MemoryAddress>().unwrap(),
            MemoryAddress::Unix("/a/b".into())
        );
        assert_eq!(
            MemoryAddress::unix("/x/m.sock").unwrap().transport(),
            MemoryTransport::Unix
        );
        let long = format!("unix:/{}", "a".repeat(120));
        for (bad, why) in [
            ("tcp:h:0", "port"),
            ("tcp:h:99999", "port"),
            ("tcp:h", "tcp:HOST:PORT"),
            ("tcp::80", "host"),
            ("tcp:::1:80", "host"),
            ("tcp:a b:80", "host"),
            ("unix:rel/path", "absolute"),
            ("unix:/a,b", "commas"),
            ("unix:/a\nb", "control"),
            ("exec:sh", "expected"),
            (long.as_str(), "longer than 107"),
        ] {
            let e = bad.parse::<MemoryAddress>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(
            "x".repeat(300)
                .parse::<MemoryAddress>()
                .unwrap_err()
                .to_string()
                .contains("256")
        );
    }

    #[test]
    fn events_serialize_in_snake_case() {
        let e = MigrationEvent {
            blackout_ms: Some(12),
            ..MigrationEvent::new(Origin::Source, Phase::OfflineDone).outcome(Outcome::Success)
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["phase"], "offline_done");
        assert_eq!(v["origin"], "source");
        assert_eq!(v["outcome"], "success");
        assert_eq!(v["blackout_ms"], 12);
        assert!(v.get("message").is_none());
        let back: MigrationEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let v = serde_json::to_value(
            MigrationEvent::new(Origin::Destination, Phase::Failed)
                .outcome(Outcome::GuestCancelled),
        )
        .unwrap();
        assert_eq!(v["outcome"], "guest_cancelled");
        assert_eq!(v["phase"], "failed");
    }
}
