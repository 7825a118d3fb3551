//! Map keys, values and names shared by md's eBPF programs and md-user.
//!
//! Every type is `#[repr(C)]` with explicit padding (no implicit holes, no bool, no enum) so
//! both sides agree byte for byte; a size assertion per type keeps them honest. Addresses are
//! kept as they appear on the wire (`[u8; 4]`, so bpftool prints `[172,18,0,2]`), ports in host
//! byte order (so bpftool prints `8080`).
#![no_std]

pub mod maps;
mod types;

pub use types::*;
