//! What the benchmarks that drive the `ferry` command share.

use std::path::Path;
use std::process::{Command, Stdio};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Runs `ferry` against the installation at `state`; its stdout, or a panic with its stderr.
pub fn ferry(state: &Path, args: &[&str]) -> String {
    let out = Command::new(FERRY)
        .env("FERRY_STATE_DIR", state)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferry");
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
