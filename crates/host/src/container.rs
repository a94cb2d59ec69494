//! Containers in the guest (and the UVM itself, under the all-zero id), and creating
//! processes in them with their stdio pipes.

use crate::error::{HostError, Result};
use crate::guest_connection::{GuestConnection, Notifications};
use crate::process::{Process, ProcessIo};
use crate::stdio::{InputPipe, OutputPipe};
use bridge::JsonString;
use bridge::UVM_CONTAINER_ID;
use bridge::message::{
    BaseRequest, ContainerConfig, ContainerCreateRequest, ContainerNotification,
    ExecuteProcessRequest, ExecuteProcessSettings, GetPropertiesRequest, ProcessDetails,
    ProcessParameters, PropertyQuery, Request, RequestBase, Response, StdioPorts, property_type,
};
use std::time::Duration;
use tokio::sync::Mutex;
use transport::Listener;

/// Which stdio pipes a new process gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pipes {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl Pipes {
    pub const ALL: Pipes = Pipes {
        stdin: true,
        stdout: true,
        stderr: true,
    };
    pub const NONE: Pipes = Pipes {
        stdin: false,
        stdout: false,
        stderr: false,
    };
}

/// How long the guest may take to dial a stdio port after answering ExecuteProcess.
const STDIO_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Container {
    conn: GuestConnection,
    id: String,
    notifications: Mutex<Notifications>,
}

impl Container {
    /// Creates a container in the guest. Subscribes to its notifications first, so an early
    /// exit is never "unknown".
    pub async fn create(
        conn: &GuestConnection,
        id: &str,
        config: ContainerConfig,
    ) -> Result<Container> {
        let container = Container::open(conn, id);
        let result = conn
            .call(Request::Create(ContainerCreateRequest {
                base: RequestBase::for_container(id),
                container_config: JsonString(config),
                supported_versions: None,
            }))
            .await;
        if let Err(e) = result {
            conn.unsubscribe(id);
            return Err(e);
        }
        Ok(container)
    }

    /// A handle to a container that already exists in the guest (hcsshim's OpenContainer).
    pub fn open(conn: &GuestConnection, id: &str) -> Container {
        Container {
            notifications: Mutex::new(conn.subscribe(id)),
            conn: conn.clone(),
            id: id.to_string(),
        }
    }

    /// The utility VM itself: processes started here run outside any container.
    pub fn uvm(conn: &GuestConnection) -> Container {
        Container::open(conn, UVM_CONTAINER_ID)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn connection(&self) -> &GuestConnection {
        &self.conn
    }

    async fn simple(&self, make: fn(BaseRequest) -> Request) -> Result<()> {
        self.conn
            .call(make(BaseRequest {
                base: RequestBase::for_container(&self.id),
            }))
            .await
            .map(drop)
    }

    pub async fn start(&self) -> Result<()> {
        self.simple(Request::Start).await
    }

    pub async fn shutdown(&self, forced: bool) -> Result<()> {
        if forced {
            self.simple(Request::ShutdownForced).await
        } else {
            self.simple(Request::ShutdownGraceful).await
        }
    }

    pub async fn delete_state(&self) -> Result<()> {
        self.simple(Request::DeleteContainerState).await?;
        self.conn.unsubscribe(&self.id);
        Ok(())
    }

    /// Live processes.
    pub async fn processes(&self) -> Result<Vec<ProcessDetails>> {
        let r = self
            .conn
            .call(Request::GetProperties(GetPropertiesRequest {
                base: RequestBase::for_container(&self.id),
                query: JsonString(PropertyQuery {
                    property_types: vec![property_type::PROCESS_LIST.into()],
                }),
            }))
            .await?;
        match r {
            Response::GetProperties(p) => Ok(p.properties.0.process_list),
            other => Err(HostError::Protocol(format!(
                "{:?} answered GetProperties",
                other.rpc()
            ))),
        }
    }

    /// The next notification for this container (its exit, typically).
    pub async fn notification(&self) -> Result<ContainerNotification> {
        let mut rx = self.notifications.lock().await;
        tokio::select! {
            n = rx.recv() => n.ok_or_else(|| HostError::ConnectionClosed("notifications ended".into())),
            reason = self.conn.closed() => Err(HostError::ConnectionClosed(reason)),
        }
    }

    /// Starts a process with the pipes asked for: listens on fresh ports *before* sending
    /// ExecuteProcess (the guest dials them before it spawns), then subscribes to its exit.
    pub async fn create_process(
        &self,
        mut params: ProcessParameters,
        pipes: Pipes,
    ) -> Result<Process> {
        let mut ports = StdioPorts::default();
        let mut listeners: [Option<Listener>; 3] = [None, None, None];
        for (i, want) in [pipes.stdin, pipes.stdout, pipes.stderr]
            .into_iter()
            .enumerate()
        {
            if !want {
                continue;
            }
            let port = self.conn.allocate_port()?;
            listeners[i] = Some(self.conn.transport().listen(port).await?);
            match i {
                0 => ports.std_in = port,
                1 => ports.std_out = port,
                _ => ports.std_err = port,
            }
        }
        params.create_std_in_pipe = pipes.stdin;
        params.create_std_out_pipe = pipes.stdout;
        params.create_std_err_pipe = pipes.stderr;
        // Resumable streams whenever the guest offers them: a host restart or a migration then
        // loses no byte.
        let resumable = self.conn.capabilities().ferry_resumable_stdio >= 1;
        params.ferry_resumable_stdio = resumable;
        let r = self
            .conn
            .call(Request::ExecuteProcess(ExecuteProcessRequest {
                base: RequestBase::for_container(&self.id),
                settings: ExecuteProcessSettings {
                    process_parameters: JsonString(params),
                    vsock_stdio_relay_settings: ports,
                },
            }))
            .await?;
        let Response::ExecuteProcess(e) = r else {
            return Err(HostError::Protocol("wrong answer to ExecuteProcess".into()));
        };
        let mut io = ProcessIo::default();
        for (i, l) in listeners.into_iter().enumerate() {
            let Some(mut l) = l else { continue };
            let s = tokio::time::timeout(STDIO_ACCEPT_TIMEOUT, l.accept())
                .await
                .map_err(|_| {
                    HostError::Timeout(format!(
                        "the guest did not connect stdio port {:#x} of process {} within {STDIO_ACCEPT_TIMEOUT:?}",
                        l.port(),
                        e.process_id
                    ))
                })??;
            let output = |l, s| {
                if resumable {
                    OutputPipe::Resumable {
                        listener: l,
                        first: Some(s),
                        received: 0,
                    }
                } else {
                    OutputPipe::Raw(s)
                }
            };
            match i {
                0 => {
                    io.stdin = Some(if resumable {
                        InputPipe::resumable(l, Some(s), None)
                    } else {
                        InputPipe::Raw(s)
                    })
                }
                1 => io.stdout = Some(output(l, s)),
                _ => io.stderr = Some(output(l, s)),
            }
        }
        Process::started(
            self.conn.clone(),
            &self.id,
            e.process_id,
            (ports.std_in, ports.std_out, ports.std_err),
            io,
        )
        .await
    }
}

/// A container config for an OCI spec.
pub fn config_for(spec: oci_spec::runtime::Spec, bundle: &str) -> ContainerConfig {
    ContainerConfig {
        schema_version: bridge::message::SchemaVersion { major: 2, minor: 1 },
        oci_bundle_path: bundle.to_string(),
        oci_specification: Some(Box::new(spec)),
        scratch_dir_path: String::new(),
    }
}
