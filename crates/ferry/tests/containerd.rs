//! containerd runs ferry: `ctr run --runtime io.containerd.ferry.v1` against a private
//! containerd (its own root, state and sockets under /tmp), with a busybox image built here and
//! imported offline, beside runc (`io.containerd.runc.v2`) as the reference: both runtimes must
//! give the same observable results.
//!
//! Needs root, containerd, ctr and runc (`.ci/run` installs them from Debian) and
//! busybox-static; says "skipped" loudly without them.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const FERRY: &str = "io.containerd.ferry.v1";
const RUNC: &str = "io.containerd.runc.v2";
const IMAGE: &str = "localhost/ferry/busybox:latest";
/// Bound on any one ctr command (a hang fails the test instead of the whole run).
const CTR_TIMEOUT: &str = "120";

static N: AtomicU32 = AtomicU32::new(0);

fn skip(test: &str) -> bool {
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

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// The busybox image as an OCI archive, built once per test run.
fn image_archive() -> &'static Path {
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
struct Seen {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A private containerd with the busybox image imported; killed (with its shims) on drop.
struct Lab {
    dir: PathBuf,
    /// A containerd namespace of its own: runc keeps state per namespace outside the lab.
    namespace: String,
    containerd: Child,
}

impl Lab {
    fn start() -> Lab {
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

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.arg(CTR_TIMEOUT)
            .arg("ctr")
            .arg("--address")
            .arg(self.dir.join("c.sock"))
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        c
    }

    fn ctr(&self, args: &[&str], stdin: Option<&[u8]>) -> Seen {
        let mut child = self
            .ctr_cmd(args)
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
    fn ctr_with_input(&self, args: &[&str], input: &[u8]) -> Seen {
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
    fn uvms(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("ferry/uvms"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Mounts under the lab's directory (task roots).
    fn mounts(&self) -> Vec<String> {
        let dir = self.dir.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&dir))
            .map(String::from)
            .collect()
    }

    fn set_ferry_config(&self, json: &str) {
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
            .arg(format!("{}/ferry", self.dir.display()))
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

fn id(runtime: &str, what: &str) -> String {
    let short = if runtime == FERRY { "ferry" } else { "runc" };
    format!("{what}-{short}")
}

#[test]
fn run_gives_exit_codes_and_output_as_runc_does() {
    if skip("run_gives_exit_codes_and_output_as_runc_does") {
        return;
    }
    let lab = Lab::start();
    let mut seen = Vec::new();
    for rt in [RUNC, FERRY] {
        let run = |what: &str, cmd: &[&str], stdin: Option<&[u8]>| {
            let name = id(rt, what);
            let args = [&["run", "--rm", "--runtime", rt, IMAGE, &name][..], cmd].concat();
            lab.ctr(&args, stdin)
        };
        let outputs = run("out", &["sh", "-c", "echo out; echo err >&2; exit 3"], None);
        let stdin = lab.ctr_with_input(
            &[
                "run",
                "--rm",
                "--runtime",
                rt,
                IMAGE,
                &id(rt, "in"),
                "sh",
                "-c",
                "echo ready; cat; echo done",
            ],
            b"hello\nworld\n",
        );
        let missing = run("missing", &["/no/such/command"], None);
        seen.push((rt, outputs, stdin, missing));
    }
    let (_, out, input, missing) = &seen[1];
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (3, "out\n", "err\n"),
        "ferry: exit code and separate stdout/stderr"
    );
    assert_eq!(
        (input.code, input.stdout.as_str()),
        (0, "ready\nhello\nworld\ndone\n"),
        "ferry: stdin reaches the process and its end is seen"
    );
    assert_ne!(
        missing.code, 0,
        "ferry: a missing command fails: {missing:?}"
    );
    assert!(
        !missing.stderr.is_empty(),
        "ferry: and says why: {missing:?}"
    );
    let (_, r_out, r_input, r_missing) = &seen[0];
    assert_eq!(out, r_out, "same as runc");
    assert_eq!(input, r_input, "same as runc");
    assert_eq!(missing.code != 0, r_missing.code != 0, "same as runc");
    assert!(
        lab.uvms().is_empty(),
        "--rm leaves no UVM: {:?}",
        lab.uvms()
    );
    assert!(
        lab.mounts().is_empty(),
        "--rm leaves no mount: {:?}",
        lab.mounts()
    );
}

/// Starts `ctr events` and returns a receiver of its lines.
fn events(lab: &Lab) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = lab
        .ctr_cmd(&["events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for an event line with `topic` that contains `needle`; returns it.
fn wait_event(rx: &std::sync::mpsc::Receiver<String>, topic: &str, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {topic} event with {needle} within 60 s"));
        if line.contains(topic) && line.contains(needle) {
            return line;
        }
    }
}

#[test]
fn exec_ps_kill_delete_behave_as_with_runc() {
    if skip("exec_ps_kill_delete_behave_as_with_runc") {
        return;
    }
    let lab = Lab::start();
    let mut seen = Vec::new();
    for rt in [RUNC, FERRY] {
        let name = id(rt, "life");
        let (mut ev, rx) = events(&lab);
        let run = lab.ctr(
            &["run", "-d", "--runtime", rt, IMAGE, &name, "sleep", "1000"],
            None,
        );
        assert_eq!(run.code, 0, "{rt}: run -d: {run:?}");
        wait_event(&rx, "/tasks/start", &format!("\"container_id\":\"{name}\""));
        let exec = lab.ctr(
            &[
                "task",
                "exec",
                "--exec-id",
                "e1",
                &name,
                "sh",
                "-c",
                "echo hi; echo ho >&2; exit 4",
            ],
            None,
        );
        let exec_in = lab.ctr(
            &["task", "exec", "--exec-id", "e2", &name, "cat"],
            Some(b"piped\n"),
        );
        let ps = lab.ctr(&["task", "ps", &name], None);
        let pids = ps
            .stdout
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .count();
        let ls = lab.ctr(&["task", "ls"], None);
        let running = ls
            .stdout
            .lines()
            .any(|l| l.starts_with(&name) && l.contains("RUNNING"));
        let kill = lab.ctr(&["task", "kill", "-s", "SIGKILL", &name], None);
        // The init's exit: its id is the container's.
        let exit = wait_event(&rx, "/tasks/exit", &format!("\"id\":\"{name}\""));
        let exit_status = exit.contains("\"exit_status\":137");
        let ls = lab.ctr(&["task", "ls"], None);
        let stopped = ls
            .stdout
            .lines()
            .any(|l| l.starts_with(&name) && l.contains("STOPPED"));
        let delete = lab.ctr(&["task", "delete", &name], None);
        let gone = lab.ctr(&["task", "ls", "-q"], None);
        let c_rm = lab.ctr(&["containers", "rm", &name], None);
        let _ = ev.kill();
        let _ = ev.wait();
        if rt == FERRY {
            assert!(
                lab.uvms().is_empty(),
                "task delete stops the UVM: {:?}",
                lab.uvms()
            );
            assert!(
                lab.mounts().is_empty(),
                "task delete unmounts: {:?}",
                lab.mounts()
            );
        }
        seen.push((
            rt,
            (
                exec,
                exec_in,
                pids,
                running,
                kill.code,
                exit_status,
                stopped,
            ),
            (delete.code, gone.stdout.contains(&name), c_rm.code),
        ));
    }
    let (_, (exec, exec_in, pids, running, kill, exit_status, stopped), after) = &seen[1];
    assert_eq!(
        (exec.code, exec.stdout.as_str(), exec.stderr.as_str()),
        (4, "hi\n", "ho\n"),
        "ferry: task exec"
    );
    assert_eq!(
        (exec_in.code, exec_in.stdout.as_str()),
        (0, "piped\n"),
        "ferry: exec stdin"
    );
    assert_eq!(*pids, 1, "ferry: task ps lists the running init");
    assert!(*running, "ferry: task ls shows RUNNING");
    assert_eq!(*kill, 0, "ferry: task kill");
    assert!(*exit_status, "ferry: the exit event carries 137");
    assert!(*stopped, "ferry: task ls shows STOPPED after the kill");
    assert_eq!(
        *after,
        (0, false, 0),
        "ferry: task delete, then containers rm"
    );
    assert_eq!(seen[0].1, seen[1].1, "the same observations as runc");
    assert_eq!(seen[0].2, seen[1].2, "the same observations as runc");
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    if skip("bad_input_is_refused_and_leaves_nothing") {
        return;
    }
    let lab = Lab::start();
    // An unknown runtime option, by ctr's runtime config path and by the shim's config file.
    let bad = lab.dir.join("bad.json");
    std::fs::write(&bad, r#"{"backnd":"qemu"}"#).unwrap();
    let r = lab.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            FERRY,
            "--runtime-config-path",
            bad.to_str().unwrap(),
            IMAGE,
            "opt",
            "true",
        ],
        None,
    );
    assert_ne!(r.code, 0, "unknown option refused: {r:?}");
    assert!(
        r.stderr.contains("unknown field `backnd`"),
        "names the option: {r:?}"
    );
    lab.set_ferry_config(r#"{"backend":"local","cpus":0}"#);
    let r = lab.ctr(
        &["run", "--rm", "--runtime", FERRY, IMAGE, "cfg", "true"],
        None,
    );
    assert_ne!(r.code, 0, "bad value refused: {r:?}");
    assert!(r.stderr.contains("cpus 0"), "names the value: {r:?}");
    lab.set_ferry_config("{}");

    // A bundle whose config.json has no process to run.
    let spec = lab.dir.join("spec.json");
    std::fs::write(
        &spec,
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":[],"cwd":"/","user":{{"uid":0,"gid":0}}}},"root":{{"path":"{}"}}}}"#,
            lab.dir.display()
        ),
    )
    .unwrap();
    let r = lab.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            FERRY,
            "--config",
            spec.to_str().unwrap(),
            "spec",
        ],
        None,
    );
    assert_ne!(r.code, 0, "a spec without args is refused: {r:?}");
    assert!(r.stderr.contains("no args"), "says why: {r:?}");

    let tasks = lab.ctr(&["task", "ls", "-q"], None);
    assert_eq!(tasks.stdout.trim(), "", "no task left");
    assert!(lab.uvms().is_empty(), "no UVM left: {:?}", lab.uvms());
    assert!(lab.mounts().is_empty(), "no mount left: {:?}", lab.mounts());
    // And the runtime still works afterwards.
    let ok = lab.ctr(
        &[
            "run",
            "--rm",
            "--runtime",
            FERRY,
            IMAGE,
            "after",
            "echo",
            "ok",
        ],
        None,
    );
    assert_eq!((ok.code, ok.stdout.as_str()), (0, "ok\n"), "{ok:?}");
}
