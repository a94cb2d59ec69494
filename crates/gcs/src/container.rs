//! Containers: an OCI runtime spec turned into namespaces, mounts and a root filesystem, and
//! the plans for the processes run in them.
//!
//! The spec is parsed with `oci-spec` and applied here and in `process::spawn`, not through
//! youki's libcontainer: linking it took the static agent from 6.2 to 9.3 MB (over its 8 MB
//! target) and added 35 packages, and its on-disk bundles and console socket do not fit an
//! agent that gets specs over the bridge and relays the pty itself (BENCHMARKS.md,
//! `scripts/measure-libcontainer.sh`).

use crate::error::{GcsError, Result};
use crate::process::spawn::{JoinContainer, MountOp, Namespaces, NewContainer, SpawnSpec};
use crate::process::stdio::ChildStdio;
use bridge::message::{ContainerConfig, ProcessParameters};
use oci_spec::runtime::{LinuxNamespaceType, PosixRlimitType, Process as OciProcess, Spec};
use std::ffi::CString;
use std::path::{Component, Path, PathBuf};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Created; its init process has not been started.
    Created,
    /// Its init process is being started.
    Starting,
    Running {
        init_pid: u32,
    },
    Exited {
        init_pid: u32,
        code: i32,
    },
}

pub struct Container {
    pub id: String,
    pub spec: Box<Spec>,
    pub rootfs: PathBuf,
    pub bundle: PathBuf,
    pub state: ContainerState,
    /// Set by a shutdown request: the notification type the exit will be reported with.
    pub shutdown: Option<&'static str>,
}

fn cstring(what: &str, s: impl Into<Vec<u8>>) -> Result<CString> {
    CString::new(s).map_err(|_| GcsError::InvalidArgument(format!("{what} contains a NUL byte")))
}

fn path_cstring(what: &str, p: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    cstring(what, p.as_os_str().as_bytes())
}

/// Joins an absolute in-container path onto the rootfs, refusing `..` and symlinks in the part
/// that already exists (a rootfs is untrusted content: a symlink there must not redirect a
/// mount onto the agent's own filesystem).
fn in_root(rootfs: &Path, dest: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    if !dest.is_absolute() {
        return Err(GcsError::InvalidArgument(format!(
            "mount destination {} is not absolute",
            dest.display()
        )));
    }
    let mut out = rootfs.to_path_buf();
    let mut to_create = Vec::new();
    for c in dest.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => {
                out.push(name);
                match std::fs::symlink_metadata(&out) {
                    Ok(m) if m.file_type().is_symlink() => {
                        return Err(GcsError::InvalidArgument(format!(
                            "mount destination {} passes through a symlink in the container's root filesystem",
                            dest.display()
                        )));
                    }
                    Ok(_) => {}
                    Err(_) => to_create.push(out.clone()),
                }
            }
            _ => {
                return Err(GcsError::InvalidArgument(format!(
                    "mount destination {} contains '..'",
                    dest.display()
                )));
            }
        }
    }
    Ok((out, to_create))
}

/// Splits OCI mount options into mount(2) flags and the filesystem-specific data string.
fn mount_flags(options: &[String]) -> (libc::c_ulong, bool, Vec<String>) {
    let mut flags: libc::c_ulong = 0;
    let mut bind = false;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => flags &= !libc::MS_RDONLY,
            "nosuid" => flags |= libc::MS_NOSUID,
            "suid" => flags &= !libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "dev" => flags &= !libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "exec" => flags &= !libc::MS_NOEXEC,
            "noatime" => flags |= libc::MS_NOATIME,
            "relatime" => flags |= libc::MS_RELATIME,
            "strictatime" => flags |= libc::MS_STRICTATIME,
            "sync" => flags |= libc::MS_SYNCHRONOUS,
            "bind" => bind = true,
            "rbind" => {
                bind = true;
                flags |= libc::MS_REC;
            }
            // Propagation is always private inside the container's mount namespace.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, bind, data)
}

/// Devices bind-mounted from the agent's /dev when the spec mounts a fresh tmpfs on /dev.
const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

impl Container {
    /// Validates a Create request's configuration.
    pub fn new(id: &str, config: ContainerConfig) -> Result<Container> {
        let spec = config.oci_specification.ok_or_else(|| {
            GcsError::InvalidArgument(format!(
                "container {id:?}: ContainerConfig has no OciSpecification"
            ))
        })?;
        let bundle = PathBuf::from(&config.oci_bundle_path);
        let root = spec.root().as_ref().ok_or_else(|| {
            GcsError::InvalidArgument(format!("container {id:?}: the OCI spec has no root"))
        })?;
        let rootfs = if root.path().is_absolute() {
            root.path().clone()
        } else if bundle.is_absolute() {
            bundle.join(root.path())
        } else {
            return Err(GcsError::InvalidArgument(format!(
                "container {id:?}: root path {} is relative and OciBundlePath {:?} is not absolute",
                root.path().display(),
                config.oci_bundle_path
            )));
        };
        match std::fs::metadata(&rootfs) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(GcsError::InvalidArgument(format!(
                    "container {id:?}: root filesystem {} is not a directory",
                    rootfs.display()
                )));
            }
            Err(e) => {
                return Err(GcsError::InvalidArgument(format!(
                    "container {id:?}: root filesystem {}: {e}",
                    rootfs.display()
                )));
            }
        }
        let container = Container {
            id: id.to_string(),
            spec,
            rootfs,
            bundle,
            state: ContainerState::Created,
            shutdown: None,
        };
        // Refuse unsupported namespace settings now rather than at start.
        container.namespace_flags()?;
        Ok(container)
    }

    /// CLONE_NEW* flags for the container's namespaces (pid handled separately).
    fn namespace_flags(&self) -> Result<(libc::c_int, bool)> {
        let namespaces = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default();
        let mut flags = 0;
        let mut pid = false;
        let mut mount = false;
        for ns in &namespaces {
            if ns.path().is_some() {
                return Err(GcsError::NotImplemented(format!(
                    "container {:?}: joining an existing {:?} namespace by path is not supported",
                    self.id,
                    ns.typ()
                )));
            }
            match ns.typ() {
                LinuxNamespaceType::Pid => pid = true,
                LinuxNamespaceType::Mount => {
                    mount = true;
                    flags |= libc::CLONE_NEWNS
                }
                LinuxNamespaceType::Uts => flags |= libc::CLONE_NEWUTS,
                LinuxNamespaceType::Ipc => flags |= libc::CLONE_NEWIPC,
                LinuxNamespaceType::Network => flags |= libc::CLONE_NEWNET,
                LinuxNamespaceType::Cgroup => flags |= libc::CLONE_NEWCGROUP,
                other => {
                    return Err(GcsError::NotImplemented(format!(
                        "container {:?}: {other:?} namespaces are not supported",
                        self.id
                    )));
                }
            }
        }
        if !mount {
            return Err(GcsError::InvalidArgument(format!(
                "container {:?}: the spec must ask for a mount namespace (the root filesystem is switched inside it)",
                self.id
            )));
        }
        Ok((flags, pid))
    }

    /// The spec's own process, which runs as the container's init.
    pub fn init_process(&self) -> Result<&OciProcess> {
        self.spec.process().as_ref().ok_or_else(|| {
            GcsError::InvalidArgument(format!(
                "container {:?}: the OCI spec has no process",
                self.id
            ))
        })
    }

    /// Namespaces and mounts for the init process.
    pub fn new_namespaces(&self) -> Result<NewContainer> {
        let (unshare_flags, new_pid_ns) = self.namespace_flags()?;
        let unified_cgroup = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let mut mounts = Vec::new();
        let mut dev_tmpfs = false;
        for m in self.spec.mounts().as_deref().unwrap_or_default() {
            let (target, to_create) = in_root(&self.rootfs, m.destination())?;
            let (mut flags, mut bind, data) =
                mount_flags(m.options().as_deref().unwrap_or_default());
            let mut fstype = m.typ().clone().unwrap_or_default();
            if fstype == "bind" {
                bind = true;
            }
            // cgroup v1 mounts in specs written for older hosts: use the unified hierarchy.
            if fstype == "cgroup" && unified_cgroup {
                fstype = "cgroup2".into();
            }
            if m.destination() == Path::new("/dev") && fstype == "tmpfs" {
                dev_tmpfs = true;
            }
            let mut source = m.source().clone();
            let mut touch = false;
            if bind {
                let src = source.clone().unwrap_or_default();
                let src = if src.is_absolute() {
                    src
                } else {
                    self.bundle.join(src)
                };
                let meta = std::fs::metadata(&src).map_err(|e| {
                    GcsError::InvalidArgument(format!(
                        "container {:?}: bind mount source {}: {e}",
                        self.id,
                        src.display()
                    ))
                })?;
                touch = !meta.is_dir();
                source = Some(src);
                flags |= libc::MS_BIND;
            }
            let remount_ro = bind && flags & libc::MS_RDONLY != 0;
            let mut mkdirs = to_create;
            if touch {
                // The last component is the file itself.
                mkdirs.pop();
            }
            mounts.push(MountOp {
                source: source
                    .map(|s| path_cstring("mount source", &s))
                    .transpose()?,
                target: path_cstring("mount destination", &target)?,
                fstype: (!bind && !fstype.is_empty())
                    .then(|| cstring("mount type", fstype))
                    .transpose()?,
                flags,
                data: (!data.is_empty())
                    .then(|| cstring("mount options", data.join(",")))
                    .transpose()?,
                mkdirs: mkdirs
                    .iter()
                    .map(|p| path_cstring("mount destination", p))
                    .collect::<Result<_>>()?,
                touch,
                remount_ro,
            });
        }
        let mut symlinks = Vec::new();
        if dev_tmpfs {
            let dev = self.rootfs.join("dev");
            for name in DEFAULT_DEVICES {
                let host = Path::new("/dev").join(name);
                if !host.exists() {
                    continue;
                }
                mounts.push(MountOp {
                    source: Some(path_cstring("device", &host)?),
                    target: path_cstring("device", &dev.join(name))?,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                    mkdirs: Vec::new(),
                    touch: true,
                    remount_ro: false,
                });
            }
            for (target, link) in [
                ("/proc/self/fd", "fd"),
                ("/proc/self/fd/0", "stdin"),
                ("/proc/self/fd/1", "stdout"),
                ("/proc/self/fd/2", "stderr"),
                ("pts/ptmx", "ptmx"),
            ] {
                symlinks.push((
                    cstring("symlink", target)?,
                    path_cstring("symlink", &dev.join(link))?,
                ));
            }
        }
        let root = self.spec.root().as_ref();
        Ok(NewContainer {
            unshare_flags,
            new_pid_ns,
            rootfs: path_cstring("root filesystem", &self.rootfs)?,
            mounts,
            symlinks,
            hostname: self
                .spec
                .hostname()
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| cstring("hostname", h.as_str()))
                .transpose()?,
            readonly_root: root.and_then(|r| r.readonly()).unwrap_or(false),
        })
    }

    /// Namespaces to enter for a further process in the running container.
    pub fn join_namespaces(&self, init_pid: u32) -> Result<JoinContainer> {
        let (flags, new_pid) = self.namespace_flags()?;
        let open = |name: &str| {
            std::fs::File::open(format!("/proc/{init_pid}/ns/{name}"))
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| {
                    GcsError::Failed(format!(
                        "container {:?}: cannot open the {name} namespace of its init process {init_pid}: {e}",
                        self.id
                    ))
                })
        };
        let mut namespaces = Vec::new();
        for (flag, name) in [
            (libc::CLONE_NEWIPC, "ipc"),
            (libc::CLONE_NEWUTS, "uts"),
            (libc::CLONE_NEWNET, "net"),
            (libc::CLONE_NEWCGROUP, "cgroup"),
            // Last: after it, /proc paths refer to the container's view.
            (libc::CLONE_NEWNS, "mnt"),
        ] {
            if flags & flag != 0 {
                namespaces.push((open(name)?, flag));
            }
        }
        let pid_ns = if new_pid {
            open("pid")?
        } else {
            std::fs::File::open("/proc/self/ns/pid")
                .map(Into::into)
                .map_err(|e| GcsError::Failed(format!("open own pid namespace: {e}")))?
        };
        Ok(JoinContainer { pid_ns, namespaces })
    }
}

/// What to run, independent of where.
#[derive(Debug, Clone, Default)]
pub struct ProcessPlan {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub terminal: bool,
    pub no_new_privileges: bool,
    pub rlimits: Vec<(libc::c_int, libc::rlimit)>,
}

fn rlimit_resource(t: PosixRlimitType) -> libc::c_int {
    use PosixRlimitType::*;
    (match t {
        RlimitCpu => libc::RLIMIT_CPU,
        RlimitFsize => libc::RLIMIT_FSIZE,
        RlimitData => libc::RLIMIT_DATA,
        RlimitStack => libc::RLIMIT_STACK,
        RlimitCore => libc::RLIMIT_CORE,
        RlimitRss => libc::RLIMIT_RSS,
        RlimitNproc => libc::RLIMIT_NPROC,
        RlimitNofile => libc::RLIMIT_NOFILE,
        RlimitMemlock => libc::RLIMIT_MEMLOCK,
        RlimitAs => libc::RLIMIT_AS,
        RlimitLocks => libc::RLIMIT_LOCKS,
        RlimitSigpending => libc::RLIMIT_SIGPENDING,
        RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        RlimitNice => libc::RLIMIT_NICE,
        RlimitRtprio => libc::RLIMIT_RTPRIO,
        RlimitRttime => libc::RLIMIT_RTTIME,
    }) as libc::c_int
}

impl ProcessPlan {
    pub fn from_oci(p: &OciProcess) -> ProcessPlan {
        ProcessPlan {
            args: p.args().clone().unwrap_or_default(),
            env: p.env().clone().unwrap_or_default(),
            cwd: p.cwd().to_string_lossy().into_owned(),
            uid: p.user().uid(),
            gid: p.user().gid(),
            additional_gids: p.user().additional_gids().clone().unwrap_or_default(),
            terminal: p.terminal().unwrap_or(false),
            no_new_privileges: p.no_new_privileges().unwrap_or(false),
            rlimits: p
                .rlimits()
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    (
                        rlimit_resource(r.typ()),
                        libc::rlimit {
                            rlim_cur: r.soft(),
                            rlim_max: r.hard(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// A process described by hcsshim's plain ProcessParameters (in the UVM, or a later
    /// process in a container when the host sent no OciProcess). Runs as the agent's user.
    pub fn from_params(p: &ProcessParameters) -> ProcessPlan {
        let args = if p.command_args.is_empty() {
            p.command_line
                .split_whitespace()
                .map(str::to_string)
                .collect()
        } else {
            p.command_args.clone()
        };
        ProcessPlan {
            args,
            env: p
                .environment
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            cwd: p.working_directory.clone(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            terminal: p.emulate_console,
            ..Default::default()
        }
    }

    /// Converts into a spawn spec with the given stdio and namespaces.
    pub fn into_spawn(self, stdio: ChildStdio, namespaces: Namespaces) -> Result<SpawnSpec> {
        let program = self
            .args
            .first()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| GcsError::InvalidArgument("the process has no command to run".into()))?
            .clone();
        let mut env = self.env;
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        let path_var = env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_string();
        let exec_candidates = if program.contains('/') {
            vec![cstring("command", program.as_str())?]
        } else {
            path_var
                .split(':')
                .filter(|d| !d.is_empty())
                .map(|d| cstring("PATH entry", format!("{d}/{program}")))
                .collect::<Result<_>>()?
        };
        let cwd = if self.cwd.is_empty() {
            "/".to_string()
        } else {
            self.cwd
        };
        Ok(SpawnSpec {
            argv: self
                .args
                .into_iter()
                .map(|a| cstring("argument", a))
                .collect::<Result<_>>()?,
            env: env
                .into_iter()
                .map(|e| cstring("environment variable", e))
                .collect::<Result<_>>()?,
            exec_candidates,
            cwd: cstring("working directory", cwd)?,
            uid: self.uid,
            gid: self.gid,
            additional_gids: self.additional_gids,
            stdin: stdio.stdin,
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            controlling_tty: stdio.controlling_tty,
            no_new_privileges: self.no_new_privileges,
            rlimits: self.rlimits,
            namespaces,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_destinations_stay_in_the_root() {
        let root = std::env::temp_dir().join(format!("ferry-inroot-{}", std::process::id()));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let _ = std::fs::remove_file(root.join("escape"));
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        let (p, create) = in_root(&root, Path::new("/etc/x/y")).unwrap();
        assert_eq!(p, root.join("etc/x/y"));
        assert_eq!(create, vec![root.join("etc/x"), root.join("etc/x/y")]);
        assert!(in_root(&root, Path::new("/escape/passwd")).is_err());
        assert!(in_root(&root, Path::new("/../etc")).is_err());
        assert!(in_root(&root, Path::new("relative")).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn options_become_flags_and_data() {
        let opts: Vec<String> = ["nosuid", "ro", "mode=755", "size=65536k", "rbind"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, bind, data) = mount_flags(&opts);
        assert!(bind);
        assert_eq!(flags, libc::MS_NOSUID | libc::MS_RDONLY | libc::MS_REC);
        assert_eq!(data, ["mode=755", "size=65536k"]);
    }

    #[test]
    fn command_line_is_split_when_no_args() {
        let p = ProcessParameters {
            command_line: "sleep  100".into(),
            ..Default::default()
        };
        assert_eq!(ProcessPlan::from_params(&p).args, ["sleep", "100"]);
    }
}
