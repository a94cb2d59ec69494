//! containerd's runtime v2 shim for ferry: `ctr run --runtime io.containerd.ferry.v1 ...`.
//!
//! One binary plays three parts: containerd starts it as the shim (flags such as `-namespace`,
//! actions `start` and `delete`); the shim starts the sandbox's UVM by running this same
//! executable as ferry's own per-UVM host process (`shim`), which runs it once more as the
//! local backend's guest agent (`gcs`).

fn main() -> std::process::ExitCode {
    match std::env::args_os()
        .nth(1)
        .as_deref()
        .and_then(|a| a.to_str())
    {
        Some("shim" | "gcs") => ferry::entry::main(),
        _ => ferry::containerd::main(),
    }
}
