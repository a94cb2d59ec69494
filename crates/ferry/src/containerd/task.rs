//! containerd's Task service (`containerd.task.v2.Task`) for one sandbox: each task is a ferry
//! container in the sandbox's UVM, each exec a ferry process in it. The UVM and everything in
//! it belong to a ferry shim; this service is its client, as the `ferry` CLI is.

use super::bundle;
use super::config::{self, Backend, RuntimeConfig};
use super::stdio::{self, Control, Ended, Output, StdioPaths};
use crate::client;
use crate::control::{ProcessSpec, Request, Rootfs};
use crate::paths::UvmPaths;
use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, TtrpcResult};
use containerd_shim_protos::api;
use containerd_shim_protos::api::Empty;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::watch;

/// A refused request: logged, and answered with `code` (what containerd maps to its errors).
pub(super) fn fail(code: Code, msg: impl ToString) -> ttrpc::Error {
    let msg = msg.to_string();
    tracing::warn!(error = %msg, "request refused");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Exit {
    code: u32,
    at: SystemTime,
}

/// A task's init process or one of its execs.
struct Proc {
    container: String,
    exec_id: String,
    stdio: StdioPaths,
    spec: ProcessSpec,
    state: Mutex<ProcState>,
    exit: watch::Sender<Option<Exit>>,
}

struct ProcState {
    status: Status,
    pid: u32,
    control: Option<Control>,
}

impl Proc {
    fn new(container: &str, exec_id: &str, stdio: StdioPaths, spec: ProcessSpec) -> Arc<Proc> {
        Arc::new(Proc {
            container: container.into(),
            exec_id: exec_id.into(),
            stdio,
            spec,
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid: 0,
                control: None,
            }),
            exit: watch::channel(None).0,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

struct TaskRec {
    bundle: PathBuf,
    root: PathBuf,
    /// The migration session this task arrives by (created here, started elsewhere).
    incoming: Option<String>,
    /// Whether this shim mounted the root (and unmounts it on delete).
    mounted: bool,
    procs: HashMap<String, Arc<Proc>>,
}

/// The sandbox's UVM, once the first task has started it.
#[derive(Clone)]
pub struct Uvm {
    pub root: PathBuf,
    pub name: String,
    pub backend: Backend,
}

pub struct Service {
    namespace: String,
    shim_id: String,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
    uvm: tokio::sync::Mutex<Option<Uvm>>,
    tasks: Mutex<HashMap<String, TaskRec>>,
    /// Serialises creations, so two creates of one id cannot both pass the existence check.
    creating: tokio::sync::Mutex<()>,
    /// The configuration of the create that made this sandbox a migration destination.
    incoming_config: Mutex<Option<RuntimeConfig>>,
    /// Where an incoming sandbox stands; starts of its tasks wait for it.
    arrival: watch::Sender<Arrival>,
}

/// An incoming sandbox's progress, as its tasks' starts see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    Pending,
    Arrived,
    Abandoned(String),
}

impl Service {
    pub fn new(
        namespace: String,
        shim_id: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        Service {
            namespace,
            shim_id,
            publisher: Arc::new(publisher),
            exit,
            uvm: tokio::sync::Mutex::new(None),
            tasks: Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
            incoming_config: Mutex::new(None),
            arrival: watch::channel(Arrival::Pending).0,
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskRec>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, id: &str, exec_id: &str) -> TtrpcResult<Arc<Proc>> {
        let tasks = self.tasks();
        let task = tasks
            .get(id)
            .ok_or_else(|| fail(Code::NOT_FOUND, format!("task {id:?} not found")))?;
        let key = exec_id;
        task.procs.get(key).cloned().ok_or_else(|| {
            fail(
                Code::NOT_FOUND,
                format!("process {exec_id:?} of task {id:?} not found"),
            )
        })
    }

    /// The sandbox's UVM, if it has one.
    pub async fn current_uvm(&self) -> Option<Uvm> {
        self.uvm.lock().await.clone()
    }

    /// Forgets the UVM without stopping it: it has moved to another host.
    pub async fn release_uvm(&self) {
        self.uvm.lock().await.take();
        let _ = std::fs::remove_file(UVM_RECORD);
    }

    /// The configuration an incoming task was created with, if this sandbox is a migration
    /// destination.
    pub fn incoming_config(&self) -> Option<RuntimeConfig> {
        self.incoming_config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The tasks created here to arrive by `session`.
    pub fn incoming_tasks(&self, session: &str) -> Vec<String> {
        self.tasks()
            .iter()
            .filter(|(_, t)| t.incoming.as_deref() == Some(session))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The sandbox has arrived: it runs in `uvm`; waiting starts attach to its tasks.
    pub async fn arrive(&self, uvm: Uvm) {
        record_uvm(&uvm);
        *self.uvm.lock().await = Some(uvm);
        self.arrival.send_replace(Arrival::Arrived);
    }

    /// The migration that was to bring the sandbox ended without it.
    pub fn abandon(&self, why: &str) {
        self.arrival
            .send_replace(Arrival::Abandoned(why.to_string()));
    }

    /// The sandbox's tasks and, for each, its exec ids.
    pub fn task_ids(&self) -> Vec<(String, Vec<String>)> {
        self.tasks()
            .iter()
            .map(|(id, t)| {
                let execs = t.procs.keys().filter(|k| !k.is_empty()).cloned().collect();
                (id.clone(), execs)
            })
            .collect()
    }

    async fn uvm(&self) -> TtrpcResult<Uvm> {
        self.uvm
            .lock()
            .await
            .clone()
            .ok_or_else(|| fail(Code::FAILED_PRECONDITION, "the sandbox has no UVM"))
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            tracing::warn!(topic, error = %e, "cannot publish the event to containerd");
        }
    }

    async fn publish_create(&self, req: &api::CreateTaskRequest) {
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                pid: 0,
                ..Default::default()
            }),
        )
        .await;
    }

    /// Starts the sandbox's UVM on the first task (or finds it running from an earlier life
    /// of this shim).
    async fn ensure_uvm(&self, cfg: &RuntimeConfig) -> Result<Uvm, String> {
        let mut slot = self.uvm.lock().await;
        if let Some(u) = slot.as_ref() {
            return Ok(u.clone());
        }
        let uvm = Uvm {
            root: cfg.state_root(),
            name: config::uvm_name(&self.namespace, &self.shim_id),
            backend: cfg.backend.clone(),
        };
        if client::request(&uvm.root, &uvm.name, &Request::Info)
            .await
            .is_err()
        {
            let _ = std::fs::remove_dir_all(UvmPaths::new(&uvm.root, &uvm.name).dir);
            tracing::info!(uvm = %uvm.name, backend = ?cfg.backend, "starting the sandbox's UVM");
            crate::commands::start_uvm(
                &uvm.root,
                &uvm.name,
                cfg.backend_kind(),
                cfg.qemu_args(),
                false,
                cfg.log_limit_mib(),
            )
            .await?;
        }
        record_uvm(&uvm);
        *slot = Some(uvm.clone());
        Ok(uvm)
    }

    /// Stops the UVM and removes its state (the sandbox is gone).
    async fn stop_uvm(&self) {
        let Some(uvm) = self.uvm.lock().await.take() else {
            return;
        };
        stop_uvm(&uvm.root, &uvm.name).await;
        let _ = std::fs::remove_file(UVM_RECORD);
    }

    /// Watches a started process until it exits; records and publishes the exit.
    fn watch_exit(
        self: &Arc<Self>,
        proc_: Arc<Proc>,
        relay: tokio::task::JoinHandle<Ended>,
        uvm: Uvm,
    ) {
        let service = self.clone();
        tokio::spawn(async move {
            let pid = proc_.state().pid;
            let code = match relay.await {
                Ok(Ended::Exit(code)) => code,
                Ok(Ended::Lost(why)) => {
                    tracing::warn!(container = %proc_.container, pid, reason = %why, "output stream ended without an exit; asking the ferry shim");
                    service.wait_in_uvm(&uvm, &proc_, pid).await
                }
                Err(e) => {
                    tracing::error!(container = %proc_.container, pid, error = %e, "relay task failed");
                    service.wait_in_uvm(&uvm, &proc_, pid).await
                }
            };
            let exit = Exit {
                code: code as u32,
                at: SystemTime::now(),
            };
            {
                let mut st = proc_.state();
                st.status = Status::Stopped;
                st.control = None;
            }
            proc_.exit.send_replace(Some(exit));
            tracing::info!(container = %proc_.container, exec = %proc_.exec_id, pid, code, "process exited");
            service
                .publish(
                    topics::TASK_EXIT_EVENT_TOPIC,
                    Box::new(TaskExit {
                        container_id: proc_.container.clone(),
                        id: if proc_.exec_id.is_empty() {
                            proc_.container.clone()
                        } else {
                            proc_.exec_id.clone()
                        },
                        pid,
                        exit_status: exit.code,
                        exited_at: Some(timestamp(exit.at)).into(),
                        ..Default::default()
                    }),
                )
                .await;
        });
    }

    /// The exit code as the ferry shim saw it, when the stream broke; 255 if it cannot say.
    async fn wait_in_uvm(&self, uvm: &Uvm, p: &Proc, pid: u32) -> i32 {
        let req = Request::Wait {
            container: p.container.clone(),
            pid: Some(pid),
        };
        match client::request(&uvm.root, &uvm.name, &req).await {
            Ok((data, _)) => data["exit_code"].as_i64().unwrap_or(255) as i32,
            Err(e) => {
                tracing::error!(container = %p.container, pid, error = %e, "exit code lost; reporting 255");
                255
            }
        }
    }
}

/// Copies a task's root into the UVM (`ferry::shim::rootfs`); returns its path there.
async fn import_root(uvm: &Uvm, id: &str, root: &std::path::Path) -> Result<PathBuf, String> {
    use crate::control::{self, tag};
    use tokio::io::AsyncReadExt;
    let req = Request::ImportRootfs {
        container: id.to_string(),
    };
    let (data, session) = client::request(&uvm.root, &uvm.name, &req).await?;
    let path = data["path"]
        .as_str()
        .map(PathBuf::from)
        .ok_or("the ferry shim named no directory for the root")?;
    let (mut r, mut w) = session.ok_or("the ferry shim did not stream")?;
    let mut tar = tokio::process::Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["--numeric-owner", "-cf", "-", "."])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run tar to copy the root: {e}"))?;
    let mut out = tar.stdout.take().ok_or("tar has no stdout")?;
    let mut buf = vec![0u8; control::MAX_PAYLOAD];
    loop {
        let n = out
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading tar's output: {e}"))?;
        if n == 0 {
            break;
        }
        control::write_frame(&mut w, tag::STDIN, &buf[..n])
            .await
            .map_err(|e| format!("copying the root into the UVM: {e}"))?;
    }
    let status = tar
        .wait_with_output()
        .await
        .map_err(|e| format!("tar: {e}"))?;
    if !status.status.success() {
        return Err(format!(
            "tar of {} failed: {}",
            root.display(),
            String::from_utf8_lossy(&status.stderr).trim()
        ));
    }
    control::write_frame(&mut w, tag::STDIN_EOF, &[])
        .await
        .map_err(|e| format!("copying the root into the UVM: {e}"))?;
    let mut complaints = String::new();
    loop {
        let (t, payload) = control::read_frame(&mut r)
            .await
            .map_err(|e| format!("copying the root into the UVM: lost the ferry shim: {e}"))?
            .ok_or("copying the root into the UVM: lost the ferry shim: end of stream")?;
        match t {
            tag::STDERR => complaints.push_str(&String::from_utf8_lossy(&payload)),
            tag::EXIT if payload.len() == 4 => {
                let code = i32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if code != 0 {
                    return Err(format!(
                        "unpacking the root in the UVM failed (exit {code}): {}",
                        complaints.trim()
                    ));
                }
                return Ok(path);
            }
            tag::ERROR => return Err(String::from_utf8_lossy(&payload).into_owned()),
            t => return Err(format!("unexpected frame {t} from the ferry shim")),
        }
    }
}

/// The file in the bundle (the shim's working directory) that names the sandbox's UVM, so that
/// containerd's `delete` after a shim died stops that UVM and no other.
pub const UVM_RECORD: &str = "ferry-uvm.json";

fn record_uvm(uvm: &Uvm) {
    let record = serde_json::json!({"root": uvm.root, "name": uvm.name});
    if let Err(e) = std::fs::write(UVM_RECORD, record.to_string()) {
        tracing::warn!(error = %e, "cannot record the UVM in the bundle; a cleanup after a crash will not find it");
    }
}

/// The UVM recorded in the bundle at `dir`, if any.
pub fn recorded_uvm(dir: &std::path::Path) -> Option<(PathBuf, String)> {
    let text = std::fs::read(dir.join(UVM_RECORD)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let name = v["name"].as_str()?.to_string();
    crate::paths::validate_uvm_name(&name).ok()?;
    Some((PathBuf::from(v["root"].as_str()?), name))
}

/// Stops a UVM if it runs and removes its state directory.
pub async fn stop_uvm(root: &std::path::Path, name: &str) {
    if let Err(e) = client::request(root, name, &Request::Stop).await {
        tracing::debug!(uvm = name, error = %e, "stopping the UVM");
    }
    let dir = UvmPaths::new(root, name).dir;
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the UVM's state");
    }
}

/// Unmounts a task's root (mounted by this shim).
pub fn unmount_root(root: &std::path::Path) {
    if let Err(e) = nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH)
        && e != nix::errno::Errno::EINVAL
        && e != nix::errno::Errno::ENOENT
    {
        tracing::warn!(root = %root.display(), error = %e, "cannot unmount the task's root");
    }
}

/// The service as containerd sees it (cloned per connection by the framework).
#[derive(Clone)]
pub struct TaskService(pub Arc<Service>);

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let s = &self.0;
        bridge::validate_container_id(&req.id).map_err(|e| fail(Code::INVALID_ARGUMENT, e))?;
        let _one = s.creating.lock().await;
        if s.tasks().contains_key(&req.id) {
            return Err(fail(
                Code::ALREADY_EXISTS,
                format!("task {:?} already exists", req.id),
            ));
        }
        let options = req.options.as_ref();
        let cfg = RuntimeConfig::load_file()
            .and_then(|c| {
                c.with_options(
                    options.map(|o| o.type_url.as_str()).unwrap_or(""),
                    options.map(|o| o.value.as_slice()).unwrap_or(&[]),
                )
            })
            .map_err(|e| fail(Code::INVALID_ARGUMENT, e))?;
        let bundle = PathBuf::from(&req.bundle);
        let (mut spec, root) =
            bundle::load(&bundle).map_err(|e| fail(Code::INVALID_ARGUMENT, e))?;
        let stdio = StdioPaths::of(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        stdio.apply_to(&mut spec);
        if let Some(session) = cfg.incoming_session.clone() {
            // A migration destination: the task comes with its sandbox; nothing runs here
            // until the Migration service has received it.
            *s.incoming_config.lock().unwrap_or_else(|p| p.into_inner()) = Some(cfg.clone());
            s.tasks().insert(
                req.id.clone(),
                TaskRec {
                    bundle: bundle.clone(),
                    root,
                    incoming: Some(session.clone()),
                    mounted: false,
                    procs: [(String::new(), Proc::new(&req.id, "", stdio, spec))].into(),
                },
            );
            tracing::info!(task = %req.id, session = %session, "task created to arrive by migration");
            s.publish_create(&req).await;
            return Ok(api::CreateTaskResponse::default());
        }
        let mut mounted = false;
        if !req.rootfs.is_empty() {
            let target = config::bundle_rootfs(&bundle);
            std::fs::create_dir_all(&target).map_err(|e| {
                fail(
                    Code::INTERNAL,
                    format!("cannot create {}: {e}", target.display()),
                )
            })?;
            for m in &req.rootfs {
                if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, &target).await
                {
                    unmount_root(&target);
                    return Err(fail(
                        Code::INTERNAL,
                        format!(
                            "cannot mount the task's root ({} {}): {e}",
                            m.type_, m.source
                        ),
                    ));
                }
            }
            mounted = true;
        }
        if !root.is_dir() {
            if mounted {
                unmount_root(&config::bundle_rootfs(&bundle));
            }
            return Err(fail(
                Code::INVALID_ARGUMENT,
                format!("the task's root {} is not a directory", root.display()),
            ));
        }
        let prepared = match s.ensure_uvm(&cfg).await {
            // In a VM the root must be inside it: copied into guest memory, it moves with
            // the VM (a share of the host directory could not).
            Ok(uvm) if cfg.backend == Backend::Qemu => import_root(&uvm, &req.id, &root).await,
            Ok(_) => Ok(root.clone()),
            Err(e) => Err(e),
        };
        let root = match prepared {
            Ok(r) => r,
            Err(e) => {
                if mounted {
                    unmount_root(&config::bundle_rootfs(&bundle));
                }
                return Err(fail(Code::INTERNAL, e));
            }
        };
        let init = Proc::new(&req.id, "", stdio, spec);
        s.tasks().insert(
            req.id.clone(),
            TaskRec {
                bundle: bundle.clone(),
                root,
                incoming: None,
                mounted,
                procs: [(String::new(), init)].into(),
            },
        );
        tracing::info!(task = %req.id, bundle = %req.bundle, "task created");
        s.publish_create(&req).await;
        Ok(api::CreateTaskResponse {
            pid: 0,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let s = &self.0;
        let p = s.find(&req.id, &req.exec_id)?;
        {
            let st = p.state();
            if st.status != Status::Created {
                return Err(fail(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "process {:?} of task {:?} was already started",
                        req.exec_id, req.id
                    ),
                ));
            }
        }
        let out = Output::open(&p.stdio.stdout)
            .await
            .map_err(|e| fail(Code::INVALID_ARGUMENT, e))?;
        let err = Output::open(&p.stdio.stderr)
            .await
            .map_err(|e| fail(Code::INVALID_ARGUMENT, e))?;
        let incoming = s
            .tasks()
            .get(&req.id)
            .and_then(|t| t.incoming.clone())
            .filter(|_| req.exec_id.is_empty());
        if let Some(session) = &incoming {
            // Wait for the sandbox to arrive, then take over the running process.
            let mut rx = s.arrival.subscribe();
            let arrival = rx
                .wait_for(|a| *a != Arrival::Pending)
                .await
                .map_err(|_| fail(Code::INTERNAL, "the shim is going away"))?
                .clone();
            if let Arrival::Abandoned(why) = arrival {
                return Err(fail(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "task {:?} did not arrive by session {session:?}: {why}",
                        req.id
                    ),
                ));
            }
        }
        let uvm = s.uvm().await?;
        let request = if incoming.is_some() {
            Request::Attach {
                container: req.id.clone(),
                pid: None,
                from: None,
            }
        } else if req.exec_id.is_empty() {
            let root = s
                .tasks()
                .get(&req.id)
                .map(|t| t.root.clone())
                .ok_or_else(|| fail(Code::NOT_FOUND, format!("task {:?} not found", req.id)))?;
            Request::Run {
                id: Some(req.id.clone()),
                rootfs: Rootfs::Dir(root.display().to_string()),
                process: p.spec.clone(),
            }
        } else {
            Request::Exec {
                container: req.id.clone(),
                process: p.spec.clone(),
            }
        };
        let (data, session) = client::request(&uvm.root, &uvm.name, &request)
            .await
            .map_err(|e| fail(Code::UNKNOWN, e))?;
        let session =
            session.ok_or_else(|| fail(Code::INTERNAL, "the ferry shim did not stream"))?;
        let pid = data["pid"].as_u64().unwrap_or(0) as u32;
        let stdin = (!p.stdio.stdin.is_empty()).then(|| p.stdio.stdin.clone());
        let (control, relay) = stdio::relay(session, (out, err), stdin);
        {
            let mut st = p.state();
            st.status = Status::Running;
            st.pid = pid;
            st.control = Some(control);
        }
        tracing::info!(task = %req.id, exec = %req.exec_id, pid, "process started");
        if req.exec_id.is_empty() {
            s.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        } else {
            s.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        // After the start event: containerd must not see an exit before the start.
        s.watch_exit(p, relay, uvm);
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let s = &self.0;
        let p = s.find(&req.id, &req.exec_id)?;
        let (status, pid) = {
            let st = p.state();
            (st.status, st.pid)
        };
        if status == Status::Running {
            return Err(fail(
                Code::FAILED_PRECONDITION,
                format!(
                    "process {:?} of task {:?} is running; kill it first",
                    req.exec_id, req.id
                ),
            ));
        }
        let exit = p.exited().unwrap_or(Exit {
            code: 0,
            at: SystemTime::now(),
        });
        if req.exec_id.is_empty() {
            if status == Status::Stopped
                && let Ok(uvm) = s.uvm().await
            {
                let rm = Request::Rm {
                    container: req.id.clone(),
                    force: false,
                };
                if let Err(e) = client::request(&uvm.root, &uvm.name, &rm).await {
                    tracing::warn!(task = %req.id, error = %e, "removing the container from the UVM");
                }
            }
            let rec = s.tasks().remove(&req.id);
            if let Some(rec) = rec
                && rec.mounted
            {
                unmount_root(&config::bundle_rootfs(&rec.bundle));
            }
            s.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    id: req.id.clone(),
                    pid,
                    exit_status: exit.code,
                    exited_at: Some(timestamp(exit.at)).into(),
                    ..Default::default()
                }),
            )
            .await;
        } else if let Some(t) = s.tasks().get_mut(&req.id) {
            t.procs.remove(&req.exec_id);
        }
        tracing::info!(task = %req.id, exec = %req.exec_id, "deleted");
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.code,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let s = &self.0;
        s.find(&req.id, "")?;
        let uvm = s.uvm().await?;
        let ps = Request::Ps {
            container: Some(req.id.clone()),
        };
        let (data, _) = client::request(&uvm.root, &uvm.name, &ps)
            .await
            .map_err(|e| fail(Code::UNKNOWN, e))?;
        let processes = data["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["status"] == "running")
            .filter_map(|p| p["pid"].as_u64())
            .map(|pid| api::ProcessInfo {
                pid: pid as u32,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let s = &self.0;
        let p = s.find(&req.id, &req.exec_id)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| {
                fail(
                    Code::INVALID_ARGUMENT,
                    format!("signal {} is out of range", req.signal),
                )
            })?;
        let (status, pid) = {
            let st = p.state();
            (st.status, st.pid)
        };
        match status {
            Status::Stopped => {
                return Err(fail(Code::NOT_FOUND, "process already finished"));
            }
            Status::Created => {
                // Never started: it ends here, as a process killed by that signal would.
                let exit = Exit {
                    code: 128 + signal as u32,
                    at: SystemTime::now(),
                };
                p.state().status = Status::Stopped;
                p.exit.send_replace(Some(exit));
                return Ok(Empty::new());
            }
            Status::Running => {}
        }
        let uvm = s.uvm().await?;
        let kill = Request::Kill {
            container: req.id.clone(),
            pid: (!req.exec_id.is_empty()).then_some(pid),
            signal,
        };
        client::request(&uvm.root, &uvm.name, &kill)
            .await
            .map_err(|e| fail(Code::UNKNOWN, e))?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let s = &self.0;
        if req.exec_id.is_empty() || bridge::validate_container_id(&req.exec_id).is_err() {
            return Err(fail(
                Code::INVALID_ARGUMENT,
                format!("invalid exec id {:?}", req.exec_id),
            ));
        }
        let init = s.find(&req.id, "")?;
        if init.state().status != Status::Running {
            return Err(fail(
                Code::FAILED_PRECONDITION,
                format!("task {:?} is not running", req.id),
            ));
        }
        let value = req.spec.as_ref().map(|a| a.value.as_slice()).unwrap_or(&[]);
        let mut spec = bundle::exec_process(value).map_err(|e| fail(Code::INVALID_ARGUMENT, e))?;
        let stdio = StdioPaths::of(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        stdio.apply_to(&mut spec);
        {
            let mut tasks = s.tasks();
            let task = tasks
                .get_mut(&req.id)
                .ok_or_else(|| fail(Code::NOT_FOUND, format!("task {:?} not found", req.id)))?;
            if task.procs.contains_key(&req.exec_id) {
                return Err(fail(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} already exists in task {:?}", req.exec_id, req.id),
                ));
            }
            task.procs.insert(
                req.exec_id.clone(),
                Proc::new(&req.id, &req.exec_id, stdio, spec),
            );
        }
        s.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<Empty> {
        let p = self.0.find(&req.id, &req.exec_id)?;
        let control = p.state().control.clone();
        let control =
            control.ok_or_else(|| fail(Code::FAILED_PRECONDITION, "the process is not running"))?;
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        control
            .resize(rows, cols)
            .await
            .map_err(|e| fail(Code::UNAVAILABLE, e))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let p = self.0.find(&req.id, &req.exec_id)?;
        if req.stdin {
            let control = p.state().control.clone();
            if let Some(c) = control {
                c.close_stdin();
            }
        }
        Ok(Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let p = self.0.find(&req.id, &req.exec_id)?;
        let mut rx = p.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| fail(Code::INTERNAL, "the process record went away"))?
            .expect("waited for Some");
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let s = &self.0;
        let p = s.find(&req.id, &req.exec_id)?;
        let bundle = s
            .tasks()
            .get(&req.id)
            .map(|t| t.bundle.display().to_string())
            .unwrap_or_default();
        let (status, pid) = {
            let st = p.state();
            (st.status, st.pid)
        };
        let exit = p.exited();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle,
            pid,
            status: match status {
                Status::Created => api::Status::CREATED,
                Status::Running => api::Status::RUNNING,
                Status::Stopped => api::Status::STOPPED,
            }
            .into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.code).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.0.find(&req.id, "").map(|p| p.state().pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<Empty> {
        let s = &self.0;
        if !s.tasks().is_empty() {
            // containerd asks after every delete; the sandbox still has tasks.
            return Ok(Empty::new());
        }
        s.stop_uvm().await;
        tracing::info!("sandbox shut down");
        s.exit.signal();
        Ok(Empty::new())
    }
}
