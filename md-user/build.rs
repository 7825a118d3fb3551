//! Embeds the eBPF object built by `cargo xtask build-ebpf` when it exists, and the git
//! revision md-user is built from (`md-user --version`).
//!
//! Without the object md-user still builds (plain `cargo build`/`cargo test` must not need the
//! BPF toolchain) and says at run time how to build the object or where to point MD_EBPF_OBJ.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

/// The commit HEAD names (12 hex digits), or `MD_GIT_REVISION` from the environment (a build
/// from a tarball), or `unknown`. Rebuilt when HEAD or the branch it is on moves.
fn git_revision(dir: &Path) -> String {
    println!("cargo:rerun-if-env-changed=MD_GIT_REVISION");
    if let Ok(r) = env::var("MD_GIT_REVISION") {
        return r;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let Some(rev) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let mut watch = Vec::new();
    if let Some(gd) = git(&["rev-parse", "--absolute-git-dir"]) {
        watch.push(Path::new(&gd).join("HEAD"));
    }
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
        let common = dir.join(common);
        watch.push(common.join("packed-refs"));
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(common.join(r));
        }
    }
    // Only files that exist: a missing one would rerun this script on every build.
    for w in watch.iter().filter(|w| w.exists()) {
        println!("cargo:rerun-if-changed={}", w.display());
    }
    rev
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    println!(
        "cargo:rustc-env=MD_GIT_REVISION={}",
        git_revision(&manifest)
    );
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
