//! Embeds the eBPF object built by `cargo xtask build-ebpf` when it exists.
//!
//! Without it md-user still builds (plain `cargo build`/`cargo test` must not need the BPF
//! toolchain) and says at run time how to build the object or where to point MD_EBPF_OBJ.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let obj = env::var_os("MD_EBPF_OBJ_BUILD")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/md-ebpf/md-ebpf.o"));
    println!("cargo:rerun-if-env-changed=MD_EBPF_OBJ_BUILD");
    println!("cargo:rerun-if-changed={}", obj.display());
    println!("cargo::rustc-check-cfg=cfg(md_ebpf_embedded)");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("md-ebpf.o");
    if let Ok(bytes) = fs::read(&obj) {
        fs::write(&out, bytes).unwrap();
        println!("cargo:rustc-cfg=md_ebpf_embedded");
    }
}
