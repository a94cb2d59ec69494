//! Arbitrary bytes as protobuf-encoded migration options (`InitializeOptions`, as a caller
//! hands them to a migration): converting them to QEMU's parameters must fail cleanly with an
//! options error or give a plan whose every value lies in the range that the mapping table of
//! `uvm::migration` documents, and follows from the options the table's way. Decoding the
//! re-encoded options gives the same plan.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use uvm::UvmError;
use uvm::migration::{
    self, InitializeOptions, MemoryTransport, QEMU_MAX_DOWNTIME_MS, QemuMigrationPlan,
};

/// A parameter's value as an integer in `lo..=hi`.
fn int_in(plan: &QemuMigrationPlan, name: &str, lo: u64, hi: u64) -> Option<u64> {
    let value = plan.parameters.get(name)?;
    let n = value
        .as_u64()
        .unwrap_or_else(|| panic!("{name} = {value} is not an unsigned integer"));
    assert!((lo..=hi).contains(&n), "{name} = {n} is outside {lo}-{hi}");
    Some(n)
}

fn check(o: &InitializeOptions, plan: &QemuMigrationPlan) {
    // memory_transport: 0, 1, 2, as given.
    assert_eq!(plan.transport as i32, o.memory_transport);
    assert!(matches!(
        plan.transport,
        MemoryTransport::Unspecified | MemoryTransport::Tcp | MemoryTransport::Unix
    ));
    // Refused options never make a plan.
    assert!(!o.checksum_verification, "checksum_verification accepted");
    let t = o.memory_transfer_throttle_params.unwrap_or_default();
    assert!(t.target_number_of_brownout_transfer_passes.is_none());
    assert!(t.starting_brownout_pass_number_for_throttling.is_none());

    // Capabilities: events always, auto-converge unless throttling is skipped, multifd with
    // compression; in that order, all on.
    let mut caps = vec![("events", true)];
    let throttled = t.skip_throttling != Some(true);
    if throttled {
        caps.push(("auto-converge", true));
    }
    if o.compression_settings.is_some() {
        caps.push(("multifd", true));
    }
    assert_eq!(plan.capabilities, caps);

    for key in plan.parameters.keys() {
        assert!(
            [
                "max-bandwidth",
                "cpu-throttle-increment",
                "cpu-throttle-initial",
                "downtime-limit",
                "multifd-compression",
                "multifd-channels",
            ]
            .contains(&key.as_str()),
            "unexpected parameter {key}"
        );
    }
    // max_bandwidth_bytes_per_second: 1024-2^40.
    let bw = int_in(plan, "max-bandwidth", 1024, 1 << 40);
    assert_eq!(bw, o.max_bandwidth_bytes_per_second);
    // throttling_scale 1-100 % rounded, at most 99; minimum_throttle_percentage 1-99 %; both
    // only while throttling.
    let inc = int_in(plan, "cpu-throttle-increment", 1, 99);
    let initial = int_in(plan, "cpu-throttle-initial", 1, 99);
    if throttled {
        assert_eq!(inc, t.throttling_scale.map(|s| (s.round() as u64).min(99)));
        assert_eq!(initial, t.minimum_throttle_percentage.map(u64::from));
    } else {
        assert_eq!((inc, initial), (None, None));
    }
    if let Some(s) = t.throttling_scale {
        assert!((1.0..=100.0).contains(&s), "throttling_scale {s} accepted");
    }
    if let Some(m) = t.minimum_throttle_percentage {
        assert!(
            (1..=99).contains(&m),
            "minimum_throttle_percentage {m} accepted"
        );
    }
    // maximum_number_of_brownout_transfer_passes: 1-10000.
    if let Some(p) = plan.max_passes {
        assert!((1..=10_000).contains(&p), "max_passes {p}");
    }
    assert_eq!(
        plan.max_passes,
        t.maximum_number_of_brownout_transfer_passes.map(u64::from)
    );
    // target_blackout_transfer_time: 1-2000000 ms.
    let target = int_in(plan, "downtime-limit", 1, QEMU_MAX_DOWNTIME_MS);
    assert_eq!(target, t.target_blackout_transfer_time.map(u64::from));
    // blackout_time_threshold_for_cancelling_migration: 1-2000000 ms, at least the target.
    if let Some(th) = t.blackout_time_threshold_for_cancelling_migration {
        let th = u64::from(th);
        assert!(
            (1..=QEMU_MAX_DOWNTIME_MS).contains(&th),
            "threshold {th} ms"
        );
        if let Some(tg) = target {
            assert!(th >= tg, "threshold {th} ms below the target {tg} ms");
        }
    }
    // The cancel watchdog only with its threshold; forcing the switchover stays below it.
    match plan.blackout_cancel_threshold {
        Some(d) => {
            assert!(o.cancel_if_blackout_threshold_exceeds);
            let th = t
                .blackout_time_threshold_for_cancelling_migration
                .expect("a threshold");
            assert_eq!(d, Duration::from_millis(th.into()));
            assert_eq!(plan.forced_downtime_limit_ms, u64::from(th));
        }
        None => {
            assert!(!o.cancel_if_blackout_threshold_exceeds);
            assert_eq!(plan.forced_downtime_limit_ms, QEMU_MAX_DOWNTIME_MS);
        }
    }
    // compression: zstd over 1-255 channels (2 unless given).
    match &o.compression_settings {
        Some(c) => {
            assert_eq!(plan.parameters["multifd-compression"], "zstd");
            let channels = int_in(plan, "multifd-channels", 1, 255);
            assert_eq!(channels, Some(c.throttle_worker_count.unwrap_or(2).into()));
        }
        None => {
            assert!(!plan.parameters.contains_key("multifd-compression"));
            assert!(!plan.parameters.contains_key("multifd-channels"));
        }
    }
    assert_eq!(plan.perf_tracing, o.perf_tracing_enabled);
    let stall = if o.prepare_memory_transfer_mode {
        600
    } else {
        60
    };
    assert_eq!(plan.stall_timeout, Duration::from_secs(stall));
}

fuzz_target!(|data: &[u8]| {
    let plan = QemuMigrationPlan::from_bytes(data);
    let options = migration::decode(data);
    match (&options, &plan) {
        (Ok(o), Ok(plan)) => {
            check(o, plan);
            // What the options say survives their encoding (unknown fields aside).
            let again = QemuMigrationPlan::from_bytes(&migration::encode(o));
            assert_eq!(again.as_ref().ok(), Some(plan), "re-encoded options differ");
        }
        (Ok(o), Err(e)) => {
            assert!(matches!(e, UvmError::Options(_)), "{e:?}");
            assert!(e.to_string().contains("migration option"), "{e}");
            // Refused for what the options say, so refused again after re-encoding.
            assert!(QemuMigrationPlan::from_options(o).is_err());
        }
        (Err(_), Err(e)) => assert!(matches!(e, UvmError::Options(_)), "{e:?}"),
        (Err(e), Ok(_)) => panic!("a plan from options that do not decode: {e}"),
    }
});
