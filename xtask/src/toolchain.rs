//! Detect (and, as root on Debian, install) what building `md-ebpf` needs:
//! a Rust toolchain that can build `core` for `bpfel-unknown-none`, and
//! bpf-linker.
//!
//! Two toolchain routes, in order of preference:
//! 1. Debian's Rust (`rustc-web`, >= 1.96, LLVM 22) with its std sources
//!    (`rust-web-src`), linked into rustup (`rustup toolchain link md-debian /usr`).
//!    It is a stable compiler, so `-Z build-std` needs `RUSTC_BOOTSTRAP=1`.
//! 2. A rustup nightly with the `rust-src` component.
//!
//! Detection is a handful of file checks and `--version` calls, so a run with
//! everything present costs milliseconds and caches nothing. [`plan`] is a pure
//! function from what was detected to what to do; it is unit-tested below.

use std::fmt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

use crate::util;

/// `(major, minor, patch)` of a rustc.
pub type Version = (u32, u32, u32);

/// Oldest Debian rustc that builds md-ebpf (LLVM 22, matching bpf-linker's).
pub const MIN_DEBIAN_RUSTC: Version = (1, 96, 0);
/// Name under which xtask links Debian's toolchain into rustup.
pub const LINK_NAME: &str = "md-debian";
/// The Debian packages of route 1 (rustc, cargo, std sources).
pub const DEBIAN_RUST_PKGS: [&str; 3] = ["rustc-web", "cargo-web", "rust-web-src"];
/// The LLVM bpf-linker is built against (Debian package and prefix).
pub const LLVM_PKG: &str = "llvm-22-dev";
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";

/// Hidden knob to exercise the "nothing installed" path without uninstalling
/// anything: `1` pretends no toolchain, no bpf-linker and no LLVM are present
/// (install steps are then printed, never run); `no-root` additionally pretends
/// not to be root, which yields the manual instructions.
pub const PRETEND_ENV: &str = "XTASK_PRETEND_NO_TOOLCHAIN";

/// What is present on this machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detected {
    pub is_root: bool,
    pub is_debian: bool,
    pub rustup: bool,
    /// Version of `/usr/bin/rustc`, if it exists.
    pub debian_rustc: Option<Version>,
    pub debian_cargo: bool,
    /// `/usr/lib/rustlib/src/rust/library` (from rust-web-src).
    pub debian_rust_src: bool,
    /// A rustup toolchain linked to `/usr` (e.g. `debian` or `md-debian`).
    pub linked_usr_toolchain: Option<String>,
    /// rustup's `nightly` exists and has the `rust-src` component.
    pub nightly_rust_src: bool,
    /// `bpf-linker --version`, if it runs.
    pub bpf_linker: Option<String>,
    /// `/usr/lib/llvm-22/bin/llvm-config` (from llvm-22-dev), needed to build bpf-linker.
    pub llvm22: bool,
}

/// The toolchain md-ebpf gets built with, as a rustup toolchain name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Toolchain {
    /// Debian's Rust linked into rustup under this name.
    Debian(String),
    /// rustup's nightly with rust-src.
    Nightly,
}

impl Toolchain {
    pub fn rustup_name(&self) -> &str {
        match self {
            Toolchain::Debian(name) => name,
            Toolchain::Nightly => "nightly",
        }
    }
}

impl fmt::Display for Toolchain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Toolchain::Debian(name) => {
                write!(f, "Debian's Rust (/usr) as rustup toolchain `{name}`")
            }
            Toolchain::Nightly => write!(f, "rustup nightly with rust-src"),
        }
    }
}

/// One install action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `apt-get update && apt-get install -y <pkgs>`.
    AptInstall(Vec<&'static str>),
    /// `rustup toolchain link <name> /usr`.
    RustupLink(String),
    /// `cargo install bpf-linker` against LLVM 22.
    InstallBpfLinker,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::AptInstall(pkgs) => {
                write!(f, "apt-get update && apt-get install -y {}", pkgs.join(" "))
            }
            Step::RustupLink(name) => write!(f, "rustup toolchain link {name} /usr"),
            Step::InstallBpfLinker => write!(f, "{}", BPF_LINKER_INSTALL),
        }
    }
}

const BPF_LINKER_INSTALL: &str =
    "LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
     cargo install bpf-linker --no-default-features --features llvm-22";

/// What to do about the toolchain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Run `steps` (possibly none), then build with `toolchain`.
    Use {
        toolchain: Toolchain,
        steps: Vec<Step>,
    },
    /// Cannot install automatically: tell the user what is missing and how to get it.
    Manual { missing: Vec<String> },
}

fn debian_usable(d: &Detected) -> bool {
    d.debian_rustc.is_some_and(|v| v >= MIN_DEBIAN_RUSTC) && d.debian_cargo && d.debian_rust_src
}

/// Decide what to install and which toolchain to build with. Pure.
pub fn plan(d: &Detected) -> Plan {
    let can_apt = d.is_root && d.is_debian;
    let mut apt: Vec<&'static str> = Vec::new();
    let mut steps = Vec::new();
    let mut missing = Vec::new();

    // The Debian toolchain needs a rustup name; reuse an existing link to /usr.
    let debian_name = |steps: &mut Vec<Step>, missing: &mut Vec<String>| -> String {
        match &d.linked_usr_toolchain {
            Some(name) => name.clone(),
            None => {
                if d.rustup {
                    steps.push(Step::RustupLink(LINK_NAME.to_string()));
                } else {
                    missing.push("rustup (to link Debian's toolchain and run it)".to_string());
                }
                LINK_NAME.to_string()
            }
        }
    };

    let toolchain = if debian_usable(d) {
        Some(Toolchain::Debian(debian_name(&mut steps, &mut missing)))
    } else if d.nightly_rust_src && d.rustup {
        Some(Toolchain::Nightly)
    } else if can_apt {
        apt.extend(DEBIAN_RUST_PKGS);
        Some(Toolchain::Debian(debian_name(&mut steps, &mut missing)))
    } else {
        if !d.rustup {
            missing.push("rustup".to_string());
        }
        missing.push(describe_missing_toolchain(d));
        None
    };

    if d.bpf_linker.is_none() {
        if d.llvm22 {
            steps.push(Step::InstallBpfLinker);
        } else if can_apt {
            apt.push(LLVM_PKG);
            steps.push(Step::InstallBpfLinker);
        } else {
            missing.push(format!(
                "bpf-linker (and {LLVM_PKG}, which building it needs)"
            ));
        }
    }

    match toolchain {
        Some(toolchain) if missing.is_empty() => {
            if !apt.is_empty() {
                steps.insert(0, Step::AptInstall(apt));
            }
            Plan::Use { toolchain, steps }
        }
        _ => Plan::Manual { missing },
    }
}

fn describe_missing_toolchain(d: &Detected) -> String {
    let mut why = Vec::new();
    match d.debian_rustc {
        None => why.push(format!("no {DEBIAN_RUSTC}")),
        Some(v) if v < MIN_DEBIAN_RUSTC => why.push(format!(
            "{DEBIAN_RUSTC} is {}, need >= {}",
            fmt_version(v),
            fmt_version(MIN_DEBIAN_RUSTC)
        )),
        Some(_) => {}
    }
    if d.debian_rustc.is_some() && !d.debian_cargo {
        why.push(format!("no {DEBIAN_CARGO}"));
    }
    if d.debian_rustc.is_some() && !d.debian_rust_src {
        why.push("no /usr/lib/rustlib/src/rust/library (rust-web-src)".to_string());
    }
    why.push("no rustup nightly with rust-src".to_string());
    format!(
        "a Rust toolchain that can build `core` for bpfel-unknown-none ({})",
        why.join("; ")
    )
}

fn fmt_version((a, b, c): Version) -> String {
    format!("{a}.{b}.{c}")
}

/// The message printed when xtask cannot install things itself.
pub fn manual_instructions(missing: &[String]) -> String {
    let mut s = String::from("the BPF toolchain for md-ebpf is incomplete. Missing:\n");
    for m in missing {
        s += &format!("  - {m}\n");
    }
    s += &format!(
        "\
Install it with one of these routes, then re-run the command.

  # Route 1: Debian 12 (bookworm), as root: Debian's Rust >= 1.96 (LLVM 22) linked into rustup
  apt-get update
  apt-get install -y {} {LLVM_PKG}
  rustup toolchain link {LINK_NAME} /usr
  {BPF_LINKER_INSTALL}

  # Route 2: anywhere rustup can download: nightly with rust-src
  rustup toolchain install nightly --component rust-src
  cargo install bpf-linker
  # (bpf-linker's default feature links the system LLVM 23; for another LLVM N use
  #  --no-default-features --features llvm-N with LLVM_SYS_N1_PREFIX=<its prefix>)

Run as root on Debian, `cargo xtask build-ebpf` and `cargo xtask test` do route 1 themselves.",
        DEBIAN_RUST_PKGS.join(" ")
    );
    s
}

/// `1.96.0` out of `rustc 1.96.0 (ac68faa20 2026-05-25) ...`.
pub fn parse_rustc_version(s: &str) -> Option<Version> {
    let v = s.split_whitespace().nth(1)?;
    let v = v.split(['-', '+']).next()?;
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// The name of a toolchain in `rustup toolchain list -v` whose path is `/usr`.
pub fn parse_linked_usr(list: &str) -> Option<String> {
    let usr = Path::new("/usr").canonicalize().ok();
    list.lines().find_map(|line| {
        let name = line.split_whitespace().next()?;
        let path = line.split_whitespace().last()?;
        let p = Path::new(path);
        let is_usr = p == Path::new("/usr") || (usr.is_some() && p.canonicalize().ok() == usr);
        is_usr.then(|| name.to_string())
    })
}

/// Remove environment that could leak into a nested cargo/rustc from the
/// surrounding `cargo xtask` run or the user's shell and change which compiler,
/// flags or target directory get used.
pub fn sanitize(cmd: &mut Command) -> &mut Command {
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTUP_TOOLCHAIN_SOURCE",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_BOOTSTRAP",
        "CARGO",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_BUILD_RUSTC",
        "CARGO_BUILD_RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn rustup() -> Command {
    let mut c = util::command("rustup");
    sanitize(&mut c);
    c
}

/// Look at the machine. Cheap: file checks and a few `--version` calls.
pub fn detect() -> Detected {
    let rustup_present = util::which("rustup").is_some();
    let debian_rustc = Path::new(DEBIAN_RUSTC)
        .is_file()
        .then(|| util::output_of(sanitize(&mut Command::new(DEBIAN_RUSTC)).arg("--version")))
        .flatten()
        .and_then(|s| parse_rustc_version(&s));
    let linked_usr_toolchain = rustup_present
        .then(|| util::output_of(rustup().args(["toolchain", "list", "-v"])))
        .flatten()
        .and_then(|s| parse_linked_usr(&s));
    let nightly_rust_src = rustup_present
        && util::output_of(rustup().args([
            "component",
            "list",
            "--toolchain",
            "nightly",
            "--installed",
        ]))
        .is_some_and(|s| s.lines().any(|l| l.trim().starts_with("rust-src")));
    let bpf_linker =
        util::output_of(util::command("bpf-linker").arg("--version")).map(|s| s.trim().to_string());

    let mut d = Detected {
        is_root: util::is_root(),
        is_debian: util::is_debian(),
        rustup: rustup_present,
        debian_rustc,
        debian_cargo: Path::new(DEBIAN_CARGO).is_file(),
        debian_rust_src: Path::new(DEBIAN_RUST_SRC).is_dir(),
        linked_usr_toolchain,
        nightly_rust_src,
        bpf_linker,
        llvm22: Path::new(LLVM_PREFIX).join("bin/llvm-config").is_file(),
    };
    if let Some(pretend) = pretend() {
        d = Detected {
            is_root: d.is_root && pretend != "no-root",
            is_debian: d.is_debian,
            rustup: d.rustup,
            ..Detected::default()
        };
    }
    d
}

fn pretend() -> Option<String> {
    std::env::var(PRETEND_ENV)
        .ok()
        .filter(|v| !v.is_empty() && v != "0")
}

fn run_step(step: &Step) -> Result<()> {
    match step {
        Step::AptInstall(pkgs) => util::apt_install(pkgs),
        Step::RustupLink(name) => util::run(rustup().args(["toolchain", "link", name, "/usr"])),
        Step::InstallBpfLinker => {
            eprintln!("xtask: building bpf-linker against LLVM 22 (takes a few minutes, once)");
            let mut c = util::host_cargo();
            sanitize(&mut c);
            // Keep the surrounding toolchain (sanitize removed RUSTUP_TOOLCHAIN).
            if let Ok(tc) = std::env::var("RUSTUP_TOOLCHAIN") {
                c.env("RUSTUP_TOOLCHAIN", tc);
            }
            util::run(
                c.env("LLVM_PREFIX", LLVM_PREFIX)
                    .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
                    .args([
                        "install",
                        "bpf-linker",
                        "--no-default-features",
                        "--features",
                        "llvm-22",
                    ]),
            )
        }
    }
}

/// Make sure everything is present (installing it when possible) and return
/// the toolchain to build md-ebpf with.
pub fn ensure() -> Result<Toolchain> {
    let d = detect();
    match plan(&d) {
        Plan::Manual { missing } => bail!(manual_instructions(&missing)),
        Plan::Use { toolchain, steps } if steps.is_empty() => {
            println!(
                "toolchain: nothing to install ({toolchain}; {})",
                d.bpf_linker.as_deref().unwrap_or("bpf-linker")
            );
            Ok(toolchain)
        }
        Plan::Use { steps, .. } => {
            println!("toolchain: installing what is missing:");
            for s in &steps {
                println!("  {s}");
            }
            if pretend().is_some() {
                bail!("{PRETEND_ENV} is set: not running the install steps above");
            }
            for s in &steps {
                run_step(s)?;
            }
            let after = detect();
            match plan(&after) {
                Plan::Use { toolchain, steps } if steps.is_empty() => {
                    println!("toolchain: ready ({toolchain})");
                    Ok(toolchain)
                }
                Plan::Use { steps, .. } => bail!(
                    "installed, but still incomplete; would still need: {}",
                    steps
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                Plan::Manual { missing } => bail!(manual_instructions(&missing)),
            }
        }
    }
}

/// `cargo xtask toolchain`: print detection and plan, change nothing.
pub fn show() -> Result<()> {
    let d = detect();
    println!("detected:");
    println!(
        "  root: {}, debian: {}, rustup: {}",
        d.is_root, d.is_debian, d.rustup
    );
    println!(
        "  {DEBIAN_RUSTC}: {}, {DEBIAN_CARGO}: {}, std sources: {}",
        d.debian_rustc
            .map(fmt_version)
            .unwrap_or_else(|| "absent".into()),
        d.debian_cargo,
        d.debian_rust_src
    );
    println!(
        "  rustup toolchain linked to /usr: {}",
        d.linked_usr_toolchain.as_deref().unwrap_or("none")
    );
    println!("  nightly with rust-src: {}", d.nightly_rust_src);
    println!(
        "  bpf-linker: {}",
        d.bpf_linker.as_deref().unwrap_or("absent")
    );
    println!("  {LLVM_PKG} ({LLVM_PREFIX}): {}", d.llvm22);
    match plan(&d) {
        Plan::Use { toolchain, steps } => {
            println!("plan: build with {toolchain}");
            if steps.is_empty() {
                println!("  nothing to install");
            }
            for s in steps {
                println!("  install: {s}");
            }
            Ok(())
        }
        Plan::Manual { missing } => bail!(manual_instructions(&missing)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's happy state: Debian toolchain linked, bpf-linker built.
    fn ready() -> Detected {
        Detected {
            is_root: true,
            is_debian: true,
            rustup: true,
            debian_rustc: Some((1, 96, 0)),
            debian_cargo: true,
            debian_rust_src: true,
            linked_usr_toolchain: Some("debian".into()),
            nightly_rust_src: false,
            bpf_linker: Some("bpf-linker 0.13.0".into()),
            llvm22: true,
        }
    }

    /// A fresh machine: rustup with stable and a nightly without rust-src.
    fn fresh(is_root: bool, is_debian: bool) -> Detected {
        Detected {
            is_root,
            is_debian,
            rustup: true,
            ..Detected::default()
        }
    }

    #[test]
    fn everything_present_means_nothing_to_do() {
        assert_eq!(
            plan(&ready()),
            Plan::Use {
                toolchain: Toolchain::Debian("debian".into()),
                steps: vec![]
            }
        );
        // Root or not does not matter when nothing is missing.
        let d = Detected {
            is_root: false,
            is_debian: false,
            ..ready()
        };
        assert_eq!(
            plan(&d),
            Plan::Use {
                toolchain: Toolchain::Debian("debian".into()),
                steps: vec![]
            }
        );
    }

    #[test]
    fn debian_toolchain_is_preferred_over_nightly() {
        let d = Detected {
            nightly_rust_src: true,
            ..ready()
        };
        assert!(matches!(
            plan(&d),
            Plan::Use {
                toolchain: Toolchain::Debian(_),
                ..
            }
        ));
    }

    #[test]
    fn unlinked_debian_toolchain_gets_linked_without_root() {
        let d = Detected {
            is_root: false,
            linked_usr_toolchain: None,
            ..ready()
        };
        assert_eq!(
            plan(&d),
            Plan::Use {
                toolchain: Toolchain::Debian(LINK_NAME.into()),
                steps: vec![Step::RustupLink(LINK_NAME.into())],
            }
        );
    }

    #[test]
    fn nightly_with_rust_src_is_the_fallback() {
        let d = Detected {
            nightly_rust_src: true,
            bpf_linker: Some("x".into()),
            ..fresh(false, false)
        };
        assert_eq!(
            plan(&d),
            Plan::Use {
                toolchain: Toolchain::Nightly,
                steps: vec![]
            }
        );
    }

    #[test]
    fn old_debian_rustc_is_not_usable() {
        let d = Detected {
            debian_rustc: Some((1, 85, 0)),
            nightly_rust_src: true,
            ..ready()
        };
        assert!(matches!(
            plan(&d),
            Plan::Use {
                toolchain: Toolchain::Nightly,
                ..
            }
        ));
        let d = Detected {
            debian_rust_src: false,
            ..ready()
        };
        // Root on Debian: install the packages (apt-get upgrades/installs), keep the link name.
        assert_eq!(
            plan(&d),
            Plan::Use {
                toolchain: Toolchain::Debian("debian".into()),
                steps: vec![Step::AptInstall(DEBIAN_RUST_PKGS.to_vec())],
            }
        );
    }

    #[test]
    fn fresh_debian_as_root_installs_everything() {
        let mut pkgs = DEBIAN_RUST_PKGS.to_vec();
        pkgs.push(LLVM_PKG);
        assert_eq!(
            plan(&fresh(true, true)),
            Plan::Use {
                toolchain: Toolchain::Debian(LINK_NAME.into()),
                steps: vec![
                    Step::AptInstall(pkgs),
                    Step::RustupLink(LINK_NAME.into()),
                    Step::InstallBpfLinker,
                ],
            }
        );
    }

    #[test]
    fn only_bpf_linker_missing() {
        let d = Detected {
            bpf_linker: None,
            ..ready()
        };
        assert_eq!(
            plan(&d),
            Plan::Use {
                toolchain: Toolchain::Debian("debian".into()),
                steps: vec![Step::InstallBpfLinker],
            }
        );
        // No LLVM 22 and not root: cannot build bpf-linker.
        let d = Detected {
            bpf_linker: None,
            llvm22: false,
            is_root: false,
            ..ready()
        };
        let Plan::Manual { missing } = plan(&d) else {
            panic!("expected manual")
        };
        assert_eq!(missing.len(), 1);
        assert!(missing[0].starts_with("bpf-linker"));
        // No LLVM 22 but root on Debian: apt-get it first.
        let d = Detected {
            bpf_linker: None,
            llvm22: false,
            ..ready()
        };
        assert_eq!(
            plan(&d),
            Plan::Use {
                toolchain: Toolchain::Debian("debian".into()),
                steps: vec![Step::AptInstall(vec![LLVM_PKG]), Step::InstallBpfLinker],
            }
        );
    }

    #[test]
    fn nothing_installed_and_not_root_or_not_debian_prints_both_routes() {
        for d in [fresh(false, true), fresh(true, false), fresh(false, false)] {
            let Plan::Manual { missing } = plan(&d) else {
                panic!("expected manual for {d:?}")
            };
            assert_eq!(missing.len(), 2, "{missing:?}");
            let msg = manual_instructions(&missing);
            assert!(msg.contains("apt-get install -y rustc-web cargo-web rust-web-src llvm-22-dev"));
            assert!(msg.contains("rustup toolchain link md-debian /usr"));
            assert!(msg.contains("--features llvm-22"));
            assert!(msg.contains("rustup toolchain install nightly --component rust-src"));
            assert!(msg.contains("cargo install bpf-linker\n"));
        }
    }

    #[test]
    fn no_rustup_is_reported() {
        let d = Detected {
            rustup: false,
            linked_usr_toolchain: None,
            ..ready()
        };
        let Plan::Manual { missing } = plan(&d) else {
            panic!("expected manual")
        };
        assert!(missing[0].starts_with("rustup"));
    }

    #[test]
    fn parses_rustc_versions() {
        let v = "rustc 1.96.0 (ac68faa20 2026-05-25) (built from a source tarball)\n";
        assert_eq!(parse_rustc_version(v), Some((1, 96, 0)));
        assert_eq!(
            parse_rustc_version("rustc 1.97.0-nightly (abc 2026-06-01)"),
            Some((1, 97, 0))
        );
        assert_eq!(parse_rustc_version("garbage"), None);
        assert!(Some((1, 96, 0)) >= Some(MIN_DEBIAN_RUSTC));
        assert!((1, 100, 0) > MIN_DEBIAN_RUSTC);
        assert!((1, 95, 9) < MIN_DEBIAN_RUSTC);
    }

    #[test]
    fn finds_the_toolchain_linked_to_usr() {
        let list = "\
stable-x86_64-unknown-linux-gnu (active, default) /root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu
nightly-x86_64-unknown-linux-gnu /root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu
debian /usr
";
        assert_eq!(parse_linked_usr(list), Some("debian".into()));
        assert_eq!(
            parse_linked_usr("stable /root/.rustup/toolchains/stable\n"),
            None
        );
    }
}
