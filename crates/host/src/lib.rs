//! ferry's host side, below the UVM backends and the CLI:
//!
//! * [`guest_connection`] — the bridge client to one guest agent;
//! * [`container`] — containers (and the UVM itself) and process creation with stdio pipes;
//! * [`process`] — process handles, exit codes, signals, and [`process::MigrationState`];
//! * [`cmd`] — `Command` and `attach`: relays between the caller's streams and a process.

pub mod cmd;
pub mod container;
pub mod error;
pub mod guest_connection;
pub mod process;
pub mod stdio;

pub use cmd::{Command, Running, Streams, attach};
pub use container::{Container, Pipes};
pub use error::{HostError, Result};
pub use guest_connection::{ConnectionOptions, ConnectionState, GuestConnection};
pub use process::{MigrationState, Process};
pub use stdio::{InputPipe, OutputPipe};
