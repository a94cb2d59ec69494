//! The ferry-gcs command line, shared by the `ferry-gcs` binary and `ferry gcs`.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;
use transport::{Side, Transport};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TransportKind {
    /// AF_VSOCK: dial the host at --host-cid (inside a VM with a virtio-vsock device).
    Vsock,
    /// Hybrid vsock over Unix sockets: dial port P by connecting to `<base>_<P>`. This is how
    /// the agent runs on the host itself (ferry's embedded default) and how tests drive it.
    HybridVsock,
    /// A named virtio-serial port (QEMU) carrying a multiplexer; survives the host
    /// reconnecting (after a migration). The default with --init.
    VirtioSerial,
}

/// ferry-gcs — ferry's guest agent.
///
/// Runs inside a utility VM (or, on ferry's embedded default, on the host in its own
/// namespaces), dials the host's bridge on port 0x40000000, and serves the GCS bridge protocol
/// v4: creating OCI containers, running processes with their stdio on per-process ports,
/// waiting, signalling, resizing consoles. When the bridge breaks it keeps everything running
/// and dials again every --reconnect-interval-ms.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "ferry-gcs",
    version,
    after_long_help = "\
Examples:
  Standalone on the host, against a host side listening on /tmp/uvm/vm.sock_1073741824:
    ferry-gcs --transport hybrid-vsock --base /tmp/uvm/vm.sock --state-dir /tmp/uvm/state

  Inside a VM with virtio-vsock (the host is CID 2):
    ferry-gcs --transport vsock

  Inside a VM whose QEMU has a virtio-serial port named ferry.0, e.g.
    -device virtio-serial-pci,id=vser0
    -chardev socket,id=agent,path=/tmp/agent.sock,server=on,wait=off
    -device virtserialport,bus=vser0.0,chardev=agent,name=ferry.0
  (the host, e.g. ferry's QEMU backend, connects to /tmp/agent.sock and runs ferry's
  multiplexer over it: yamux, each stream opened with the port it is for):
    ferry-gcs --transport virtio-serial --port-name ferry.0 --state-dir /run/ferry-gcs

  As the init of a ferry VM image (/init in its initramfs; the kernel command line passes
  the arguments after `--`):
    qemu-system-x86_64 ... -append 'console=ttyS0 -- --init --port-name ferry.0'
  --init mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm, /run, /tmp and cgroup2,
  loads the modules listed in /lib/modules/ferry/order (finit_module, in that order), finds
  the virtio-serial port by name under /sys/class/virtio-ports, and powers the VM off when the
  agent stops. It is implied when ferry-gcs runs as PID 1 with no arguments at all.

Logging: --log-level (or FERRY_LOG=debug, with tracing's filter syntax, e.g.
FERRY_LOG=gcs=debug,info). Logs go to stderr, or to --log-file."
)]
pub struct Args {
    /// How to reach the host [default: vsock; virtio-serial with --init].
    #[arg(long, value_enum)]
    pub transport: Option<TransportKind>,
    /// Name of the virtio-serial port (--transport virtio-serial).
    #[arg(long, default_value = "ferry.0")]
    pub port_name: String,
    /// Run as a VM's init (PID 1): mount the basic file systems, load the image's modules,
    /// power off at the end. Implied for a PID 1 started without arguments.
    #[arg(long)]
    pub init: bool,
    /// Directory with the modules to load and their `order` file (--init).
    #[arg(long, default_value = crate::init::MODULES_DIR)]
    pub modules_dir: PathBuf,
    /// Base path of the hybrid-vsock sockets (required with --transport hybrid-vsock).
    #[arg(long, required_if_eq("transport", "hybrid-vsock"))]
    pub base: Option<PathBuf>,
    /// The host's vsock CID (--transport vsock).
    #[arg(long, default_value_t = 2)]
    pub host_cid: u32,
    /// Directory for container state.
    #[arg(long, default_value = "/run/ferry-gcs")]
    pub state_dir: PathBuf,
    /// Largest frame accepted or sent on the bridge, header included.
    #[arg(long, default_value_t = bridge::DEFAULT_MAX_FRAME_SIZE, value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub max_frame_size: u32,
    /// Pause between attempts to reach the bridge when it is down (a new host is reached
    /// within this; stdio streams retry at four times this, and at once when a host is back).
    #[arg(long, default_value_t = 25)]
    pub reconnect_interval_ms: u64,
    /// Bound on every dial (bridge and stdio ports).
    #[arg(long, default_value_t = 5000)]
    pub dial_timeout_ms: u64,
    /// After a process exits, how long its output may keep flowing before the exit is reported.
    #[arg(long, default_value_t = 5000)]
    pub output_drain_grace_ms: u64,
    /// Bytes of unacknowledged output kept per resumable stdio stream; when full, the
    /// process's writes wait (nothing is dropped).
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(4096..=1 << 30))]
    pub stdio_buffer_bytes: u64,
    /// Log filter (error, warn, info, debug, trace, or tracing directives); overrides FERRY_LOG.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Append logs to this file instead of stderr.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Run as the embedded default's utility VM: move into new mount, pid, uts and ipc
    /// namespaces first and become PID 1 there (needs root). Everything the agent runs dies
    /// with it.
    #[arg(long)]
    pub isolate: bool,
    /// Hostname inside the namespaces (--isolate) or of the VM (--init).
    #[arg(long, default_value = "ferry-uvm")]
    pub hostname: String,
    /// For 2 s after its host changed (its channel's session or its bridge connection ended: a
    /// live migration, a restore), run the agent at this nice value (-20 to 19), above a busy
    /// workload: what it does then decides how long output stays stopped. Otherwise it runs
    /// at the priority it was started with, as the processes it starts do.
    /// [default: -10 with --init, off otherwise]
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub reconnect_nice: Option<i32>,
}

/// The agent's nice value after its host changed, as a VM's init: the VM's workloads share
/// its one or two vCPUs with it. Under TCG this halved ferry's added blackout with a
/// container copying memory in a loop (198 -> 104 ms) and took a third off an idle guest's;
/// -20 did no better (BENCHMARKS.md).
const INIT_RECONNECT_NICE: i32 = -10;

fn init_logging(args: &Args) -> std::io::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match &args.log_level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match &args.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        // As a VM's init, stderr is the serial console, read back as a log file: no colours.
        None => builder
            .with_ansi(!crate::init::wanted(args.init))
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

/// Runs the agent as the command line describes; returns the process exit code.
pub fn main(args: Args) -> std::process::ExitCode {
    // Every stdio stream costs descriptors (a listener, a connection, a log file): lift the
    // soft limit to the hard one, as servers do, so thousands of processes fit.
    raise_fd_limit();
    if args.isolate
        && let Err(e) = crate::isolate::enter_namespaces(&args.hostname)
    {
        eprintln!("ferry-gcs: cannot isolate: {e}");
        return std::process::ExitCode::from(2);
    }
    let as_init = crate::init::wanted(args.init);
    if let Err(e) = init_logging(&args) {
        eprintln!("ferry-gcs: cannot open log file: {e}");
        if as_init {
            crate::init::power_off();
        }
        return std::process::ExitCode::from(2);
    }
    if as_init {
        let options = crate::init::InitOptions {
            modules_dir: args.modules_dir.clone(),
            hostname: args.hostname.clone(),
        };
        if let Err(e) = crate::init::prepare(&options) {
            tracing::error!(error = %e, "init failed");
            crate::init::power_off();
        }
    }
    // On the thread that becomes the runtime's, before any other exists: a nice value is per
    // thread, and new threads inherit their creator's.
    let nice = args
        .reconnect_nice
        .or(as_init.then_some(INIT_RECONNECT_NICE));
    if let Some(nice) = nice {
        match crate::priority::install(nice) {
            Ok(own) => tracing::info!(own, after_host_change = nice, "agent priority"),
            Err(e) => tracing::warn!(
                nice,
                error = %e,
                "cannot raise the agent's priority after a host change; it keeps its own"
            ),
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(crate::priority::thread_started)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-gcs: cannot start the async runtime: {e}");
            if as_init {
                crate::init::power_off();
            }
            return std::process::ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async {
        let kind = args.transport.unwrap_or(if as_init {
            TransportKind::VirtioSerial
        } else {
            TransportKind::Vsock
        });
        let transport = match kind {
            TransportKind::VirtioSerial => crate::virtio_port::transport(&args.port_name),
            TransportKind::Vsock => Transport::vsock(args.host_cid),
            TransportKind::HybridVsock => {
                // clap guarantees --base with hybrid-vsock.
                Transport::hybrid_vsock(args.base.clone().unwrap_or_default(), Side::Guest)
            }
        };
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            transport = %transport.describe(),
            state_dir = %args.state_dir.display(),
            "ferry-gcs starting"
        );
        let config = crate::Config {
            transport,
            state_dir: args.state_dir.clone(),
            max_frame_size: args.max_frame_size,
            reconnect_interval: Duration::from_millis(args.reconnect_interval_ms),
            dial_timeout: Duration::from_millis(args.dial_timeout_ms),
            output_drain_grace: Duration::from_millis(args.output_drain_grace_ms),
            stdio_buffer: args.stdio_buffer_bytes as usize,
        };
        match crate::run(config).await {
            Ok(()) => {
                tracing::info!("ferry-gcs stopped");
                0
            }
            Err(e) => {
                tracing::error!(error = %e, "ferry-gcs failed");
                1
            }
        }
    });
    if as_init {
        runtime.shutdown_timeout(Duration::from_secs(1));
        crate::init::power_off();
    }
    std::process::ExitCode::from(code)
}

/// Lifts the open-file soft limit to the hard one (shared with `ferry`, whose shim needs it
/// for the same reason).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` is how people start the agent outside a VM: it must show a working command
    /// line for every transport.
    #[test]
    fn help_shows_a_standalone_start_for_every_transport() {
        let help = Args::command().render_long_help().to_string();
        for kind in TransportKind::value_variants() {
            let name = kind.to_possible_value().unwrap();
            let line = format!("ferry-gcs --transport {}", name.get_name());
            assert!(help.contains(&line), "--help lacks `{line}`:\n{help}");
        }
    }
}
