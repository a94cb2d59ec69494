//! One function per control request.

use super::Shim;
use super::backend::{Backend, BackendKind};
use super::state::{ContainerRec, Logs, ProcRec};
use super::stream::{self, StartAt, StreamPlan};
use crate::control::{self, LogOffsets, ProcessSpec, Reply, Request, Rootfs};
use crate::spec;
use bridge::message::ProcessParameters;
use host::{Container, Pipes};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::BufReader;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

type Outcome = Result<(serde_json::Value, Option<StreamPlan>), String>;

pub async fn dispatch(
    shim: Arc<Shim>,
    request: Request,
    r: BufReader<OwnedReadHalf>,
    mut w: OwnedWriteHalf,
) {
    let is_stop = matches!(request, Request::Stop | Request::Save { .. });
    if !matches!(request, Request::Info | Request::ResumeSource)
        && shim.stopping.load(std::sync::atomic::Ordering::SeqCst)
    {
        let _ = control::write_line(
            &mut w,
            &Reply::error(format!("UVM {:?} {}", shim.name, control::HANDING_OVER)),
        )
        .await;
        return;
    }
    let request = match request {
        Request::Migrate {
            to,
            options,
            dry_run,
        } => return super::migrate::source(shim, to, options, dry_run, r, w).await,
        Request::ImportRootfs { container } => {
            return super::rootfs::import(shim, container, r, w).await;
        }
        Request::Incoming(_) => {
            let e = format!(
                "UVM {:?} is running here; it cannot receive another",
                shim.name
            );
            let _ = control::write_line(&mut w, &Reply::error(e)).await;
            return;
        }
        other => other,
    };
    let outcome = match request {
        Request::Migrate { .. } | Request::Incoming(_) | Request::ImportRootfs { .. } => {
            unreachable!("handled above")
        }
        Request::ResumeSource => super::migrate::resume_source(&shim).await,
        Request::Info => info(&shim).await,
        Request::Stop => stop(&shim).await,
        Request::Save { to } => save(&shim, to).await,
        Request::Run {
            id,
            rootfs,
            process,
        } => run(&shim, id, rootfs, process).await,
        Request::Exec { container, process } => exec(&shim, &container, process).await,
        Request::Attach {
            container,
            pid,
            from,
        } => attach(&shim, &container, pid, from),
        Request::Ps { container } => ps(&shim, container.as_deref()),
        Request::Kill {
            container,
            pid,
            signal,
        } => kill(&shim, &container, pid, signal).await,
        Request::Wait { container, pid } => wait(&shim, &container, pid).await,
        Request::Logs {
            container,
            pid,
            follow,
            from,
        } => logs(&shim, &container, pid, follow, from),
        Request::Rm { container, force } => rm(&shim, &container, force).await,
    };
    match outcome {
        Ok((data, plan)) => {
            // However the session ends (even before it starts), the capture stops waiting.
            let _release = plan.as_ref().map(|p| stream::ReleaseHolds(p.rec.clone()));
            let written = control::write_line(&mut w, &Reply::ok(data)).await;
            if is_stop {
                shim.stop.send_replace(true);
            }
            if written.is_err() {
                return;
            }
            if let Some(plan) = plan {
                stream::run(plan, r, w).await;
            }
        }
        Err(e) => {
            tracing::info!(error = %e, "control request failed");
            let _ = control::write_line(&mut w, &Reply::error(e)).await;
            if is_stop && shim.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                shim.stop.send_replace(true);
            }
        }
    }
}

fn find_container(shim: &Shim, id: &str) -> Result<(Arc<Container>, Arc<ProcRec>), String> {
    let containers = shim.containers.lock().unwrap_or_else(|p| p.into_inner());
    let c = containers.get(id).ok_or_else(|| {
        format!(
            "no container {id:?} in UVM {:?} (see `ferry ps {}`)",
            shim.name, shim.name
        )
    })?;
    Ok((c.container.clone(), c.init.clone()))
}

fn find_proc(shim: &Shim, container: &str, pid: Option<u32>) -> Result<Arc<ProcRec>, String> {
    let containers = shim.containers.lock().unwrap_or_else(|p| p.into_inner());
    let c = containers.get(container).ok_or_else(|| {
        format!(
            "no container {container:?} in UVM {:?} (see `ferry ps {}`)",
            shim.name, shim.name
        )
    })?;
    match pid {
        None => Ok(c.init.clone()),
        Some(pid) => c.procs.get(&pid).cloned().ok_or_else(|| {
            format!(
                "no process {pid} in container {container:?} (see `ferry ps {} {container}`)",
                shim.name
            )
        }),
    }
}

async fn info(shim: &Shim) -> Outcome {
    let outgoing = super::migrate::lock_outgoing(shim).clone();
    // A migration's transfer holds the UVM for seconds: answer from what it saw at its start
    // rather than wait (`ferry uvm ls` and monitoring ask this).
    let props = match (
        shim.uvm.try_lock(),
        outgoing.as_ref().and_then(|o| o.uvm.clone()),
    ) {
        (Ok(uvm), _) => uvm.properties(),
        (Err(_), Some(props)) => props,
        (Err(_), None) => shim.uvm.lock().await.properties(),
    };
    let containers: Vec<_> = shim
        .containers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(ContainerRec::info)
        .collect();
    let caps = shim.conn.capabilities();
    Ok((
        json!({
            "uvm": props,
            "shim_pid": std::process::id(),
            "guest": {"exit_records": caps.ferry_exit_records, "protocol": 4},
            "containers": containers,
            "last_migration": shim.last_migration.as_ref().map(|r| r.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            "migrating": outgoing,
        }),
        None,
    ))
}

async fn stop(shim: &Shim) -> Outcome {
    shim.stopping
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let result = shim.uvm.lock().await.stop(Duration::from_secs(5)).await;
    result.map_err(|e| e.to_string())?;
    Ok((json!({"stopped": shim.name}), None))
}

async fn save(shim: &Shim, to: Option<String>) -> Outcome {
    shim.stopping
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let result = async {
        let snap = super::restore::snapshot(shim).await?;
        let path = to
            .map(PathBuf::from)
            .unwrap_or_else(|| shim.paths.dir.join("snapshot"));
        crate::snapshot::write(&path, &snap).map_err(|e| e.to_string())?;
        tracing::info!(path = %path.display(), "snapshot written; handing the UVM over");
        if let Backend::Qemu(u) = &mut *shim.uvm.lock().await {
            // Output the guest sends meanwhile is still logged: the next host resumes each
            // stream from its log, not from the snapshot.
            u.release_channel();
        }
        Ok((
            json!({"snapshot": path, "uvm": shim.name, "agent_pid": snap.uvm.agent_pid}),
            None,
        ))
    }
    .await;
    if result.is_err() {
        // Nothing handed over: keep serving.
        shim.stopping
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
    result
}

/// A short random container id.
fn generate_id() -> String {
    let mut bytes = [0u8; 6];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Releases a claimed container id when the run ends, however it ends.
struct Claim<'a> {
    shim: &'a Shim,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.shim
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

async fn resolve_rootfs(shim: &Shim, rootfs: &Rootfs) -> Result<PathBuf, String> {
    if shim.kind == BackendKind::Qemu {
        // The container runs inside the VM: its root is a directory there, and the built-in
        // image is part of the guest's initramfs (it migrates with the guest's memory).
        return match rootfs {
            Rootfs::Dir(d) if d.starts_with('/') => Ok(PathBuf::from(d)),
            Rootfs::Dir(d) => Err(format!(
                "rootfs {d}: on a qemu UVM --rootfs names an absolute directory inside the guest"
            )),
            Rootfs::Image(i) if i == "busybox" => Ok(PathBuf::from(image::GUEST_BUSYBOX_ROOTFS)),
            Rootfs::Image(i) => Err(format!(
                "unknown image {i:?}: the built-in image is \"busybox\""
            )),
        };
    }
    match rootfs {
        Rootfs::Dir(d) => {
            let p = PathBuf::from(d);
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => {
                    std::fs::canonicalize(&p).map_err(|e| format!("rootfs {d}: {e}"))
                }
                Ok(_) => Err(format!("rootfs {d} is not a directory")),
                Err(_) => Err(format!("rootfs {d} does not exist")),
            }
        }
        Rootfs::Image(i) if i == "busybox" => {
            let root = shim.root.clone();
            tokio::task::spawn_blocking(move || spec::busybox_image(&root))
                .await
                .map_err(|e| format!("building the busybox image: {e}"))?
        }
        Rootfs::Image(i) => Err(format!(
            "unknown image {i:?}: the built-in image is \"busybox\"; or pass --rootfs DIR"
        )),
    }
}

fn params_for(p: &ProcessSpec) -> (ProcessParameters, Pipes) {
    let params = ProcessParameters {
        emulate_console: p.tty,
        console_size: p.console.map(|(rows, cols)| [rows, cols]),
        ..Default::default()
    };
    let pipes = Pipes {
        stdin: p.stdin,
        stdout: true,
        // A terminal has one output.
        stderr: !p.tty,
    };
    (params, pipes)
}

async fn run(shim: &Shim, id: Option<String>, rootfs: Rootfs, p: ProcessSpec) -> Outcome {
    let id = id.unwrap_or_else(generate_id);
    bridge::validate_container_id(&id).map_err(|e| e.to_string())?;
    if id == bridge::UVM_CONTAINER_ID {
        return Err("that id names the UVM itself".into());
    }
    if p.args.is_empty() {
        return Err("no command given (ferry run UVM [OPTIONS] -- COMMAND [ARGS...])".into());
    }
    {
        let containers = shim.containers.lock().unwrap_or_else(|p| p.into_inner());
        let mut creating = shim.creating.lock().unwrap_or_else(|p| p.into_inner());
        if containers.contains_key(&id) || !creating.insert(id.clone()) {
            return Err(format!(
                "container {id:?} already exists in UVM {:?}",
                shim.name
            ));
        }
    }
    let _claim = Claim {
        shim,
        id: id.clone(),
    };
    let rootfs = resolve_rootfs(shim, &rootfs).await?;
    let oci = spec::container_spec(&id, &rootfs, &p)?;
    let container = Container::create(&shim.conn, &id, host::container::config_for(oci, ""))
        .await
        .map_err(|e| format!("cannot create container {id:?}: {}", e.message()))?;
    let (params, pipes) = params_for(&p);
    let process = match container.create_process(params, pipes).await {
        Ok(process) => process,
        Err(e) => {
            // Nothing half-created: the container goes again.
            if let Err(d) = container.delete_state().await {
                tracing::warn!(container = %id, error = %d, "cleanup after a failed start failed");
            }
            return Err(e.message());
        }
    };
    let rec = ProcRec::start(
        process,
        &id,
        p.args.clone(),
        p.tty,
        true,
        Logs::new(&shim.paths.logs().join(&id), shim.log_limit, !p.detach),
    )
    .map_err(|e| format!("cannot capture output: {e}"))?;
    let pid = rec.pid;
    shim.containers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id.clone(),
            ContainerRec {
                id: id.clone(),
                container: Arc::new(container),
                init: rec.clone(),
                procs: [(pid, rec.clone())].into(),
                rootfs,
                created: SystemTime::now(),
            },
        );
    tracing::info!(container = %id, pid, command = ?p.args, "container running");
    super::restore::persist(shim).await;
    let plan = (!p.detach).then(|| StreamPlan {
        rec,
        from: StartAt::Beginning,
        follow: true,
        stdin: p.stdin,
        attached: true,
    });
    Ok((json!({"container": id, "pid": pid}), plan))
}

async fn exec(shim: &Shim, id: &str, p: ProcessSpec) -> Outcome {
    if p.args.is_empty() {
        return Err(
            "no command given (ferry exec UVM CONTAINER [OPTIONS] -- COMMAND [ARGS...])".into(),
        );
    }
    let (container, init) = find_container(shim, id)?;
    if init.exit_state().is_some() {
        return Err(format!(
            "container {id:?} has exited; start a new one with `ferry run`"
        ));
    }
    let (mut params, pipes) = params_for(&p);
    params.oci_process = Some(Box::new(spec::exec_process(&p)?));
    let process = container
        .create_process(params, pipes)
        .await
        .map_err(|e| e.message())?;
    let rec = ProcRec::start(
        process,
        id,
        p.args.clone(),
        p.tty,
        false,
        Logs::new(&shim.paths.logs().join(id), shim.log_limit, !p.detach),
    )
    .map_err(|e| format!("cannot capture output: {e}"))?;
    let pid = rec.pid;
    if let Some(c) = shim
        .containers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(id)
    {
        c.procs.insert(pid, rec.clone());
    }
    super::restore::persist(shim).await;
    let plan = (!p.detach).then(|| StreamPlan {
        rec,
        from: StartAt::Beginning,
        follow: true,
        stdin: p.stdin,
        attached: true,
    });
    Ok((json!({"container": id, "pid": pid}), plan))
}

fn attach(shim: &Shim, container: &str, pid: Option<u32>, from: Option<LogOffsets>) -> Outcome {
    let rec = find_proc(shim, container, pid)?;
    // A client resuming (its host process was replaced) gets the rest and the exit code even
    // if the process ended meanwhile.
    if rec.exit_state().is_some() && from.is_none() {
        return Err(format!(
            "process {} in container {container:?} has exited; see its output with `ferry logs`",
            rec.pid
        ));
    }
    let pid = rec.pid;
    // Where this session starts, told to the client: it counts on from there, to resume at
    // the right place should this host process be replaced.
    let written = |log: &Option<Arc<super::output::OutputLog>>| {
        log.as_ref().map_or(0, |l| l.progress().written)
    };
    let from = from.unwrap_or(LogOffsets {
        stdout: written(&rec.stdout),
        stderr: written(&rec.stderr),
    });
    Ok((
        json!({"container": container, "pid": pid, "tty": rec.tty, "from": from}),
        Some(StreamPlan {
            rec,
            from: StartAt::Offsets(from),
            follow: true,
            stdin: true,
            attached: true,
        }),
    ))
}

fn logs(
    shim: &Shim,
    container: &str,
    pid: Option<u32>,
    follow: bool,
    from: Option<LogOffsets>,
) -> Outcome {
    let rec = find_proc(shim, container, pid)?;
    let pid = rec.pid;
    Ok((
        json!({"container": container, "pid": pid}),
        Some(StreamPlan {
            rec,
            from: from.map_or(StartAt::Beginning, StartAt::Offsets),
            follow,
            stdin: false,
            attached: false,
        }),
    ))
}

fn ps(shim: &Shim, container: Option<&str>) -> Outcome {
    let containers = shim.containers.lock().unwrap_or_else(|p| p.into_inner());
    let data = match container {
        None => {
            json!({"containers": containers.values().map(ContainerRec::info).collect::<Vec<_>>()})
        }
        Some(id) => {
            let c = containers
                .get(id)
                .ok_or_else(|| format!("no container {id:?} in UVM {:?}", shim.name))?;
            json!({"processes": c.procs.values().map(|p| p.info()).collect::<Vec<_>>()})
        }
    };
    Ok((data, None))
}

async fn kill(shim: &Shim, container: &str, pid: Option<u32>, signal: i32) -> Outcome {
    let rec = find_proc(shim, container, pid)?;
    if rec.exit_state().is_some() {
        return Err(format!(
            "process {} in container {container:?} has already exited",
            rec.pid
        ));
    }
    rec.process
        .signal(signal)
        .await
        .map_err(|e| format!("cannot signal process {}: {e}", rec.pid))?;
    Ok((
        json!({"container": container, "pid": rec.pid, "signal": signal}),
        None,
    ))
}

async fn wait(shim: &Shim, container: &str, pid: Option<u32>) -> Outcome {
    let rec = find_proc(shim, container, pid)?;
    let code = rec.wait().await?;
    Ok((
        json!({"container": container, "pid": rec.pid, "exit_code": code}),
        None,
    ))
}

async fn rm(shim: &Shim, id: &str, force: bool) -> Outcome {
    let (container, init) = find_container(shim, id)?;
    if init.exit_state().is_none() {
        if !force {
            return Err(format!(
                "container {id:?} is running; stop it first or use `ferry rm --force`"
            ));
        }
        init.process
            .kill()
            .await
            .map_err(|e| format!("cannot kill container {id:?}: {e}"))?;
        init.wait().await.ok();
    }
    container
        .delete_state()
        .await
        .map_err(|e| format!("cannot delete container {id:?}: {e}"))?;
    shim.containers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(id);
    let _ = std::fs::remove_dir_all(shim.paths.logs().join(id));
    super::restore::persist(shim).await;
    Ok((json!({"removed": id}), None))
}
