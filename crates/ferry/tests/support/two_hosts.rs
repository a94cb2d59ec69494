//! Two ferry hosts on one machine (include `guest_image.rs` beside it): each in its own network namespace, joined by a veth pair
//! (addresses in 10.231.0.0/16, which exist only inside those namespaces: nothing leaves
//! them), each with its own state directory (sharing the guest image cache, so the kernel is
//! fetched once). Commands run in a host's namespace with `ip netns exec`; the shims and VMs
//! they start stay there.
//!
//! ```ignore
//! let hosts = TwoHosts::new();
//! hosts.a.ok(&["uvm", "start", "m", "--backend", "qemu"]);
//! hosts.b.ok(&["uvm", "receive", "m", "--listen", &format!("{}:7000", hosts.b.ip)]);
//! hosts.a.ok(&["migrate", "m", "--to", &format!("tcp:{}:7000", hosts.b.ip)]);
//! ```
//!
//! Needs root and iproute2. Everything (namespaces, link, processes, state) goes on drop.
#![allow(dead_code)] // each user takes what it needs

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static N: AtomicU32 = AtomicU32::new(0);

pub struct Host {
    /// The network namespace's name.
    pub netns: String,
    /// This host's address on the link.
    pub ip: String,
    pub state: PathBuf,
}

impl Host {
    /// `ferry ARGS` on this host.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns])
            .arg(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .env("FERRY_STATE_DIR", &self.state);
        c
    }

    pub fn ferry(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ferry in the namespace")
    }

    /// `ferry ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ferry(args);
        assert!(
            out.status.success(),
            "ferry {args:?} on {} failed: {}",
            self.netns,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether a QEMU runs for this host's state.
    pub fn qemu_running(&self) -> bool {
        Command::new("pgrep")
            .args(["-f", "--"])
            .arg(format!("qemu-system.*{}", self.state.display()))
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

pub struct TwoHosts {
    pub a: Host,
    pub b: Host,
    dir: PathBuf,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this machine can make the two hosts; prints why not.
pub fn skip(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: {test} needs root (network namespaces)");
        return true;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipped: {test} needs iproute2 (apt-get install iproute2)");
        return true;
    }
    false
}

impl TwoHosts {
    /// Makes the namespaces, the link and the state directories; `image_cache` is shared as
    /// both hosts' `images/uvm`.
    pub fn new(image_cache: &Path) -> TwoHosts {
        // Built here, outside the namespaces: they have no route to Debian's mirror, and the
        // first `uvm start` in them would otherwise download the kernel.
        let built = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["image", "build", "--cache-dir"])
            .arg(image_cache)
            .stdin(Stdio::null())
            .output()
            .expect("run ferry image build");
        assert!(
            built.status.success(),
            "ferry image build: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Namespaces and links are machine-wide: names carry the test process's id. Addresses
        // live inside the pair's own namespaces, so two pairs cannot clash.
        let tag = format!("{}{n}", pid % 100_000);
        let octet = n % 250 + 1;
        let dir = PathBuf::from(format!("/tmp/f2h-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        let host = |side: &str, last: u8| {
            let state = dir.join(side);
            super::guest_image::link(&state, image_cache);
            Host {
                netns: format!("f2h{side}{tag}"),
                ip: format!("10.231.{octet}.{last}"),
                state,
            }
        };
        let hosts = TwoHosts {
            a: host("a", 1),
            b: host("b", 2),
            dir,
        };
        let (va, vb) = (format!("f2a{tag}"), format!("f2b{tag}"));
        for h in [&hosts.a, &hosts.b] {
            ip(&["netns", "add", &h.netns]);
            ip(&["-n", &h.netns, "link", "set", "lo", "up"]);
        }
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        for (link, h) in [(&va, &hosts.a), (&vb, &hosts.b)] {
            ip(&["link", "set", link, "netns", &h.netns]);
            ip(&[
                "-n",
                &h.netns,
                "addr",
                "add",
                &format!("{}/24", h.ip),
                "dev",
                link,
            ]);
            ip(&["-n", &h.netns, "link", "set", link, "up"]);
        }
        hosts
    }

    /// Takes the link between the hosts down (`up == false`) or up again.
    pub fn link(&self, up: bool) {
        let link = format!("f2a{}", &self.a.netns[4..]);
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.a.netns, "link", "set", &link, state]);
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for h in [&self.a, &self.b] {
            // Everything started in the namespace: shims, agents, VMs.
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", &h.netns])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &h.netns]).status();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("two-host state kept for inspection: {}", self.dir.display());
        }
    }
}
