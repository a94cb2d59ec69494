//! Live migration between two ferry hosts, each in its own network namespace joined by a veth
//! pair, over TCP with the QEMU backend: the same `ferry uvm receive` and `ferry migrate` a
//! user runs between two machines (see `support/two_hosts.rs`, the reusable harness).
//!
//! Needs root, iproute2, QEMU and busybox-static; says "skipped" loudly without them.

#[path = "support/counter.rs"]
mod counter;
#[path = "support/guest_image.rs"]
mod guest_image;
#[path = "support/two_hosts.rs"]
mod two_hosts;

use std::io::BufRead;
use two_hosts::TwoHosts;

fn skip(test: &str) -> bool {
    if two_hosts::skip(test) {
        return true;
    }
    if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: {test} needs qemu-system-x86_64 (apt-get install qemu-system-x86)");
        return true;
    }
    false
}

/// `ferry logs -f` of a counter on `host`, checked from 0 past `past` lines.
fn follow_counter(host: &two_hosts::Host, uvm: &str, container: &str, past: usize) -> usize {
    counter::follow(host.cmd(&["logs", "-f", uvm, container]), past)
}

#[test]
fn a_vm_moves_between_network_hosts_over_tcp() {
    if skip("a_vm_moves_between_network_hosts_over_tcp") {
        return;
    }
    let hosts = TwoHosts::new(&guest_image::cache());
    // The hosts see each other only through the link.
    let dest = counter_and_receiver(&hosts, "", "");
    let (ok, json, err) = finish(start_migrate(&hosts, &dest, &[]));
    assert!(ok, "migration: {err}");
    let phases: Vec<String> = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["phase"].as_str().map(String::from))
        .collect();
    assert!(phases.iter().any(|p| p == "blackout_started"), "{json}");
    let ls = hosts.a.ok(&["uvm", "ls"]);
    assert!(
        ls.contains("migrated"),
        "the source says where it went: {ls}"
    );
    runs_on(&hosts.b, &hosts.a);
    hosts.b.ok(&["uvm", "stop", "m"]);
}

/// The link between the hosts goes down in the middle of the memory transfer and comes back:
/// TCP carries the migration over the gap, the VM ends on exactly one host, nothing is lost.
#[test]
fn the_link_goes_down_mid_transfer_and_comes_back() {
    if skip("the_link_goes_down_mid_transfer_and_comes_back") {
        return;
    }
    let hosts = TwoHosts::new(&guest_image::cache());
    let dest = counter_and_receiver(&hosts, "", "");
    let a = &hosts.a;
    // 24 MB of memory that is not zero (QEMU sends zero pages almost for free), so that at
    // 2 MiB/s the transfer lasts seconds.
    a.ok(&[
        "run",
        "m",
        "--id",
        "fill",
        "-d",
        "--",
        "sh",
        "-c",
        "yes abcdefgh | head -c 24000000 > /tmp/fill; echo filled; exec sleep 100000",
    ]);
    {
        let mut logs = a
            .cmd(&["logs", "-f", "m", "fill"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(logs.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "filled");
        let _ = logs.kill();
        let _ = logs.wait();
    }
    let mut m = start_migrate(&hosts, &dest, &["--max-bandwidth", "2097152"]);
    // Fails if the transfer is over before the link can be cut.
    let mut events = until_memory_moves(&mut m);
    hosts.link(false);
    // The outage itself: how long the link stays down (not a wait for anything).
    std::thread::sleep(std::time::Duration::from_secs(3));
    hosts.link(true);
    std::io::Read::read_to_string(&mut events, &mut String::new()).unwrap();
    let (ok, _, err) = finish(m);
    assert!(ok, "migration across the outage: {err}");
    runs_on(&hosts.b, &hosts.a);
    hosts.b.ok(&["uvm", "stop", "m"]);
}

// -- faults during a migration ----------------------------------------------------------------

/// Host `a` runs UVM "m" with the counter; host `b` waits for it on TCP; each shim with its
/// failpoints (see the shim's `failpoint` module). Returns the destination's endpoint.
fn counter_and_receiver(hosts: &TwoHosts, source_points: &str, dest_points: &str) -> String {
    let (a, b) = (&hosts.a, &hosts.b);
    let out = a
        .cmd(&["uvm", "start", "m", "--backend", "qemu", "--memory", "256"])
        .env("FERRY_FAILPOINTS", source_points)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.ok(&[
        "run",
        "m",
        "--id",
        "count",
        "-d",
        "--",
        "sh",
        "-c",
        counter::SCRIPT,
    ]);
    let listen = format!("{}:7000", b.ip);
    let out = b
        .cmd(&[
            "uvm",
            "receive",
            "m",
            "--listen",
            &listen,
            "--memory-port",
            "7001",
        ])
        .env("FERRY_FAILPOINTS", dest_points)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "receive: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("tcp:{listen}")
}

/// `ferry migrate` from `a` to `dest`, running in the background, with `extra` options.
fn start_migrate(hosts: &TwoHosts, dest: &str, extra: &[&str]) -> std::process::Child {
    let mut args = vec!["migrate", "m", "--to", dest, "--json"];
    args.extend_from_slice(extra);
    hosts
        .a
        .cmd(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a `ferry migrate --json` to end: (succeeded, its events' phases, its stderr).
fn finish(mut m: std::process::Child) -> (bool, String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = m.stdout.take() {
        std::io::Read::read_to_string(&mut o, &mut out).unwrap();
    }
    std::io::Read::read_to_string(&mut m.stderr.take().unwrap(), &mut err).unwrap();
    let status = m.wait().unwrap();
    (status.success(), out, err)
}

/// Reads `ferry migrate --json` events until one with memory moving; returns the reader.
fn until_memory_moves(
    m: &mut std::process::Child,
) -> std::io::BufReader<std::process::ChildStdout> {
    let mut events = std::io::BufReader::new(m.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            events.read_line(&mut line).unwrap() > 0,
            "the migration ended before memory moved"
        );
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if ev["phase"] == "transfer_in_progress" && ev["bytes"].as_u64().unwrap_or(0) > 0 {
            return events;
        }
    }
}

/// Holds until the shim of `host` reaches failpoint `name`, runs `strike`, then releases it.
fn at_failpoint(host: &two_hosts::Host, name: &str, strike: impl FnOnce()) {
    let fifo = host.state.join(format!("uvms/m/failpoint-{name}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    // The FIFO appears when the shim gets there; opening it is the handshake.
    while !fifo.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the shim never reached failpoint {name}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let held = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    strike();
    drop(held);
}

/// The UVM runs on `host` alone, its counter going on with every line once from 0.
fn runs_on(host: &two_hosts::Host, other: &two_hosts::Host) {
    assert!(host.qemu_running(), "the VM runs on {}", host.netns);
    assert!(
        !other.qemu_running(),
        "exactly one host runs the VM: not {}",
        other.netns
    );
    let before = host.ok(&["logs", "m", "count"]).lines().count();
    let seen = follow_counter(host, "m", "count", before + 10);
    assert!(seen > before + 10, "{seen} lines after {before}");
}

/// The pid of the shim serving UVM "m" on `host`.
fn inspect(host: &two_hosts::Host) -> serde_json::Value {
    serde_json::from_str(&host.ok(&["uvm", "inspect", "m", "--json"])).unwrap()
}

fn shim_pid(host: &two_hosts::Host) -> i32 {
    inspect(host)["shim_pid"]
        .as_i64()
        .expect("inspect gives the shim's pid") as i32
}

fn kill_pid(pid: i32) {
    let out = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "kill {pid}");
}

fn kill_pids(pattern: &str) {
    let out = std::process::Command::new("pkill")
        .args(["-KILL", "-f", "--", pattern])
        .output()
        .unwrap();
    assert!(out.status.success(), "nothing matched {pattern}");
}

/// The destination's host process is SIGKILLed while memory is moving: the source notices its
/// control connection end, cancels, and the guest goes on there; nothing runs on the destination.
#[test]
fn the_destination_shim_is_killed_mid_transfer() {
    if skip("the_destination_shim_is_killed_mid_transfer") {
        return;
    }
    let hosts = TwoHosts::new(&guest_image::cache());
    let dest = counter_and_receiver(&hosts, "", "");
    // Slow enough that the kill lands while memory moves.
    let dest_shim = shim_pid(&hosts.b);
    let mut m = start_migrate(&hosts, &dest, &["--max-bandwidth", "4194304"]);
    let mut events = until_memory_moves(&mut m);
    kill_pid(dest_shim);
    // The client reads to the end (a client leaving would cancel for its own reason).
    std::io::Read::read_to_string(&mut events, &mut String::new()).unwrap();
    let (ok, _, err) = finish(m);
    assert!(!ok, "the migration cannot succeed without its destination");
    assert!(err.contains("went away"), "the error says why: {err}");
    assert!(
        err.contains("runs here again"),
        "and where the UVM is: {err}"
    );
    // The destination's QEMU ends with its cut-off stream.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while hosts.b.qemu_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    runs_on(&hosts.a, &hosts.b);
    hosts.a.ok(&["uvm", "stop", "m"]);
}

/// The destination's QEMU dies in the blackout (memory and host state arrived, the guest
/// stopped on the source, not yet running there): the source runs the guest again.
#[test]
fn the_destination_qemu_dies_in_the_blackout() {
    if skip("the_destination_qemu_dies_in_the_blackout") {
        return;
    }
    let hosts = TwoHosts::new(&guest_image::cache());
    let dest = counter_and_receiver(&hosts, "", "incoming-before-resume");
    let m = start_migrate(&hosts, &dest, &[]);
    at_failpoint(&hosts.b, "incoming-before-resume", || {
        kill_pids(&format!("qemu-system.*{}", hosts.b.state.display()));
    });
    let (ok, _, err) = finish(m);
    assert!(!ok, "the destination could not resume: {err}");
    assert!(err.contains("runs here again"), "{err}");
    runs_on(&hosts.a, &hosts.b);
    hosts.a.ok(&["uvm", "stop", "m"]);
}

/// The source's host process is SIGKILLed after the switch-over (the destination runs the
/// guest, the source has not yet let go of its copy): the destination goes on with every line,
/// and the source's QEMU stays stopped.
#[test]
fn the_source_shim_is_killed_after_the_switchover() {
    if skip("the_source_shim_is_killed_after_the_switchover") {
        return;
    }
    let hosts = TwoHosts::new(&guest_image::cache());
    let dest = counter_and_receiver(&hosts, "source-after-switchover", "");
    let source_shim = shim_pid(&hosts.a);
    let m = start_migrate(&hosts, &dest, &[]);
    at_failpoint(&hosts.a, "source-after-switchover", || {
        // The migration holds the VM here; inspect answers anyway, and says where it goes.
        let info = inspect(&hosts.a);
        assert_eq!(
            info["shim_pid"].as_i64(),
            Some(source_shim as i64),
            "{info}"
        );
        assert_eq!(
            info["migrating"]["to"].as_str(),
            Some(dest.as_str()),
            "{info}"
        );
        assert!(
            info["migrating"]["last_event"]["phase"].is_string(),
            "{info}"
        );
        assert!(info["uvm"]["pid"].as_u64().is_some(), "{info}");
        kill_pid(source_shim)
    });
    let (ok, _, err) = finish(m);
    assert!(!ok, "the client lost the source mid-way: {err}");
    let before = hosts.b.ok(&["logs", "m", "count"]).lines().count();
    let seen = follow_counter(&hosts.b, "m", "count", before + 10);
    assert!(seen > before + 10, "{seen} lines after {before}");
    let status = qmp_status(&hosts.a.state.join("uvms/m/qmp.sock"));
    assert_eq!(status, "postmigrate", "the source's copy must not run");
    // The shim that would have quit it is gone: the operator sees it, and stop ends it.
    let ls = hosts.a.ok(&["uvm", "ls"]);
    assert!(ls.contains("orphaned"), "{ls}");
    hosts.a.ok(&["uvm", "stop", "m"]);
    assert!(!hosts.a.qemu_running(), "uvm stop ended the orphaned QEMU");
    hosts.b.ok(&["uvm", "stop", "m"]);
}

/// The destination's disk is full when the host state arrives: it cannot keep the logs or the
/// snapshot, says so, and the source runs the guest again with nothing lost.
#[test]
fn the_destination_disk_is_full() {
    if skip("the_destination_disk_is_full") {
        return;
    }
    let hosts = TwoHosts::new(&guest_image::cache());
    let uvms = hosts.b.state.join("uvms");
    std::fs::create_dir_all(&uvms).unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "ferry-full"])
        .arg(&uvms)
        .status()
        .unwrap();
    assert!(mount.success(), "mount a small tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(uvms.clone());
    let dest = counter_and_receiver(&hosts, "", "");
    // Everything left, taken.
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", uvms.join("filler").display()))
        .output()
        .unwrap();
    // Still waiting (a full disk is no reason for the receiver to go).
    hosts.b.ok(&["uvm", "inspect", "m"]);
    let m = start_migrate(&hosts, &dest, &[]);
    let (ok, _, err) = finish(m);
    let log = std::fs::read_to_string(uvms.join("m/shim.log")).unwrap_or_default();
    let df = std::process::Command::new("df")
        .arg(&uvms)
        .output()
        .unwrap();
    let err = format!(
        "{err}\n-- destination shim.log:\n{log}\n-- df:\n{}",
        String::from_utf8_lossy(&df.stdout)
    );
    assert!(!ok, "the destination had no room: {err}");
    assert!(
        err.contains("No space left"),
        "the error names the cause: {err}"
    );
    assert!(err.contains("runs here again"), "{err}");
    runs_on(&hosts.a, &hosts.b);
    hosts.a.ok(&["uvm", "stop", "m"]);
}

/// QEMU's run state, asked over its QMP socket (its shim gone, the socket is free).
fn qmp_status(sock: &std::path::Path) -> String {
    use std::io::Write;
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    writeln!(w, r#"{{"execute":"qmp_capabilities"}}"#).unwrap();
    writeln!(w, r#"{{"execute":"query-status"}}"#).unwrap();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(s) = v["return"]["status"].as_str() {
            return s.to_string();
        }
    }
}
