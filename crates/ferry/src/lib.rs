//! ferry's host side: the `ferry` command-line program, the per-UVM host process (the shim)
//! it talks to, and what both share (the control protocol, state paths, snapshots). A library
//! so that other front ends (the containerd shim) and the fuzz targets reach the same code.

pub mod cli;
pub mod client;
pub mod commands;
pub mod containerd;
pub mod control;
pub mod entry;
pub mod migrate;
pub mod paths;
pub mod shim;
pub mod snapshot;
pub mod spec;
