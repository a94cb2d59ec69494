//! The `ferry` program's entry point (shared with the containerd shim binary, which runs as
//! ferry's own per-UVM shim and agent when started as `shim` or `gcs`).

use crate::cli::{Cli, Command};
use crate::{commands, migrate, paths, shim};
use clap::Parser;

/// The exit code of ferry's own failures (as docker uses 125), distinct from the exit codes of
/// the processes ferry runs.
const FERRY_FAILED: u8 = 125;

fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Runs the command line in `std::env::args`.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Every stdio stream costs descriptors (a listener, a connection, a log file): lift the
    // soft limit to the hard one, as servers do, so thousands of processes fit.
    gcs::cli::raise_fd_limit();
    // The agent starts before any runtime or thread exists (it may fork into namespaces).
    let cli = match cli.command {
        Command::Gcs(args) => return gcs::cli::main(args),
        _ => cli,
    };
    let root = cli.state_dir.clone().unwrap_or_else(paths::state_root);
    // The shim serves many clients and streams at once: two workers. A CLI command is one
    // client relaying one session: a single thread, so a relayed chunk never has to wake
    // another thread (that cross-thread wakeup dominated the CLI's cost per chunk).
    let mut builder = match cli.command {
        Command::Shim(_) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            std::process::exit(FERRY_FAILED.into());
        }
    };
    let json = cli.json;
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Shim(args) => {
                init_logging("info");
                Ok(shim::run(args, root).await)
            }
            other => {
                init_logging("warn");
                dispatch(&root, other, json).await
            }
        }
    });
    let code = match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e}");
            FERRY_FAILED as i32
        }
    };
    // Exit now: a blocked read of our stdin must not keep the process alive.
    std::process::exit(code)
}

async fn dispatch(root: &std::path::Path, command: Command, json: bool) -> commands::Outcome {
    match command {
        Command::Uvm(c) => commands::uvm(root, c, json).await,
        Command::Image(c) => commands::image(root, c, json).await,
        Command::Run(a) => commands::run(root, a, json).await,
        Command::Exec(a) => commands::exec(root, a, json).await,
        Command::Ps { uvm, container } => commands::ps(root, &uvm, container, json).await,
        Command::Kill {
            uvm,
            container,
            pid,
            signal,
        } => commands::kill(root, &uvm, container, pid, &signal).await,
        Command::Attach {
            uvm,
            container,
            pid,
        } => commands::attach(root, &uvm, container, pid).await,
        Command::Wait {
            uvm,
            container,
            pid,
        } => commands::wait(root, &uvm, container, pid, json).await,
        Command::Logs {
            uvm,
            container,
            pid,
            follow,
        } => commands::logs(root, &uvm, container, pid, follow).await,
        Command::Rm {
            uvm,
            container,
            force,
        } => commands::rm(root, &uvm, container, force, json).await,
        Command::Migrate(args) => migrate::migrate(root, args, json).await,
        Command::Shim(_) | Command::Gcs(_) => unreachable!("handled in main"),
    }
}
