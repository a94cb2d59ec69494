//! A private containerd for tests and benchmarks: its own root, state and sockets under /tmp,
//! the busybox image (scripts/busybox-oci-image.sh) imported, ferry's containerd shim on its
//! PATH; killed, with its shims and what they ran, on drop.
#![allow(dead_code)] // each user takes what it needs

#[path = "guest_image.rs"]
mod guest_image;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const FERRY: &str = "io.containerd.ferry.v1";
pub const RUNC: &str = "io.containerd.runc.v2";
pub const IMAGE: &str = "localhost/ferry/busybox:latest";
/// Bound on any one ctr command (a hang fails the test instead of the whole run).
const CTR_TIMEOUT: &str = "120";

pub static N: AtomicU32 = AtomicU32::new(0);

pub fn skip(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: {test} needs root (containerd)");
        return true;
    }
    for tool in ["containerd", "ctr", "runc", "busybox"] {
        if which(tool).is_none() {
            eprintln!(
                "skipped: {test} needs {tool} (apt-get install containerd runc busybox-static)"
            );
            return true;
        }
    }
    false
}

/// The QEMU backend's needs beyond [`skip`]'s.
pub fn skip_qemu(test: &str) -> bool {
    if which("qemu-system-x86_64").is_none() {
        eprintln!("skipped: {test} needs qemu-system-x86_64 (apt-get install qemu-system-x86)");
        return true;
    }
    false
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// The busybox image as an OCI archive, built once per test run.
pub fn image_archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ferry-busybox-oci.tar");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/busybox-oci-image.sh");
        let status = Command::new("bash")
            .arg(script)
            .arg(&out)
            .arg(IMAGE)
            .stdout(Stdio::null())
            .status()
            .expect("run busybox-oci-image.sh");
        assert!(status.success(), "building the busybox OCI image failed");
        out
    })
}

/// What a command showed: exit code, stdout, and stderr without ctr's own log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A private containerd with the busybox image imported; killed (with its shims) on drop.
pub struct Lab {
    pub dir: PathBuf,
    /// A containerd namespace of its own: runc keeps state per namespace outside the lab.
    pub namespace: String,
    containerd: Child,
}

impl Lab {
    pub fn start() -> Lab {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/fctrd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        // The shim is found on containerd's PATH, as an installed one would be.
        let shim = Path::new(env!("CARGO_BIN_EXE_containerd-shim-ferry-v1"));
        let path = format!(
            "{}:{}",
            shim.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut containerd = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .env("FERRY_STATE_DIR", dir.join("ferry"))
            .env("FERRY_CONTAINERD_CONFIG", dir.join("ferry-shim.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start containerd");
        std::fs::write(dir.join("ferry-shim.json"), "{}").unwrap();
        // Ready when it says it serves its gRPC socket; its log goes on to a file.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = containerd.stderr.take().unwrap();
        let mut log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let grpc = format!("address={}/c.sock\"", dir.display());
        let grpc_plain = format!("address={}/c.sock", dir.display());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                if line.contains("serving...")
                    && (line.contains(&grpc) || line.ends_with(&grpc_plain))
                {
                    let _ = tx.send(());
                }
            }
        });
        let lab = Lab {
            dir,
            namespace: format!("ft{}-{n}", std::process::id()),
            containerd,
        };
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "containerd did not start; log: {}",
                    std::fs::read_to_string(lab.dir.join("containerd.log")).unwrap_or_default()
                )
            });
        let import = lab.ctr(
            &["images", "import", image_archive().to_str().unwrap()],
            None,
        );
        assert_eq!(import.code, 0, "ctr images import: {import:?}");
        lab
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        self.ctr_cmd_in(&self.namespace, args)
    }

    /// ctr in another containerd namespace (a second "host" for the same containerd).
    pub fn ctr_cmd_in(&self, namespace: &str, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.arg(CTR_TIMEOUT)
            .arg("ctr")
            .arg("--address")
            .arg(self.dir.join("c.sock"))
            .arg("--namespace")
            .arg(namespace)
            .args(args);
        c
    }

    pub fn ctr(&self, args: &[&str], stdin: Option<&[u8]>) -> Seen {
        self.ctr_in(&self.namespace, args, stdin)
    }

    pub fn ctr_in(&self, namespace: &str, args: &[&str], stdin: Option<&[u8]>) -> Seen {
        let mut child = self
            .ctr_cmd_in(namespace, args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ctr");
        if let Some(input) = stdin {
            let mut w = child.stdin.take().unwrap();
            w.write_all(input).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.starts_with("time="))
            .map(|l| format!("{l}\n"))
            .collect();
        Seen {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        }
    }

    /// Runs ctr and writes `input` to it once the process has printed its first line (so the
    /// input cannot race the task's start), then ends the input.
    pub fn ctr_with_input(&self, args: &[&str], input: &[u8]) -> Seen {
        let mut child = self
            .ctr_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ctr");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        {
            let mut w = child.stdin.take().unwrap();
            w.write_all(input).unwrap();
        }
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let out = child.wait_with_output().unwrap();
        Seen {
            code: out.status.code().unwrap_or(-1),
            stdout: first + &rest,
            stderr: String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.starts_with("time="))
                .map(|l| format!("{l}\n"))
                .collect(),
        }
    }

    /// UVMs ferry runs for this containerd.
    pub fn uvms(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("ferry/uvms"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Mounts under the lab's directory (task roots).
    pub fn mounts(&self) -> Vec<String> {
        let dir = self.dir.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&dir))
            .map(String::from)
            .collect()
    }

    /// Lets the QEMU backend find its guest image: the static agent built by the project's
    /// script, and the image cache the QEMU tests share (the kernel package is fetched once).
    pub fn use_guest_image(&self) {
        guest_image::link(&self.dir.join("ferry"), &guest_image::cache());
    }

    /// Another ferry state directory in the lab (another "host"), sharing the guest image
    /// cache; [`Lab::use_guest_image`] first.
    pub fn another_ferry_state(&self, name: &str) -> PathBuf {
        let state = self.dir.join(name);
        let cache = std::fs::read_link(self.dir.join("ferry/images/uvm"))
            .expect("use_guest_image before another_ferry_state");
        guest_image::link(&state, &cache);
        state
    }

    pub fn set_ferry_config(&self, json: &str) {
        std::fs::write(self.dir.join("ferry-shim.json"), json).unwrap();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // What a failed test left running (runc's processes outlive their shim).
        for task in self.ctr(&["task", "ls", "-q"], None).stdout.lines() {
            self.ctr(&["task", "kill", "-s", "SIGKILL", task], None);
            self.ctr(&["task", "delete", "-f", task], None);
        }
        // Shims outlive containerd by design; these belong to this lab only.
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--"])
            .arg(format!("-address {}/c.sock", self.dir.display()))
            .status();
        let _ = self.containerd.kill();
        let _ = self.containerd.wait();
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--"])
            // ferry's shims, agents and VMs of this lab (its state dirs are inside).
            .arg(format!("{}/", self.dir.display()))
            .status();
        for m in self.mounts().iter().rev() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lab kept for inspection: {}", self.dir.display());
        }
    }
}
