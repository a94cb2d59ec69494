//! Starting a process: fork, enter or create namespaces, set up the root filesystem, drop to
//! the requested user, exec.
//!
//! Everything the child needs is prepared in the parent (C strings, pointer arrays, file
//! descriptors), so that between `fork` and `exec` the child makes only raw system calls: the
//! agent is multi-threaded and the child must not allocate or take locks.
//!
//! PID namespaces apply to the *children* of the thread that creates or enters them, so every
//! fork happens on one dedicated spawner thread, which switches its own "pid namespace for
//! children" before forking and restores it afterwards. The forked process is then a direct
//! child of the agent, reaped like any other.

use std::ffi::{CString, c_char, c_int};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc;

/// A mount to perform inside the new mount namespace, before the root is switched.
#[derive(Debug)]
pub struct MountOp {
    pub source: Option<CString>,
    /// Absolute path on the agent's side (rootfs + destination).
    pub target: CString,
    pub fstype: Option<CString>,
    pub flags: libc::c_ulong,
    pub data: Option<CString>,
    /// Directories to create first, outermost first.
    pub mkdirs: Vec<CString>,
    /// For a bind mount of a file: create an empty file at the target first.
    pub touch: bool,
    /// Remount read-only after a bind mount (bind mounts ignore MS_RDONLY on first mount).
    pub remount_ro: bool,
}

/// A new container: namespaces to create and the root filesystem to switch to.
#[derive(Debug)]
pub struct NewContainer {
    /// CLONE_NEW* flags for unshare() in the child (mount, uts, ipc, net, cgroup).
    pub unshare_flags: c_int,
    /// Whether the child is the first process of a new PID namespace.
    pub new_pid_ns: bool,
    pub rootfs: CString,
    pub mounts: Vec<MountOp>,
    /// Symlinks to create (target, link path) after mounts, e.g. /dev/fd.
    pub symlinks: Vec<(CString, CString)>,
    pub hostname: Option<CString>,
    pub readonly_root: bool,
}

/// An existing container to enter.
#[derive(Debug)]
pub struct JoinContainer {
    /// Its PID namespace (entered by the spawner thread before forking).
    pub pid_ns: OwnedFd,
    /// Other namespaces, entered by the child; the mount namespace last.
    pub namespaces: Vec<(OwnedFd, c_int)>,
}

#[derive(Debug)]
pub enum Namespaces {
    /// Run in the agent's own namespaces (a process "in the UVM").
    Agent,
    New(Box<NewContainer>),
    Join(JoinContainer),
}

/// Everything needed to start one process.
#[derive(Debug)]
pub struct SpawnSpec {
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
    /// Paths to try with execve, in order (argv[0] resolved against PATH in the parent; the
    /// lookup itself happens in the child, inside the container's root).
    pub exec_candidates: Vec<CString>,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// stdin is a terminal that becomes the controlling terminal.
    pub controlling_tty: bool,
    pub no_new_privileges: bool,
    pub rlimits: Vec<(c_int, libc::rlimit)>,
    pub namespaces: Namespaces,
}

/// Where in the child a failure happened (reported through the error pipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    Setsid = 1,
    Unshare,
    MountPrivate,
    BindRoot,
    Mkdir,
    Mount,
    Symlink,
    PivotRoot,
    Hostname,
    Setns,
    Stdio,
    Tty,
    Rlimit,
    NoNewPrivs,
    Groups,
    Gid,
    Uid,
    Chdir,
    Exec,
    Priority,
}

impl Stage {
    fn from_u32(v: u32) -> &'static str {
        const NAMES: [&str; 20] = [
            "setsid",
            "unshare namespaces",
            "make mounts private",
            "bind the root filesystem",
            "create a mount point",
            "mount",
            "create a symlink",
            "switch root",
            "set hostname",
            "enter a namespace",
            "set up stdio",
            "acquire the controlling terminal",
            "set a resource limit",
            "set no_new_privs",
            "set supplementary groups",
            "set gid",
            "set uid",
            "change directory",
            "exec",
            "restore the scheduling priority",
        ];
        NAMES
            .get((v as usize).wrapping_sub(1))
            .copied()
            .unwrap_or("unknown stage")
    }
}

/// Why a spawn failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("could not {stage}: {errno}")]
    Child {
        stage: &'static str,
        errno: nix::errno::Errno,
        exec_failed: bool,
    },
    #[error("{context}: {errno}")]
    Parent {
        context: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("the spawner thread is gone")]
    SpawnerGone,
}

impl SpawnError {
    /// True when the program itself could not be executed (not found, not executable).
    pub fn is_exec_failure(&self) -> bool {
        matches!(
            self,
            SpawnError::Child {
                exec_failed: true,
                ..
            }
        )
    }
}

type Reply = mpsc::SyncSender<Result<u32, SpawnError>>;

/// The dedicated thread all forks happen on.
pub struct Spawner {
    tx: std::sync::Mutex<mpsc::Sender<(SpawnSpec, Reply)>>,
}

impl Spawner {
    pub fn start() -> std::io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<(SpawnSpec, Reply)>();
        // The pid namespace this process lives in: restored as "pid namespace for children"
        // after every container spawn.
        let own_pid_ns = File::open("/proc/self/ns/pid")?;
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for (spec, reply) in rx {
                    let result = spawn_on_this_thread(spec, &own_pid_ns);
                    let _ = reply.send(result);
                }
            })?;
        Ok(Spawner {
            tx: std::sync::Mutex::new(tx),
        })
    }

    /// Starts the process and returns its pid once it has exec'd (or the reason it could not).
    /// Blocks until then: call from a blocking context.
    pub fn spawn(&self, spec: SpawnSpec) -> Result<u32, SpawnError> {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.tx
            .lock()
            .map_err(|_| SpawnError::SpawnerGone)?
            .send((spec, reply_tx))
            .map_err(|_| SpawnError::SpawnerGone)?;
        reply_rx.recv().map_err(|_| SpawnError::SpawnerGone)?
    }
}

fn errno() -> nix::errno::Errno {
    nix::errno::Errno::last()
}

fn spawn_on_this_thread(spec: SpawnSpec, own_pid_ns: &File) -> Result<u32, SpawnError> {
    // Switch this thread's pid namespace for children, if the process needs another one.
    let switched = match &spec.namespaces {
        Namespaces::New(c) if c.new_pid_ns => {
            if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
                return Err(SpawnError::Parent {
                    context: "create a pid namespace",
                    errno: errno(),
                });
            }
            true
        }
        Namespaces::Join(j) => {
            if unsafe { libc::setns(j.pid_ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
                return Err(SpawnError::Parent {
                    context: "enter the container's pid namespace",
                    errno: errno(),
                });
            }
            true
        }
        _ => false,
    };
    let result = fork_exec(&spec);
    if switched && unsafe { libc::setns(own_pid_ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        // Without this every later spawn would land in the wrong namespace: unrecoverable.
        tracing::error!(errno = %errno(), "cannot restore the spawner's pid namespace; aborting");
        std::process::abort();
    }
    result
}

/// Pointer arrays for execve, built before fork.
struct ExecArgs {
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
}

impl ExecArgs {
    fn new(spec: &SpawnSpec) -> ExecArgs {
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        ExecArgs {
            argv: ptrs(&spec.argv),
            envp: ptrs(&spec.env),
        }
    }
}

fn fork_exec(spec: &SpawnSpec) -> Result<u32, SpawnError> {
    let args = ExecArgs::new(spec);
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| SpawnError::Parent {
            context: "create the exec status pipe",
            errno,
        })?;
    // SAFETY: the child only calls async-signal-safe functions (raw system calls) on data
    // prepared above, then execs or _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SpawnError::Parent {
            context: "fork",
            errno: errno(),
        });
    }
    if pid == 0 {
        drop(err_r);
        unsafe { child(spec, &args, err_w.as_raw_fd()) }
    }
    drop(err_w);
    // The write end is close-on-exec: end-of-file means the exec succeeded.
    let mut buf = [0u8; 8];
    let mut got = 0;
    let mut file = File::from(err_r);
    use std::io::Read;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if got == 0 {
        return Ok(pid as u32);
    }
    let stage = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let code = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    // The child has _exited; the reaper collects it.
    Err(SpawnError::Child {
        stage: Stage::from_u32(stage),
        errno: nix::errno::Errno::from_raw(code),
        exec_failed: stage == Stage::Exec as u32,
    })
}

/// In the child: on a negative return, report `$stage` and exit. Used inside `unsafe` blocks.
macro_rules! check {
    ($err_fd:expr, $stage:expr, $call:expr) => {
        if $call < 0 {
            fail($err_fd, $stage)
        }
    };
}

/// Reports a failure to the parent and exits. Never returns.
unsafe fn fail(err_fd: RawFd, stage: Stage) -> ! {
    let e = unsafe { *libc::__errno_location() };
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&(stage as u32).to_le_bytes());
    msg[4..].copy_from_slice(&e.to_le_bytes());
    unsafe {
        libc::write(err_fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

/// The child side of fork. Only raw system calls from here on.
unsafe fn child(spec: &SpawnSpec, args: &ExecArgs, err_fd: RawFd) -> ! {
    unsafe {
        // Signal state: the agent's runtime may block signals, and Rust ignores SIGPIPE; an
        // ignored disposition survives exec, so restore the defaults the program expects.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        check!(err_fd, Stage::Setsid, libc::setsid());
        // Workloads do not share the agent's raised priority.
        if let Some(nice) = crate::priority::workload_nice() {
            check!(
                err_fd,
                Stage::Priority,
                libc::setpriority(libc::PRIO_PROCESS, 0, nice)
            );
        }

        match &spec.namespaces {
            Namespaces::Agent => {}
            Namespaces::Join(j) => {
                for (fd, kind) in &j.namespaces {
                    check!(err_fd, Stage::Setns, libc::setns(fd.as_raw_fd(), *kind));
                }
            }
            Namespaces::New(c) => setup_container(c, err_fd),
        }

        check!(err_fd, Stage::Stdio, libc::dup2(spec.stdin.as_raw_fd(), 0));
        check!(err_fd, Stage::Stdio, libc::dup2(spec.stdout.as_raw_fd(), 1));
        check!(err_fd, Stage::Stdio, libc::dup2(spec.stderr.as_raw_fd(), 2));
        if spec.controlling_tty {
            check!(err_fd, Stage::Tty, libc::ioctl(0, libc::TIOCSCTTY, 0));
        }
        for (resource, limit) in &spec.rlimits {
            check!(
                err_fd,
                Stage::Rlimit,
                libc::setrlimit(*resource as _, limit)
            );
        }
        if spec.no_new_privileges {
            check!(
                err_fd,
                Stage::NoNewPrivs,
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            );
        }
        // Changing identity needs privilege; an unprivileged agent keeps its own.
        if libc::geteuid() == 0 {
            check!(
                err_fd,
                Stage::Groups,
                libc::setgroups(spec.additional_gids.len(), spec.additional_gids.as_ptr())
            );
            check!(err_fd, Stage::Gid, libc::setgid(spec.gid));
            check!(err_fd, Stage::Uid, libc::setuid(spec.uid));
        }
        check!(err_fd, Stage::Chdir, libc::chdir(spec.cwd.as_ptr()));

        // Everything but stdio and the status pipe (itself close-on-exec) is closed on exec.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );

        // Try each candidate; report the most telling error (anything beats "not found").
        let mut saved = libc::ENOENT;
        for path in &spec.exec_candidates {
            libc::execve(path.as_ptr(), args.argv.as_ptr(), args.envp.as_ptr());
            let e = *libc::__errno_location();
            if e != libc::ENOENT && e != libc::ENOTDIR {
                saved = e;
            }
        }
        *libc::__errno_location() = saved;
        fail(err_fd, Stage::Exec)
    }
}

unsafe fn setup_container(c: &NewContainer, err_fd: RawFd) {
    unsafe {
        check!(err_fd, Stage::Unshare, libc::unshare(c.unshare_flags));
        // Nothing done in here may propagate back to the agent's mounts.
        check!(
            err_fd,
            Stage::MountPrivate,
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            )
        );
        // pivot_root needs the new root to be a mount point.
        check!(
            err_fd,
            Stage::BindRoot,
            libc::mount(
                c.rootfs.as_ptr(),
                c.rootfs.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null()
            )
        );
        for m in &c.mounts {
            for dir in &m.mkdirs {
                if libc::mkdir(dir.as_ptr(), 0o755) < 0 && *libc::__errno_location() != libc::EEXIST
                {
                    fail(err_fd, Stage::Mkdir)
                }
            }
            if m.touch {
                let fd = libc::open(
                    m.target.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                check!(err_fd, Stage::Mkdir, fd);
                libc::close(fd);
            }
            check!(
                err_fd,
                Stage::Mount,
                libc::mount(
                    opt_ptr(&m.source),
                    m.target.as_ptr(),
                    opt_ptr(&m.fstype),
                    m.flags,
                    opt_ptr(&m.data).cast()
                )
            );
            if m.remount_ro {
                check!(
                    err_fd,
                    Stage::Mount,
                    libc::mount(
                        std::ptr::null(),
                        m.target.as_ptr(),
                        std::ptr::null(),
                        m.flags | libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                        std::ptr::null()
                    )
                );
            }
        }
        for (target, link) in &c.symlinks {
            if libc::symlink(target.as_ptr(), link.as_ptr()) < 0
                && *libc::__errno_location() != libc::EEXIST
            {
                fail(err_fd, Stage::Symlink)
            }
        }
        check!(err_fd, Stage::PivotRoot, libc::chdir(c.rootfs.as_ptr()));
        // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves only
        // the container's root. It fails when the agent's own root is the initramfs, where the
        // classic move-and-chroot is the only way.
        if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0 {
            check!(
                err_fd,
                Stage::PivotRoot,
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
            );
        } else {
            check!(
                err_fd,
                Stage::PivotRoot,
                libc::mount(
                    c".".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_MOVE,
                    std::ptr::null()
                )
            );
            check!(err_fd, Stage::PivotRoot, libc::chroot(c".".as_ptr()));
        }
        check!(err_fd, Stage::PivotRoot, libc::chdir(c"/".as_ptr()));
        if c.readonly_root {
            check!(
                err_fd,
                Stage::Mount,
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_REC,
                    std::ptr::null()
                )
            );
        }
        if let Some(h) = &c.hostname {
            check!(
                err_fd,
                Stage::Hostname,
                libc::sethostname(h.as_ptr(), h.count_bytes())
            );
        }
    }
}

/// Opens `/dev/null` for a stdio slot the host did not ask a pipe for.
pub fn dev_null() -> std::io::Result<OwnedFd> {
    Ok(File::options()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}
