//! The agent's scheduling priority.
//!
//! The agent runs at the priority it was started with, as its workloads do, except for a
//! while after its host changed (a live migration, a restore): then it runs raised, because
//! what it does in those moments (end the old session, start the new one, re-dial every
//! stream) is how long output stays stopped, and under TCG a workload busy on the same vCPU
//! doubled that. Raised for good, it slowed a process printing short lines 3-6 times (the
//! agent preempted it at every line). Measured: BENCHMARKS.md, "Agent priority".

use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::time::{Duration, Instant};

/// How long the agent stays raised after its host changed: a migration's reconnect takes
/// ~100-300 ms under TCG; a longer raise costs little (it happens once per move).
pub const RAISED_FOR: Duration = Duration::from_secs(2);

/// The nice value the agent's processes get, if the agent manages priorities ([`install`]):
/// its own. Read in the forked child, where only async-signal-safe work is allowed: a
/// `OnceLock`'s `get` is an atomic load.
pub fn workload_nice() -> Option<i32> {
    RAISER.get().map(|r| r.base)
}

fn nice_of(tid: libc::pid_t) -> io::Result<i32> {
    // -1 is a valid answer: only errno tells a failure.
    nix::errno::Errno::clear();
    // SAFETY: getpriority with integer arguments.
    let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    if n == -1 && nix::errno::Errno::last() != nix::errno::Errno::UnknownErrno {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// Sets one thread's nice value (on Linux, `PRIO_PROCESS` with a thread id is that thread).
fn set_nice(tid: libc::pid_t, nice: i32) -> io::Result<()> {
    // SAFETY: setpriority with integer arguments.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises one thread (the async runtime's) for a while at a time.
pub struct Raiser {
    tid: libc::pid_t,
    base: i32,
    raised: i32,
    /// When the current raise ends; `None` while not raised.
    until: Mutex<Option<Instant>>,
}

impl Raiser {
    /// For the calling thread, to be raised to nice `raised` now and then; fails (before
    /// anything changed) if this process may not raise it.
    pub fn for_this_thread(raised: i32) -> io::Result<Arc<Raiser>> {
        // SAFETY: gettid has no arguments.
        let tid = unsafe { libc::gettid() };
        let base = nice_of(tid)?;
        // Lowering a nice value needs CAP_SYS_NICE: find out now, not in the middle of a move.
        set_nice(tid, raised)?;
        set_nice(tid, base)?;
        Ok(Arc::new(Raiser {
            tid,
            base,
            raised,
            until: Mutex::new(None),
        }))
    }

    /// The thread's own nice value, which it goes back to.
    pub fn base(&self) -> i32 {
        self.base
    }

    /// Raises the thread for `window` from now, or extends the raise under way to that. Call
    /// within a tokio runtime (a task ends the raise).
    pub fn raise_for(self: &Arc<Self>, window: Duration) {
        let deadline = Instant::now() + window;
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let under_way = until.is_some();
        *until = Some(until.map_or(deadline, |u| u.max(deadline)));
        drop(until);
        if under_way {
            return;
        }
        if let Err(e) = set_nice(self.tid, self.raised) {
            tracing::warn!(error = %e, nice = self.raised, "cannot raise the agent's priority");
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let Some(deadline) = *this.until.lock().unwrap_or_else(|p| p.into_inner()) else {
                    return;
                };
                tokio::time::sleep_until(deadline).await;
                let mut until = this.until.lock().unwrap_or_else(|p| p.into_inner());
                if until.is_some_and(|u| u <= Instant::now()) {
                    *until = None;
                    if let Err(e) = set_nice(this.tid, this.base) {
                        tracing::warn!(error = %e, "cannot lower the agent's priority again");
                    }
                    return;
                }
            }
        });
    }
}

static RAISER: OnceLock<Arc<Raiser>> = OnceLock::new();

/// Makes the agent raise its runtime's thread (the calling one: call it there, before the
/// runtime starts) to nice `raised` for a while after its host changes ([`host_changed`]);
/// the processes it starts run at the thread's present priority. Returns that priority.
pub fn install(raised: i32) -> io::Result<i32> {
    let raiser = Raiser::for_this_thread(raised)?;
    let base = raiser.base();
    let _ = RAISER.set(raiser);
    Ok(base)
}

/// The agent's host changed (its channel's session ended, a new one is coming): raised for
/// [`RAISED_FOR`] if [`install`]ed.
pub fn host_changed() {
    if let Some(r) = RAISER.get() {
        r.raise_for(RAISED_FOR);
    }
}

/// For each thread the runtime starts: back to the agent's own priority (a new thread
/// inherits its creator's, which may be raised at the time).
pub fn thread_started() {
    if let Some(nice) = workload_nice() {
        // SAFETY: gettid has no arguments.
        let _ = set_nice(unsafe { libc::gettid() }, nice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> i32 {
        // SAFETY: gettid has no arguments.
        nice_of(unsafe { libc::gettid() }).unwrap()
    }

    /// The runtime is this test's thread, its clock paused: the raise ends exactly when due.
    #[tokio::test(start_paused = true)]
    async fn a_raise_lasts_its_window_and_extends() {
        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: raising a priority needs root (CAP_SYS_NICE)");
            return;
        }
        // This thread only, and from a known base.
        // SAFETY: gettid has no arguments.
        set_nice(unsafe { libc::gettid() }, 5).unwrap();
        let r = Raiser::for_this_thread(-3).unwrap();
        assert_eq!((r.base(), own()), (5, 5), "set up without raising");

        r.raise_for(Duration::from_secs(2));
        assert_eq!(own(), -3, "raised at once");
        tokio::time::sleep(Duration::from_secs(1)).await;
        r.raise_for(Duration::from_secs(2)); // now due at 3 s
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            own(),
            -3,
            "still raised past the first window: it was extended"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(own(), 5, "back to its own priority when the window ends");

        r.raise_for(Duration::from_millis(10));
        assert_eq!(own(), -3, "and raised again next time");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(own(), 5);
    }
}
