//! What the benchmarks that drive the `ferry` command share.

use std::path::Path;
use std::process::{Command, Stdio};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// A `ferry` command against the installation at `state`, stdin closed.
pub fn command(state: &Path) -> Command {
    let mut c = Command::new(FERRY);
    c.env("FERRY_STATE_DIR", state).stdin(Stdio::null());
    c
}

/// Runs `ferry` against the installation at `state`: its stdout, or its stderr as the error.
pub fn try_ferry(state: &Path, args: &[&str]) -> Result<String, String> {
    let out = command(state).args(args).output().expect("run ferry");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `ferry` against the installation at `state`; its stdout, or a panic with its stderr.
pub fn ferry(state: &Path, args: &[&str]) -> String {
    try_ferry(state, args).unwrap_or_else(|e| panic!("{e}"))
}
