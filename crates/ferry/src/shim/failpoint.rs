//! Named points where a fault-injection test holds the shim, to strike (kill a process, fill
//! a disk) at an exact moment of a migration rather than at a guessed time.
//!
//! With `FERRY_FAILPOINTS=name[,name…]` in its environment, the shim stops at each listed
//! point it reaches: it makes the FIFO `<UVM dir>/failpoint-<name>` and waits until a test has
//! opened it for writing (which tells the test the point is reached) and closed it again.
//! Without the variable a point costs one environment lookup.

use std::path::Path;

/// Where the source has heard that the destination runs the guest, before it quits its QEMU.
pub const SOURCE_AFTER_SWITCHOVER: &str = "source-after-switchover";
/// Where the destination has the memory and the host state, before it runs the guest.
pub const INCOMING_BEFORE_RESUME: &str = "incoming-before-resume";

/// Holds here while a test asks for `name` (see the module's documentation).
pub async fn hold(dir: &Path, name: &str) {
    let Ok(list) = std::env::var("FERRY_FAILPOINTS") else {
        return;
    };
    if !list.split(',').any(|n| n.trim() == name) {
        return;
    }
    let path = dir.join(format!("failpoint-{name}"));
    let _ = std::fs::remove_file(&path);
    if let Err(e) = nix::unistd::mkfifo(
        &path,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    ) {
        tracing::warn!(failpoint = name, error = %e, "cannot make the failpoint's FIFO; not holding");
        return;
    }
    tracing::warn!(
        failpoint = name,
        "holding at a failpoint until a test releases it"
    );
    let fifo = path.clone();
    let held = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        // Opening blocks until the test opens the other end; reading, until it closes it.
        let mut f = std::fs::File::open(&fifo)?;
        std::io::copy(&mut f, &mut std::io::sink())
    })
    .await;
    let _ = std::fs::remove_file(&path);
    tracing::warn!(failpoint = name, outcome = ?held.map(|r| r.map(|_| ())), "failpoint released");
}
