//! `cargo xtask test`: the whole test suite, as root on a clean clone.
//!
//! 1. root check; 2. install what is missing (BPF toolchain, test tools);
//! 3. build-ebpf; 4. build md-user; 5. unit tests (no root needed);
//! 6. end-to-end tests (md-tests with `MD_E2E=1`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::{build_ebpf, toolchain, util};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only run end-to-end tests whose name contains STR (a libtest filter).
    #[arg(long, value_name = "STR")]
    pub filter: Option<String>,
    /// Skip the end-to-end layer (steps 1-5 only).
    #[arg(long)]
    pub no_e2e: bool,
}

/// Commands the end-to-end tests use, and the Debian package providing each.
pub const TEST_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("strace", "strace"),
    ("bpftool", "bpftool"),
    ("iperf3", "iperf3"),
    ("ps", "procps"),
    ("sysctl", "procps"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("dig", "dnsutils"),
    ("dnsmasq", "dnsmasq-base"),
    ("tcpdump", "tcpdump"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // md's CNI plugin under real runtimes (tests/tests/cni_runtimes.rs).
    ("podman", "podman"),
    ("conmon", "conmon"),
    ("runc", "runc"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("busybox", "busybox-static"),
    // Reference plugins chained around md (tests/tests/cni.rs).
    ("/usr/lib/cni/tuning", "containernetworking-plugins"),
];

/// The packages to install for the commands `present` says are missing (deduplicated, in order).
#[cfg(test)]
pub fn missing_packages(present: impl Fn(&str) -> bool) -> Vec<&'static str> {
    util::missing_packages(TEST_TOOLS, present)
}

fn ensure_test_tools() -> Result<()> {
    util::ensure_tools("test tools", TEST_TOOLS)
}

enum Outcome {
    Passed(Duration),
    Failed(Duration, String),
    Skipped(&'static str),
}

struct Summary(Vec<(&'static str, Outcome)>);

impl Summary {
    /// Run a step, record its outcome, and return whether it passed.
    fn step(&mut self, name: &'static str, f: impl FnOnce() -> Result<()>) -> bool {
        println!("\n==> {name}");
        let t = Instant::now();
        let outcome = match f() {
            Ok(()) => Outcome::Passed(t.elapsed()),
            Err(e) => {
                eprintln!("xtask: {name}: {e:#}");
                Outcome::Failed(t.elapsed(), format!("{e:#}"))
            }
        };
        let ok = matches!(outcome, Outcome::Passed(_));
        self.0.push((name, outcome));
        ok
    }

    fn skip(&mut self, name: &'static str, why: &'static str) {
        self.0.push((name, Outcome::Skipped(why)));
    }

    fn print(&self) -> bool {
        println!("\n==> summary");
        let mut ok = true;
        for (name, o) in &self.0 {
            match o {
                Outcome::Passed(d) => println!("  ok       {name} ({:.1}s)", d.as_secs_f64()),
                Outcome::Failed(d, e) => {
                    ok = false;
                    let first = e.lines().next().unwrap_or_default();
                    println!("  FAILED   {name} ({:.1}s): {first}", d.as_secs_f64());
                }
                Outcome::Skipped(why) => println!("  skipped  {name}: {why}"),
            }
        }
        println!(
            "{}",
            if ok {
                "all steps passed"
            } else {
                "SOME STEPS FAILED"
            }
        );
        ok
    }
}

pub fn run(opts: &Options) -> Result<()> {
    if !util::is_root() {
        bail!(
            "`cargo xtask test` must run as root (the end-to-end tests create namespaces and load eBPF programs)"
        );
    }
    let mut s = Summary(Vec::new());

    let mut tc = None;
    let mut ok = s.step("install missing toolchain and test tools", || {
        tc = Some(toolchain::ensure()?);
        ensure_test_tools()
    });
    ok = ok
        && s.step("build-ebpf", || {
            build_ebpf::build(tc.as_ref().expect("set")).map(|_| ())
        });

    let mut md_user = None;
    ok = ok
        && s.step("cargo build -p md-user", || {
            md_user = Some(util::cargo_host_build_md_user()?);
            Ok(())
        });

    let Some(md_user) = md_user.filter(|_| ok) else {
        s.skip("unit tests", "an earlier step failed");
        s.skip("end-to-end tests", "an earlier step failed");
        s.print();
        bail!("cargo xtask test failed");
    };
    println!("MD_USER_BIN={}", md_user.display());

    s.step("unit tests (cargo test --workspace)", || {
        // `--workspace` ignores default-members. md-ebpf's only target has `test = false`
        // today, but exclude it explicitly: it can only be built for bpfel-unknown-none.
        util::run(host_cargo_with(&md_user).args([
            "test",
            "--workspace",
            "--exclude",
            "md-ebpf",
            "--no-fail-fast",
        ]))
    });

    if opts.no_e2e {
        s.skip("end-to-end tests", "--no-e2e");
    } else {
        s.step("end-to-end tests (MD_E2E=1 cargo test -p md-tests)", || {
            let mut c = host_cargo_with(&md_user);
            c.env("MD_E2E", "1").args([
                "test",
                "-p",
                "md-tests",
                "--no-fail-fast",
                "--",
                "--test-threads=2",
            ]);
            if let Some(f) = &opts.filter {
                c.arg(f);
            }
            util::run(&mut c)
        });
    }

    if s.print() {
        Ok(())
    } else {
        bail!("cargo xtask test failed")
    }
}

fn host_cargo_with(md_user: &Path) -> std::process::Command {
    let mut c = util::host_cargo();
    c.env("MD_USER_BIN", md_user);
    // The install test runs `cargo xtask install` itself: this very binary.
    if let Ok(me) = std::env::current_exe() {
        c.env("MD_XTASK_BIN", me);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_missing_means_nothing_to_install() {
        assert!(missing_packages(|_| true).is_empty());
    }

    #[test]
    fn packages_are_deduplicated() {
        let all = missing_packages(|_| false);
        assert_eq!(
            all,
            [
                "iproute2",
                "iputils-ping",
                "curl",
                "python3",
                "strace",
                "bpftool",
                "iperf3",
                "procps",
                "util-linux",
                "dnsutils",
                "dnsmasq-base",
                "tcpdump",
                "prometheus",
                "podman",
                "conmon",
                "runc",
                "containerd",
                "busybox-static",
                "containernetworking-plugins"
            ]
        );
        assert_eq!(missing_packages(|c| c != "ping"), ["iputils-ping"]);
        assert_eq!(missing_packages(|c| c != "unshare"), ["util-linux"]);
    }
}
