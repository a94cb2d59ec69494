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
    let (a, b) = (&hosts.a, &hosts.b);
    a.ok(&["uvm", "start", "m", "--backend", "qemu", "--memory", "256"]);
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
    // The hosts see each other only through the link.
    let listen = format!("{}:7000", b.ip);
    b.ok(&[
        "uvm",
        "receive",
        "m",
        "--listen",
        &listen,
        "--memory-port",
        "7001",
    ]);
    let json = a.ok(&["migrate", "m", "--to", &format!("tcp:{listen}"), "--json"]);
    let phases: Vec<String> = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["phase"].as_str().map(String::from))
        .collect();
    assert!(phases.iter().any(|p| p == "blackout_started"), "{json}");
    assert!(
        !a.qemu_running(),
        "exactly one host runs the VM: not the source"
    );
    assert!(
        b.qemu_running(),
        "exactly one host runs the VM: the destination"
    );
    let ls = a.ok(&["uvm", "ls"]);
    assert!(
        ls.contains("migrated"),
        "the source says where it went: {ls}"
    );
    // The counter went on there, every line once from 0.
    let before = b.ok(&["logs", "m", "count"]).lines().count();
    let seen = follow_counter(b, "m", "count", before + 10);
    assert!(seen > before + 10, "{seen} lines after {before}");
    b.ok(&["uvm", "stop", "m"]);
}

/// The link between the hosts goes down in the middle of the memory transfer and comes back:
/// TCP carries the migration over the gap, the VM ends on exactly one host, nothing is lost.
#[test]
#[ignore = "finds a bug not fixed yet: after this slow, dirty migration the destination guest's kernel panics (memory inconsistent after the switch-over; see the issue 7 note). Run with --ignored"]
fn the_link_goes_down_mid_transfer_and_comes_back() {
    if skip("the_link_goes_down_mid_transfer_and_comes_back") {
        return;
    }
    let hosts = TwoHosts::new(&guest_image::cache());
    let (a, b) = (&hosts.a, &hosts.b);
    a.ok(&["uvm", "start", "m", "--backend", "qemu", "--memory", "256"]);
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
    b.ok(&[
        "uvm",
        "receive",
        "m",
        "--listen",
        &listen,
        "--memory-port",
        "7001",
    ]);
    let mut migrate = a
        .cmd(&[
            "migrate",
            "m",
            "--to",
            &format!("tcp:{listen}"),
            "--json",
            "--max-bandwidth",
            "2097152",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let events = std::io::BufReader::new(migrate.stdout.take().unwrap());
    let mut cut = false;
    let mut phases = Vec::new();
    for line in events.lines() {
        let line = line.unwrap();
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let phase = ev["phase"].as_str().unwrap_or("").to_string();
        if !cut && phase == "transfer_in_progress" && ev["bytes"].as_u64().unwrap_or(0) > 0 {
            cut = true;
            hosts.link(false);
            // The outage itself: how long the link stays down (not a wait for anything).
            std::thread::sleep(std::time::Duration::from_secs(3));
            hosts.link(true);
        }
        phases.push(phase);
    }
    let status = migrate.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut migrate.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        cut,
        "the transfer was over before the link could be cut: {phases:?}"
    );
    assert!(status.success(), "migration across the outage: {err}");
    assert!(
        !a.qemu_running() && b.qemu_running(),
        "exactly one host runs the VM"
    );
    let before = b.ok(&["logs", "m", "count"]).lines().count();
    let seen = follow_counter(b, "m", "count", before + 10);
    assert!(seen > before + 10);
    b.ok(&["uvm", "stop", "m"]);
}
