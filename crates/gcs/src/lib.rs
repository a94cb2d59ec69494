//! ferry-gcs: the guest agent. It dials the host's bridge, speaks the GCS bridge protocol v4,
//! and runs containers and processes whose stdio it relays over per-process ports.
//!
//! What sets it apart from a plain GCS is that nothing it runs depends on the bridge connection:
//! when the host goes away (a host restart, a live migration) containers, processes, pending
//! waits and exit notifications all stay, and a new host connection picks them up.

pub mod agent;
pub mod cli;
pub mod connection;
pub mod container;
pub mod error;
pub mod handlers;
pub mod init;
pub mod isolate;
pub mod outbox;
pub mod priority;
pub mod process;
pub mod virtio_port;

pub use agent::{Agent, Config};

/// Runs the agent until the host shuts the UVM down.
pub async fn run(config: Config) -> std::io::Result<()> {
    // A process started by a container may double-fork; as subreaper the agent collects the
    // orphans instead of leaving zombies to whatever init the host has.
    if std::process::id() != 1 {
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let agent = Agent::new(config)?;
    let reaper = tokio::spawn(agent.reaper.clone().run());
    let signals = tokio::spawn(shut_down_on_signals(agent.clone()));
    connection::serve(agent).await;
    signals.abort();
    reaper.abort();
    Ok(())
}

/// SIGTERM or SIGINT: kill everything the agent runs and stop, as a VM powering off would.
async fn shut_down_on_signals(agent: std::sync::Arc<Agent>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("termination signal: stopping every process and shutting down");
    let _ = agent.shutdown_container(bridge::UVM_CONTAINER_ID, true);
}
