//! The embedded default's "utility VM": the agent moves itself into new mount, pid, uts and
//! ipc namespaces and becomes PID 1 there, so that everything it runs lives and dies with it,
//! as it would inside a VM.

use std::sync::atomic::{AtomicI32, Ordering};

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, sig) };
    }
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Enters the namespaces. Must run while the process is still single-threaded (before the
/// async runtime starts). Returns in the new PID 1; the original process stays behind as a
/// thin parent that forwards termination signals and exits with the agent's status.
pub fn enter_namespaces(hostname: &str) -> Result<(), String> {
    // SAFETY: plain system calls; the process is single-threaded here.
    unsafe {
        if libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWPID,
        ) != 0
        {
            return Err(errno(
                "unshare(mount, uts, ipc, pid namespaces) (needs root)",
            ));
        }
        let pid = libc::fork();
        if pid < 0 {
            return Err(errno("fork into the new pid namespace"));
        }
        if pid > 0 {
            CHILD.store(pid, Ordering::Relaxed);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::signal(sig, forward as *const () as libc::sighandler_t);
            }
            let mut status = 0;
            loop {
                let r = libc::waitpid(pid, &mut status, 0);
                if r == pid {
                    break;
                }
                if r < 0 && *libc::__errno_location() != libc::EINTR {
                    libc::_exit(1);
                }
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            libc::_exit(code);
        }
        // The new PID 1 dies with the thin parent (the process its host knows as the UVM):
        // a killed UVM leaves nothing running behind.
        // (getppid is 0 across a pid namespace, so the start-up race cannot be checked here;
        // the window is the few instructions since fork.)
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        // A private mount tree and a /proc that shows this namespace.
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(errno("make mounts private"));
        }
        if libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            return Err(errno("mount /proc"));
        }
        if libc::sethostname(hostname.as_ptr().cast(), hostname.len()) != 0 {
            return Err(errno("set hostname"));
        }
    }
    Ok(())
}
