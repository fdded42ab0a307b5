//! Types shared between the `simrep` agent and its eBPF programs.
//!
//! Everything here is `no_std`, `#[repr(C)]` and fixed-width, so that the
//! kernel side and the user side agree on the layout byte for byte.
#![no_std]
