//! The command line.

use crate::shim::backend::{BackendKind, QemuArgs};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// ferry — containers in lightweight utility VMs, movable while they run.
///
/// A UVM is started once (`ferry uvm start NAME`); a host process (the shim) then owns it and
/// serves a control socket, and every other command talks to that shim. On the embedded default
/// backend the "VM" is the guest agent in its own namespaces on this host (no hypervisor).
#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    propagate_version = true,
    after_long_help = "\
Examples:
  ferry uvm start demo
  ferry run demo --id web -- sh -c 'echo hello from $(hostname)'
  ferry run demo -d --id bg -- sh -c 'while true; do date; sleep 1; done'
  ferry exec demo bg -- ps
  ferry logs demo bg --follow
  ferry kill demo bg
  ferry uvm stop demo

State lives under $FERRY_STATE_DIR (default /run/ferry as root); set it to run several
independent installations side by side. Logs: <state>/uvms/NAME/{shim,gcs}.log."
)]
pub struct Cli {
    /// State directory (overrides $FERRY_STATE_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start, stop, list and inspect utility VMs.
    #[command(subcommand)]
    Uvm(UvmCommand),
    /// The boot image (kernel + initramfs) of QEMU UVMs.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Create a container in a UVM and run its command (foreground: output streamed, exit code
    /// propagated; --detach: print the container id and return).
    Run(RunArgs),
    /// Run another command in a running container.
    Exec(ExecArgs),
    /// List the containers of a UVM, or the processes of one container.
    Ps {
        uvm: String,
        container: Option<String>,
    },
    /// Send a signal to a container's init process (or --pid).
    Kill {
        uvm: String,
        container: String,
        #[arg(long)]
        pid: Option<u32>,
        /// Signal name or number (KILL, TERM, INT, HUP, 9, 15, ...).
        #[arg(short, long, default_value = "KILL")]
        signal: String,
    },
    /// Attach to a running process's output (and stdin) from now on. Ctrl-C is forwarded to
    /// the process as SIGINT, as in a foreground run.
    Attach {
        uvm: String,
        container: String,
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Block until a process exits; exit with its exit code.
    Wait {
        uvm: String,
        container: String,
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Show a process's output captured so far (including while nobody was attached).
    Logs {
        uvm: String,
        container: String,
        #[arg(long)]
        pid: Option<u32>,
        /// Keep following until the process exits.
        #[arg(short, long)]
        follow: bool,
    },
    /// Delete an exited container (--force: kill it first).
    Rm {
        uvm: String,
        container: String,
        #[arg(short, long)]
        force: bool,
    },
    /// Live-migrate a running QEMU UVM, its containers and their output to another ferry
    /// host; the workload keeps running (a pause of milliseconds at the switch-over).
    Migrate(MigrateArgs),
    /// (internal) The per-UVM host process.
    #[command(hide = true)]
    Shim(ShimArgs),
    /// (internal) The guest agent, as `ferry-gcs`.
    #[command(hide = true)]
    Gcs(gcs::cli::Args),
}

/// The per-UVM host process's arguments (`ferry uvm start` passes them on).
#[derive(Args, Debug, Clone)]
pub struct ShimArgs {
    pub name: String,
    #[arg(long)]
    pub isolate: Option<bool>,
    /// Take over the running UVM this snapshot describes.
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// Per-stream log limit in MiB (a restore keeps the snapshot's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub log_limit: Option<u64>,
    #[arg(long, value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,
    /// Start nothing: wait for a UVM migrating here (`ferry uvm receive`).
    #[arg(long, conflicts_with = "restore")]
    pub incoming: bool,
    /// With --incoming: also take the source's request on TCP (HOST:PORT).
    #[arg(long, requires = "incoming")]
    pub listen: Option<String>,
    /// With --listen: the port QEMU receives memory on (default: the --listen port + 1).
    #[arg(long, requires = "listen")]
    pub memory_port: Option<u16>,
    #[command(flatten)]
    pub qemu: QemuArgs,
}

#[derive(Subcommand, Debug)]
pub enum UvmCommand {
    /// Start a UVM: by default on the embedded backend (the guest agent in its own
    /// namespaces, no hypervisor); `--backend qemu` boots a real VM (the image comes from
    /// `ferry image build`, built on first use).
    #[command(after_long_help = "\
Environment (read by the UVM's host process):
  FERRY_GCS_LOG=FILTER     the guest agent's log level (its gcs.log), e.g. debug
  FERRY_GCS_PROGRAM=PATH   local backend, for testing and debugging: run the program at this
                           absolute path as the guest agent instead of `ferry gcs`. It gets
                           the agent's arguments (--transport=hybrid-vsock --base SOCKET
                           --state-dir DIR --log-file FILE ...). A UVM whose agent is not
                           named ferry-gcs cannot be restored or upgraded.")]
    Start {
        name: String,
        /// Where the UVM runs.
        #[arg(long, value_enum, default_value_t = BackendKind::Local)]
        backend: BackendKind,
        #[command(flatten)]
        qemu: QemuArgs,
        /// Run the agent without namespaces of its own (no root needed; no containers either).
        #[arg(long)]
        no_isolate: bool,
        /// Keep at most this many MiB of each process's stdout and of its stderr on disk;
        /// older output is dropped (an attached client still receives every byte).
        #[arg(long, value_name = "MIB", default_value_t = 64,
              value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        log_limit: u64,
    },
    /// Stop a UVM: every container and process in it ends.
    Stop { name: String },
    /// List UVMs.
    Ls,
    /// Show a UVM's properties and containers (JSON).
    Inspect { name: String },
    /// Delete a stopped UVM's directory (logs included).
    Rm { name: String },
    /// Save the host side's view of a running UVM to a snapshot and stop its host process;
    /// the UVM and every process in it keep running. `ferry uvm restore` takes it back.
    Save {
        name: String,
        /// Where to write the snapshot (default: <state>/uvms/NAME/snapshot).
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Wait for a UVM to migrate here (the destination side of `ferry migrate`): a host
    /// process serves NAME's control socket and boots QEMU when a source arrives.
    Receive {
        name: String,
        /// Also take the source's request on TCP, for a source on another machine
        /// (`ferry migrate NAME --to tcp:HOST:PORT`); memory then comes on the next port.
        /// Only the migration request is served there: put it on a trusted network.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// The port QEMU receives memory on (default: the --listen port + 1).
        #[arg(long, requires = "listen")]
        memory_port: Option<u16>,
        #[command(flatten)]
        qemu: QemuArgs,
    },
    /// Run a QEMU UVM on this host again after `ferry migrate` lost its destination once the
    /// state had been sent (make sure the destination does not run it first).
    Resume { name: String },
    /// Start a new host process for the running UVM a snapshot describes.
    Restore { snapshot: PathBuf },
    /// Replace a UVM's host process (save, then restore) without touching its workload.
    Upgrade { name: String },
}

#[derive(Args, Debug)]
#[command(after_long_help = "\
DEST is another ferry host:
  DIR                 a ferry state directory on this machine (a receiver is started there
                      if none waits)
  unix:PATH           the control socket of a `ferry uvm receive` (its <state>/uvms/NAME/control.sock)
  tcp:HOST:PORT       a receiver reachable over TCP

The options are those of hcsshim's migration InitializeOptions (--options-file takes that
protobuf message as is); values out of range are refused before anything moves.")]
pub struct MigrateArgs {
    /// The UVM; with --containerd, the source sandbox's shim (its ttrpc address or bundle
    /// directory).
    pub uvm: String,
    /// The destination host (see below); with --containerd, the destination sandbox's shim,
    /// whose tasks were created with the runtime option incoming_session.
    #[arg(long, value_name = "DEST")]
    pub to: String,
    /// Drive two containerd shims through their Migration service (as an orchestrator
    /// would): export, import, prepare, transfer, finalize.
    #[arg(long)]
    pub containerd: bool,
    /// The migration session id (--containerd; default: generated).
    #[arg(long, requires = "containerd")]
    pub session: Option<String>,
    /// Where the destination receives, HOST:PORT on TCP (--containerd; default: a Unix
    /// socket, for two shims on one machine).
    #[arg(long, requires = "containerd")]
    pub listen: Option<String>,
    /// Check the options and the destination (image, shape), move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How memory travels: unix (one machine) or tcp (default: tcp for a tcp: DEST, else
    /// unix).
    #[arg(long, value_parser = ["unix", "tcp"])]
    pub transport: Option<String>,
    /// Throttle step, % (1-100): how hard a guest that dirties memory faster than it can be
    /// sent is slowed down.
    #[arg(long, value_name = "PCT")]
    pub throttle_scale: Option<f64>,
    /// First throttle step, % (1-99).
    #[arg(long, value_name = "PCT")]
    pub min_throttle: Option<u32>,
    /// Never slow the guest down.
    #[arg(long)]
    pub no_throttle: bool,
    /// Switch over after this many memory passes at most.
    #[arg(long, value_name = "N")]
    pub max_passes: Option<u32>,
    /// Longest acceptable pause at the switch-over, ms (QEMU's downtime-limit).
    #[arg(long, value_name = "MS")]
    pub target_blackout_ms: Option<u32>,
    /// Cancel (and resume on the source) if the pause would exceed this, ms.
    #[arg(long, value_name = "MS")]
    pub cancel_blackout_over_ms: Option<u32>,
    /// Compress memory with zstd over this many parallel streams.
    #[arg(long, value_name = "N")]
    pub compress_workers: Option<u32>,
    /// Cap the transfer rate, bytes per second.
    #[arg(long, value_name = "BYTES")]
    pub max_bandwidth: Option<u64>,
    /// hcsshim-compatible InitializeOptions (protobuf) from a file, instead of the flags.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "throttle_scale", "min_throttle", "no_throttle", "max_passes", "target_blackout_ms",
        "cancel_blackout_over_ms", "compress_workers", "max_bandwidth"])]
    pub options_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build a kernel + initramfs from Debian packages (downloaded with apt-get download,
    /// unpacked, never installed) and a static ferry-gcs as /init; print their paths. Cached
    /// by a hash of the inputs: a second build with the same inputs is instant.
    Build {
        /// A statically linked ferry-gcs (default: next to ferry, or what
        /// scripts/build-static-gcs.sh built).
        #[arg(long)]
        gcs: Option<PathBuf>,
        /// A static busybox (default: /bin/busybox when static, else the busybox-static package).
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// Use this kernel .deb instead of downloading one.
        #[arg(long)]
        kernel_deb: Option<PathBuf>,
        /// The package naming the kernel (a meta package is followed to its dependency).
        #[arg(long, default_value = image::DEFAULT_KERNEL_PACKAGE)]
        kernel_package: String,
        /// Where packages and images are kept (default: <state>/images/uvm).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ProcessArgs {
    /// Allocate a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Return at once (print the container id) instead of streaming the output.
    #[arg(short, long)]
    pub detach: bool,
    /// With --detach: keep stdin open for a later `ferry attach` (foreground runs always
    /// forward stdin).
    #[arg(short, long)]
    pub interactive: bool,
    /// Environment variable (KEY=VALUE), repeatable.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    pub uvm: String,
    /// Container id (default: a random one).
    #[arg(long)]
    pub id: Option<String>,
    /// Root filesystem directory on this host.
    #[arg(long, conflicts_with = "image")]
    pub rootfs: Option<String>,
    /// Built-in image (default: busybox, made from the host's busybox-static).
    #[arg(long)]
    pub image: Option<String>,
    #[command(flatten)]
    pub process: ProcessArgs,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    pub uvm: String,
    pub container: String,
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// Parses a signal name or number.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("signal {n} is out of range (1-64)"))
        };
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let sig: nix::sys::signal::Signal = format!("SIG{name}")
        .parse()
        .map_err(|_| format!("unknown signal {s:?} (try KILL, TERM, INT, HUP or a number)"))?;
    Ok(sig as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("KILL"), Ok(9));
        assert_eq!(parse_signal("sigterm"), Ok(15));
        assert_eq!(parse_signal("2"), Ok(2));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
