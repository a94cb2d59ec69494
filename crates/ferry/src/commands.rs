//! What each CLI command does.

use crate::cli::{ExecArgs, ProcessArgs, RunArgs, UvmCommand};
use crate::client;
use crate::control::{LogOffsets, ProcessSpec, Request, Rootfs};
use crate::paths::{self, UvmPaths};
use crate::shim::backend::{BackendKind, QemuArgs};
use serde_json::Value;
use std::io::BufRead;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;
use uvm::QemuUvm;

/// What a command ends with: an exit code for the CLI.
pub type Outcome = Result<i32, String>;

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn process_spec(p: &ProcessArgs) -> ProcessSpec {
    let tty = p.tty;
    ProcessSpec {
        args: p.command.clone(),
        env: p.env.clone(),
        cwd: p.workdir.clone(),
        tty,
        stdin: !p.detach || p.interactive,
        console: if tty {
            client::terminal_size().or(Some((24, 80)))
        } else {
            None
        },
        detach: p.detach,
    }
}

async fn run_or_exec(root: &Path, uvm: &str, req: Request, p: &ProcessArgs, json: bool) -> Outcome {
    let identity = if p.detach {
        client::UvmIdentity::default()
    } else {
        client::uvm_identity(root, uvm).await
    };
    let (data, session) = client::request(root, uvm, &req).await?;
    let Some(session) = session else {
        if json {
            print_json(&data);
        } else {
            println!("{}", data["container"].as_str().unwrap_or_default());
        }
        return Ok(0);
    };
    let container = data["container"].as_str().unwrap_or_default().to_string();
    let pid = data["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
    let resume = |at| reattach(&container, pid, at);
    let how = Follow {
        stdin: true,
        tty: p.tty,
        identity,
        resume: pid
            .is_some()
            .then_some(&resume as &dyn Fn(LogOffsets) -> Request),
    };
    // A new process's output is streamed from its start.
    let code = follow(root, uvm, session, LogOffsets::default(), how).await?;
    code.ok_or_else(|| "the stream ended without an exit code".into())
}

/// What a streaming command does when the UVM's host process is replaced under it.
struct Follow<'a> {
    /// Our stdin goes to the process (`run`, `exec`, `attach`).
    stdin: bool,
    tty: bool,
    /// The UVM the stream is from (a new host process must serve the same one).
    identity: client::UvmIdentity,
    /// The request that resumes the stream at given offsets; None: it ends with its host
    /// process.
    resume: Option<&'a dyn Fn(LogOffsets) -> Request>,
}

/// Streams a session from `at` to the process's exit (its code) or the stream's end (None).
/// When the UVM's host process goes away first (`ferry uvm upgrade`, a restore), goes on with
/// the new one where the output had got to. Input read but not yet sent when the old one
/// went away may be lost.
async fn follow(
    root: &Path,
    uvm: &str,
    mut session: client::Session,
    mut at: LogOffsets,
    how: Follow<'_>,
) -> Result<Option<i32>, String> {
    loop {
        let end = client::stream_at(session, how.stdin, how.tty, &mut at).await?;
        let resume = match (end, how.resume) {
            (client::StreamEnd::Exit(code), _) => return Ok(Some(code)),
            (client::StreamEnd::Ended, None) => return Ok(None),
            (client::StreamEnd::Lost(e), None) => return Err(e),
            (_, Some(resume)) => resume,
        };
        session = client::request_successor(root, uvm, &resume(at), &how.identity, SUCCESSOR_WAIT)
            .await?
            .1
            .ok_or("no stream")?;
    }
}

/// Attaches again to a process whose session broke, at the offsets its output had reached.
fn reattach(container: &str, pid: Option<u32>, at: LogOffsets) -> Request {
    Request::Attach {
        container: container.to_string(),
        pid,
        from: Some(at),
    }
}

pub async fn run(root: &Path, a: RunArgs, json: bool) -> Outcome {
    let rootfs = match (a.rootfs, a.image) {
        (Some(dir), _) => Rootfs::Dir(dir),
        (None, Some(image)) => Rootfs::Image(image),
        (None, None) => Rootfs::Image("busybox".into()),
    };
    let req = Request::Run {
        id: a.id,
        rootfs,
        process: process_spec(&a.process),
    };
    run_or_exec(root, &a.uvm, req, &a.process, json).await
}

pub async fn exec(root: &Path, a: ExecArgs, json: bool) -> Outcome {
    let req = Request::Exec {
        container: a.container,
        process: process_spec(&a.process),
    };
    run_or_exec(root, &a.uvm, req, &a.process, json).await
}

pub async fn attach(root: &Path, uvm: &str, container: String, pid: Option<u32>) -> Outcome {
    let request = Request::Attach {
        container: container.clone(),
        pid,
        from: None,
    };
    let identity = client::uvm_identity(root, uvm).await;
    let (data, session) = client::request(root, uvm, &request).await?;
    let session = session.ok_or("no stream")?;
    // The pid the shim chose: a successor is asked for the same process.
    let pid = data["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .or(pid);
    let resume = |at| reattach(&container, pid, at);
    let how = Follow {
        stdin: true,
        tty: data["tty"].as_bool().unwrap_or(false),
        identity,
        resume: pid
            .is_some()
            .then_some(&resume as &dyn Fn(LogOffsets) -> Request),
    };
    let from = serde_json::from_value(data["from"].clone()).unwrap_or_default();
    Ok(follow(root, uvm, session, from, how).await?.unwrap_or(0))
}

pub async fn logs(
    root: &Path,
    uvm: &str,
    container: String,
    pid: Option<u32>,
    follow: bool,
) -> Outcome {
    let request = |from| Request::Logs {
        container: container.clone(),
        pid,
        follow,
        from,
    };
    let identity = if follow {
        client::uvm_identity(root, uvm).await
    } else {
        client::UvmIdentity::default()
    };
    let (_, session) = client::request(root, uvm, &request(None)).await?;
    // The host process going away before the process ended: an upgrade or a restore hands
    // the UVM to a new one, which has the same logs; a follower goes on from there.
    let resume = |at| request(Some(at));
    let how = Follow {
        stdin: false,
        tty: false,
        identity,
        resume: follow.then_some(&resume as &dyn Fn(LogOffsets) -> Request),
    };
    let session = session.ok_or("no stream")?;
    self::follow(root, uvm, session, LogOffsets::default(), how).await?;
    Ok(0)
}

/// How long a streaming command waits for a new host process after its own went away.
const SUCCESSOR_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn wait(
    root: &Path,
    uvm: &str,
    container: String,
    pid: Option<u32>,
    json: bool,
) -> Outcome {
    let (data, _) = client::request(root, uvm, &Request::Wait { container, pid }).await?;
    if json {
        print_json(&data);
    }
    data["exit_code"]
        .as_i64()
        .map(|c| c as i32)
        .ok_or_else(|| "the shim did not report an exit code".into())
}

pub async fn kill(
    root: &Path,
    uvm: &str,
    container: String,
    pid: Option<u32>,
    signal: &str,
) -> Outcome {
    let signal = crate::cli::parse_signal(signal)?;
    client::request(
        root,
        uvm,
        &Request::Kill {
            container,
            pid,
            signal,
        },
    )
    .await?;
    Ok(0)
}

pub async fn rm(root: &Path, uvm: &str, container: String, force: bool, json: bool) -> Outcome {
    let (data, _) = client::request(root, uvm, &Request::Rm { container, force }).await?;
    if json {
        print_json(&data);
    } else {
        println!("{}", data["removed"].as_str().unwrap_or_default());
    }
    Ok(0)
}

fn command_text(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn exit_text(v: &Value) -> String {
    v["exit_code"]
        .as_i64()
        .map(|c| c.to_string())
        .unwrap_or_else(|| "-".into())
}

pub async fn ps(root: &Path, uvm: &str, container: Option<String>, json: bool) -> Outcome {
    let (data, _) = client::request(
        root,
        uvm,
        &Request::Ps {
            container: container.clone(),
        },
    )
    .await?;
    if json {
        print_json(&data);
        return Ok(0);
    }
    if container.is_none() {
        println!(
            "{:<16} {:>8} {:<8} {:>5} COMMAND",
            "CONTAINER", "PID", "STATUS", "EXIT"
        );
        for c in data["containers"].as_array().into_iter().flatten() {
            println!(
                "{:<16} {:>8} {:<8} {:>5} {}",
                c["id"].as_str().unwrap_or(""),
                c["pid"].to_string(),
                c["status"].as_str().unwrap_or(""),
                exit_text(c),
                command_text(&c["command"])
            );
        }
    } else {
        println!(
            "{:>8} {:<8} {:>5} {:<4} COMMAND",
            "PID", "STATUS", "EXIT", "TTY"
        );
        for p in data["processes"].as_array().into_iter().flatten() {
            println!(
                "{:>8} {:<8} {:>5} {:<4} {}",
                p["pid"].to_string(),
                p["status"].as_str().unwrap_or(""),
                exit_text(p),
                if p["tty"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                },
                command_text(&p["command"])
            );
        }
    }
    Ok(0)
}

// -- UVMs ------------------------------------------------------------------------------------

pub async fn uvm(root: &Path, cmd: UvmCommand, json: bool) -> Outcome {
    match cmd {
        UvmCommand::Start {
            name,
            backend,
            qemu,
            no_isolate,
            log_limit,
        } => {
            let pid = start_uvm(root, &name, backend, qemu, no_isolate, log_limit).await?;
            report_started(&name, pid, &UvmPaths::new(root, &name), json);
            Ok(0)
        }
        UvmCommand::Save { name, to } => {
            let path = uvm_save(root, &name, to).await?;
            if json {
                print_json(&serde_json::json!({"snapshot": path}));
            } else {
                println!("{}", path.display());
            }
            Ok(0)
        }
        UvmCommand::Restore { snapshot } => {
            let name = uvm_restore(root, &snapshot).await?;
            if json {
                print_json(&serde_json::json!({"restored": name}));
            } else {
                println!("{name}");
            }
            Ok(0)
        }
        UvmCommand::Upgrade { name } => {
            let path = uvm_save(root, &name, None).await?;
            uvm_restore(root, &path).await?;
            if json {
                print_json(&serde_json::json!({"upgraded": name}));
            } else {
                println!("{name}");
            }
            Ok(0)
        }
        UvmCommand::Receive {
            name,
            listen,
            memory_port,
            qemu,
        } => crate::migrate::receive(root, &name, listen, memory_port, &qemu, json).await,
        UvmCommand::Stop { name } => uvm_stop(root, &name, json).await,
        UvmCommand::Resume { name } => {
            client::request(root, &name, &Request::ResumeSource).await?;
            println!("{name}");
            Ok(0)
        }
        UvmCommand::Ls => uvm_ls(root, json).await,
        UvmCommand::Inspect { name } => {
            let (data, _) = client::request(root, &name, &Request::Info).await?;
            print_json(&data);
            Ok(0)
        }
        UvmCommand::Rm { name } => {
            paths::validate_uvm_name(&name)?;
            if client::request(root, &name, &Request::Info).await.is_ok() {
                return Err(format!(
                    "UVM {name:?} is running; stop it first (`ferry uvm stop {name}`)"
                ));
            }
            let dir = UvmPaths::new(root, &name).dir;
            if !dir.exists() {
                return Err(format!("no UVM {name:?} in {}", root.display()));
            }
            std::fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
            println!("{name}");
            Ok(0)
        }
    }
}

/// Starts UVM `name` (building the QEMU image on first use) and returns its shim's pid.
pub async fn start_uvm(
    root: &Path,
    name: &str,
    backend: BackendKind,
    mut qemu: QemuArgs,
    no_isolate: bool,
    log_limit: u64,
) -> Result<u32, String> {
    paths::validate_uvm_name(name)?;
    if client::request(root, name, &Request::Info).await.is_ok() {
        return Err(format!("UVM {name:?} is already running"));
    }
    let mut extra = vec![format!("--log-limit={log_limit}")];
    if no_isolate {
        extra.push("--isolate=false".into());
    }
    if backend == BackendKind::Qemu {
        let (kernel, initrd) = match (qemu.kernel.take(), qemu.initrd.take()) {
            (Some(k), Some(i)) => (k, i),
            _ => {
                let built = build_image(image::BuildOptions::new(
                    root.join("images").join("uvm"),
                    image::find_static_gcs().map_err(|e| e.to_string())?,
                ))
                .await?;
                (built.vmlinux, built.initramfs)
            }
        };
        qemu.kernel = Some(kernel);
        qemu.initrd = Some(initrd);
        extra.push("--backend=qemu".into());
        extra.extend(qemu.shim_args());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    spawn_shim(root, name, &extra).await
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().map(|l| format!("\n  {l}")).collect()
}

fn report_started(name: &str, shim_pid: u32, p: &UvmPaths, json: bool) {
    if json {
        print_json(&serde_json::json!({"name": name, "shim_pid": shim_pid, "state_dir": p.dir}));
    } else {
        println!("{name}");
    }
}

/// Starts a shim for `name` as a daemon and waits until it reports ready (or why not).
pub(crate) async fn spawn_shim(root: &Path, name: &str, extra: &[&str]) -> Result<u32, String> {
    let p = UvmPaths::new(root, name);
    std::fs::create_dir_all(&p.dir)
        .map_err(|e| format!("cannot create {}: {e}", p.dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p.shim_log())
        .map_err(|e| format!("cannot open {}: {e}", p.shim_log().display()))?;
    let (ready_r, ready_w): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the ferry executable: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("shim")
        .arg(name)
        .args(extra)
        .env("FERRY_STATE_DIR", root);
    let log_err = log.try_clone().map_err(|e| format!("log: {e}"))?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err);
    let w = ready_w.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, dup2).
    unsafe {
        cmd.pre_exec(move || {
            // A daemon: its own session, and the readiness pipe on fd 3.
            libc::setsid();
            if libc::dup2(w, crate::shim::READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the shim: {e}"))?;
    drop(ready_w);
    let shim_pid = child.id();
    let read = tokio::task::spawn_blocking(move || {
        // One line: "ok" or "error: ..."; end-of-file without one means the shim died.
        let mut line = String::new();
        let _ = std::io::BufReader::new(std::fs::File::from(ready_r)).read_line(&mut line);
        line
    });
    // A QEMU UVM under software emulation takes 5-20 s to boot; this bounds only a hang.
    let ready = tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .map_err(|_| {
            format!(
                "UVM {name:?} did not become ready within 120 s; see {}",
                p.shim_log().display()
            )
        })?
        .unwrap_or_default();
    let ready = ready.trim();
    if ready == "ok" {
        Ok(shim_pid)
    } else if let Some(e) = ready.strip_prefix("error: ") {
        Err(format!("UVM {name:?}: {e}"))
    } else {
        Err(format!(
            "the shim for UVM {name:?} exited during start-up; last lines of {}:{}",
            p.shim_log().display(),
            log_tail(&p.shim_log(), 8)
        ))
    }
}

async fn uvm_save(
    root: &Path,
    name: &str,
    to: Option<std::path::PathBuf>,
) -> Result<std::path::PathBuf, String> {
    let (info, _) = client::request(root, name, &Request::Info).await?;
    let to = to.map(|p| std::path::absolute(&p).unwrap_or(p));
    let (data, _) = client::request(
        root,
        name,
        &Request::Save {
            to: to.map(|p| p.display().to_string()),
        },
    )
    .await?;
    // The shim exits after answering; the UVM keeps running.
    if let Some(pid) = info["shim_pid"].as_u64()
        && !uvm::local::wait_pid_exit(pid as u32, Duration::from_secs(15)).await
    {
        return Err(format!(
            "the snapshot is written but the old shim (pid {pid}) is still running"
        ));
    }
    Ok(data["snapshot"]
        .as_str()
        .map(Into::into)
        .unwrap_or_default())
}

async fn uvm_restore(root: &Path, snapshot: &Path) -> Result<String, String> {
    let snap = crate::snapshot::read(snapshot).map_err(|e| e.to_string())?;
    let name = snap.uvm.name.clone();
    paths::validate_uvm_name(&name)?;
    if let Ok((info, _)) = client::request(root, &name, &Request::Info).await {
        return Err(format!(
            "UVM {name:?} is already served by a host process (shim pid {}); this snapshot was already restored or is stale",
            info["shim_pid"]
        ));
    }
    let path = std::path::absolute(snapshot).map_err(|e| format!("{}: {e}", snapshot.display()))?;
    spawn_shim(root, &name, &["--restore", &path.display().to_string()]).await?;
    Ok(name)
}

async fn uvm_stop(root: &Path, name: &str, json: bool) -> Outcome {
    let info = match client::request(root, name, &Request::Info).await {
        Ok((info, _)) => info,
        Err(e) => return stop_orphan(root, name, json, e).await,
    };
    client::request(root, name, &Request::Stop).await?;
    if let Some(pid) = info["shim_pid"].as_u64()
        && !uvm::local::wait_pid_exit(pid as u32, Duration::from_secs(15)).await
    {
        return Err(format!(
            "UVM {name:?} stopped but its shim (pid {pid}) is still running"
        ));
    }
    if json {
        print_json(&serde_json::json!({"stopped": name}));
    } else {
        println!("{name}");
    }
    Ok(0)
}

/// The QEMU a UVM's snapshot records, when it still runs without its host process (the shim
/// crashed or was killed; e.g. a migration's source killed after the switch-over, its copy
/// left paused).
async fn orphan_qemu(root: &Path, name: &str) -> Option<QemuUvm> {
    let dir = UvmPaths::new(root, name).dir;
    let snap = crate::snapshot::read(&dir.join("snapshot")).ok()?;
    let q = snap.uvm.qemu.as_ref()?;
    let config = crate::shim::backend::qemu_config(name, snap.uvm.state_dir.clone(), q);
    // Checks that the pid is this UVM's QEMU (its QMP socket on its command line).
    QemuUvm::adopt(config, snap.uvm.agent_pid).await.ok()
}

/// `uvm stop` of a UVM whose shim is gone: stops the QEMU it left, if any; else `unreachable`.
async fn stop_orphan(root: &Path, name: &str, json: bool, unreachable: String) -> Outcome {
    let Some(mut qemu) = orphan_qemu(root, name).await else {
        return Err(unreachable);
    };
    let pid = uvm::UtilityVm::properties(&qemu).pid;
    uvm::UtilityVm::stop(&mut qemu, Duration::from_secs(5))
        .await
        .map_err(|e| {
            format!("UVM {name:?} has no host process and its QEMU would not stop: {e}")
        })?;
    tracing::warn!(name, ?pid, "stopped a QEMU left without its host process");
    if json {
        print_json(&serde_json::json!({"stopped": name, "orphaned_qemu": pid}));
    } else {
        println!(
            "{name} (its QEMU, pid {}, had no host process)",
            pid.unwrap_or_default()
        );
    }
    Ok(0)
}

async fn uvm_ls(root: &Path, json: bool) -> Outcome {
    let mut names: Vec<String> = std::fs::read_dir(paths::uvms_dir(root))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut rows = Vec::new();
    for name in names {
        let info = client::request(root, &name, &Request::Info)
            .await
            .ok()
            .map(|(d, _)| d);
        let paths = UvmPaths::new(root, &name);
        rows.push(match info {
            Some(d) => serde_json::json!({
                "name": name,
                "status": match (d["uvm"]["running"].as_bool(), d["uvm"]["paused"].as_bool()) {
                    (Some(false), _) => "waiting",
                    (_, Some(true)) => "paused",
                    _ => "running",
                },
                "backend": d["uvm"]["backend"],
                "pid": d["uvm"]["pid"],
                "containers": d["containers"].as_array().map(|a| a.len()).unwrap_or(0),
            }),
            None if orphan_qemu(root, &name).await.is_some() => serde_json::json!({
                "name": name, "status": "orphaned", "backend": "qemu", "pid": null,
                "containers": 0,
                "hint": format!("its QEMU runs without a host process: `ferry uvm restore` takes it over, `ferry uvm stop {name}` ends it"),
            }),
            // A UVM that left by live migration says where to.
            None => match std::fs::read_to_string(paths.migrated()) {
                Ok(to) => serde_json::json!({"name": name, "status": "migrated", "backend": "qemu",
                    "pid": null, "containers": 0, "to": to.trim()}),
                Err(_) => serde_json::json!({"name": name, "status": "stopped", "backend": "-",
                    "pid": null, "containers": 0}),
            },
        });
    }
    if json {
        print_json(&Value::Array(rows));
        return Ok(0);
    }
    println!(
        "{:<20} {:<8} {:<8} {:>8} {:>10}",
        "NAME", "STATUS", "BACKEND", "PID", "CONTAINERS"
    );
    for r in rows {
        println!(
            "{:<20} {:<8} {:<8} {:>8} {:>10}",
            r["name"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["backend"].as_str().unwrap_or(""),
            r["pid"]
                .as_u64()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            r["containers"].to_string()
        );
    }
    Ok(0)
}

// -- VM images -------------------------------------------------------------------------------

/// Builds the QEMU boot image (or finds it in the cache).
async fn build_image(opts: image::BuildOptions) -> Result<image::Image, String> {
    // Downloads, unpacking and decompression block: off the runtime's thread.
    tokio::task::spawn_blocking(move || image::build(&opts))
        .await
        .map_err(|e| format!("image build: {e}"))?
        .map_err(|e| format!("image build: {e}"))
}

pub async fn image(root: &Path, cmd: crate::cli::ImageCommand, json: bool) -> Outcome {
    let crate::cli::ImageCommand::Build {
        gcs,
        busybox,
        kernel_deb,
        kernel_package,
        cache_dir,
    } = cmd;
    let gcs = match gcs {
        Some(p) => p,
        None => image::find_static_gcs().map_err(|e| e.to_string())?,
    };
    let mut opts = image::BuildOptions::new(
        cache_dir.unwrap_or_else(|| root.join("images").join("uvm")),
        gcs,
    );
    opts.busybox = busybox;
    opts.kernel_deb = kernel_deb;
    opts.kernel_package = kernel_package;
    let built = build_image(opts).await?;
    if json {
        print_json(&serde_json::to_value(&built).unwrap_or_default());
    } else {
        println!("vmlinux: {}", built.vmlinux.display());
        println!("initramfs: {}", built.initramfs.display());
        if built.reused {
            eprintln!("(cached: same inputs as an earlier build)");
        }
    }
    Ok(0)
}
