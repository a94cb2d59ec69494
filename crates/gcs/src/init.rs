//! The agent as a VM's init (PID 1 of a ferry image's initramfs): set up the few file systems
//! a Linux userland expects, load the drivers the image carries, and, when the agent is done,
//! power the VM off (PID 1 must never simply exit: the kernel would panic).
//!
//! No udev, no modprobe, no shell: everything here is a handful of system calls.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where a ferry image keeps its modules, and the file naming them in load order (one file
/// name per line; the kernel package has no modules.dep and modprobe is absent).
pub const MODULES_DIR: &str = "/lib/modules/ferry";
pub const MODULES_ORDER: &str = "order";

/// The PATH processes started in the UVM itself see when they bring none (the kernel gives
/// init no PATH at all).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Largest module list read (a dozen names in practice; this bounds a broken image).
const MAX_ORDER_FILE: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub modules_dir: PathBuf,
    pub hostname: String,
}

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: nix::mount::MsFlags,
    data: &'static str,
    /// Whether the VM is useless without it (the rest only warn).
    required: bool,
}

fn mounts() -> Vec<MountSpec> {
    use nix::mount::MsFlags as F;
    let hardened = F::MS_NOSUID | F::MS_NODEV | F::MS_NOEXEC;
    let m = |source, target, fstype, flags, data, required| MountSpec {
        source,
        target,
        fstype,
        flags,
        data,
        required,
    };
    vec![
        m("proc", "/proc", "proc", hardened, "", true),
        m("sysfs", "/sys", "sysfs", hardened, "", true),
        m(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            F::MS_NOSUID,
            "mode=0755",
            true,
        ),
        m(
            "devpts",
            "/dev/pts",
            "devpts",
            F::MS_NOSUID | F::MS_NOEXEC,
            "gid=5,mode=0620,ptmxmode=0666",
            false,
        ),
        m(
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            F::MS_NOSUID | F::MS_NODEV,
            "mode=1777",
            false,
        ),
        m(
            "tmpfs",
            "/run",
            "tmpfs",
            F::MS_NOSUID | F::MS_NODEV,
            "mode=0755",
            false,
        ),
        m(
            "tmpfs",
            "/tmp",
            "tmpfs",
            F::MS_NOSUID | F::MS_NODEV,
            "mode=1777",
            false,
        ),
        m("cgroup2", "/sys/fs/cgroup", "cgroup2", hardened, "", false),
    ]
}

/// Whether this process should act as init: asked with `--init`, or PID 1 started with no
/// arguments at all (how a kernel runs `/init` when its command line passes nothing after
/// `--`). A PID 1 with arguments (an agent as a container's entry point) is left alone.
pub fn wanted(flag: bool) -> bool {
    flag || (std::process::id() == 1 && std::env::args_os().len() <= 1)
}

/// Prepares the VM. Runs before the async runtime starts (single-threaded: it sets
/// environment variables). Only a missing required mount is an error; anything else is
/// logged and the agent carries on (a missing vsock driver must not cost the serial channel).
pub fn prepare(options: &InitOptions) -> Result<(), String> {
    let started = Instant::now();
    if std::env::var_os("PATH").is_none() {
        // SAFETY: single-threaded here (no runtime, no other thread yet).
        unsafe { std::env::set_var("PATH", PATH) };
    }
    for spec in mounts() {
        if let Err(e) = mount(&spec) {
            if spec.required {
                return Err(e);
            }
            tracing::warn!(error = %e, "optional mount failed");
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    if let Err(e) = nix::unistd::sethostname(&options.hostname) {
        tracing::warn!(error = %e, "cannot set the hostname");
    }
    load_modules(&options.modules_dir);
    tracing::info!(elapsed = ?started.elapsed(), "init: file systems mounted, modules loaded");
    Ok(())
}

fn mount(spec: &MountSpec) -> Result<(), String> {
    if let Err(e) = std::fs::create_dir_all(spec.target) {
        return Err(format!("create {}: {e}", spec.target));
    }
    let data = (!spec.data.is_empty()).then_some(spec.data);
    match nix::mount::mount(
        Some(spec.source),
        spec.target,
        Some(spec.fstype),
        spec.flags,
        data,
    ) {
        Ok(()) => Ok(()),
        // Already mounted (the kernel mounts devtmpfs itself with CONFIG_DEVTMPFS_MOUNT).
        Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!(
            "mount {} on {} ({}): {e}",
            spec.source, spec.target, spec.fstype
        )),
    }
}

/// Loads the modules the image lists, in its order. Already loaded (or built in) is fine.
pub fn load_modules(dir: &Path) {
    let order = dir.join(MODULES_ORDER);
    let text = match read_bounded(&order, MAX_ORDER_FILE) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::info!(dir = %dir.display(), "no module list; loading no modules");
            return;
        }
        Err(e) => {
            tracing::warn!(file = %order.display(), error = %e, "cannot read the module list");
            return;
        }
    };
    for name in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if name.contains('/') || name.starts_with('.') {
            tracing::warn!(name, "module list entry is not a plain file name; skipped");
            continue;
        }
        let started = Instant::now();
        match load_module(&dir.join(name)) {
            Ok(()) => tracing::debug!(module = name, elapsed = ?started.elapsed(), "module loaded"),
            Err(e) => tracing::warn!(module = name, error = %e, "cannot load module"),
        }
    }
}

fn read_bounded(path: &Path, max: u64) -> io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(max)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// finit_module(2): the kernel reads (and checks) the module from the descriptor itself.
fn load_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = CString::default();
    // SAFETY: a valid descriptor, an empty parameter string, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(e)
}

/// The agent is done: flush file systems and power the VM off. PID 1 must not return.
pub fn power_off() -> ! {
    tracing::info!("init: powering off");
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Power-off failed (no ACPI?): halting is the next best thing; the host notices the VM
    // stopped answering and kills it.
    loop {
        // SAFETY: pause has no arguments.
        unsafe { libc::pause() };
    }
}
