//! `cargo xtask datapath-mutants`: hand-made mutants of md-ebpf, each a bug the datapath's
//! tests must catch. Every mutant is one exact text substitution applied to a copy of the
//! workspace under `target/dp-mutants/src` (never to md-ebpf itself, never shipped); its object
//! is built there and the BPF tests (tests/datapath_unit.rs and the model-based
//! tests/datapath_model.rs) run against it through `MD_EBPF_OBJ`. A mutant is killed when a test
//! that passes on the unmutated object fails on it; the command fails when one survives (or no
//! longer applies: a mutant whose text is gone must be updated, not skipped).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{build_ebpf, toolchain, util};

pub struct Mutant {
    pub name: &'static str,
    pub what: &'static str,
    /// File under md-ebpf/src.
    pub file: &'static str,
    /// Text that must occur exactly once in the file, and what it becomes.
    pub find: &'static str,
    pub replace: &'static str,
}

pub const MUTANTS: &[Mutant] = &[
    Mutant {
        name: "l4-csum-skipped",
        what: "an address rewrite skips the TCP/UDP checksum update",
        file: "csum.rs",
        find: "                ctx.l4_csum_replace(off, f, t, flags | BPF_F_PSEUDO_HDR | 4)?;",
        replace: "                let _ = (off, flags);",
    },
    Mutant {
        name: "ip-csum-skipped",
        what: "an address rewrite skips the IPv4 header checksum update",
        file: "csum.rs",
        find: "        ctx.l3_csum_replace(p.l3_off + IP_CSUM, from.word(0), to.word(0), 4)?;",
        replace: "",
    },
    Mutant {
        name: "quoted-ip-csum-skipped",
        what: "an ICMP error's quoted IPv4 header is rewritten without its checksum",
        file: "csum.rs",
        find: "        ctx.l3_csum_replace(inner_l3 + IP_CSUM, from.word(0), to.word(0), 4)?;",
        replace: "",
    },
    Mutant {
        name: "udp-zero-csum-not-kept",
        what: "UDP rewrites without BPF_F_MARK_MANGLED_0 (a zero checksum gets 'updated')",
        file: "csum.rs",
        find: "IPPROTO_UDP => Some((p.l4_off + UDP_CSUM, BPF_F_MARK_MANGLED_0)),",
        replace: "IPPROTO_UDP => Some((p.l4_off + UDP_CSUM, 0)),",
    },
    Mutant {
        name: "veth-source-check-skipped",
        what: "a container's packet is not checked against its veth and MAC (spoofing)",
        file: "veth.rs",
        find: "        Some(ep) if ep.ifindex == ifindex && Some(ep.mac) == parse::eth_src(ctx) => Some(ep),",
        replace: "        Some(ep) => Some(ep),",
    },
    Mutant {
        name: "uplink-source-check-skipped",
        what: "the uplink accepts sources inside md's subnets",
        file: "uplink.rs",
        find: "    if nat::in_md_subnet(&p.saddr) {\n        return Verdict::Drop(DROP_SPOOF);\n    }\n",
        replace: "",
    },
    Mutant {
        name: "policy-always-allows",
        what: "the policy lookup allows every pair",
        file: "policy.rs",
        find: "    if src == dst || src == 0 || dst == 0 {",
        replace: "    if src == dst || src == 0 || dst == 0 || cfg.policy_default != 0 {",
    },
    Mutant {
        name: "tracker-insert-any",
        what: "a new flow's reply half goes in with BPF_ANY instead of BPF_NOEXIST (steals a live flow's mapping)",
        file: "ct.rs",
        find: "    if A::ct_insert(false, &f.reply, &f.reply_e, BPF_NOEXIST as u64).is_err() {",
        replace: "    if A::ct_insert(false, &f.reply, &f.reply_e, BPF_ANY as u64).is_err() {",
    },
    Mutant {
        name: "answered-clash-ignored",
        what: "a new flow's reply tuple is not checked against answered flows",
        file: "ct.rs",
        find: "    if let Some(e) = A::ct_get(true, &f.reply) {\n        if live(e, now) {\n            return -17;\n        }\n    }\n",
        replace: "",
    },
    Mutant {
        name: "rst-any-window",
        what: "a RST closes a flow whatever its sequence number (blind RST)",
        file: "ct.rs",
        find: "    let Some(o) = other else {\n        return true;\n    };",
        replace: "    let Some(o) = other else {\n        return true;\n    };\n    if o as usize != 0 {\n        return true;\n    }",
    },
    Mutant {
        name: "reply-half-not-restored",
        what: "an evicted reply half is not put back when the flow's other half is next refreshed",
        file: "ct.rs",
        find: "        None if entry.dir == CT_DIR_ORIGINAL => {",
        replace: "        None if entry.dir == CT_DIR_ORIGINAL && entry.packets == 0 => {",
    },
    Mutant {
        name: "partner-unchecked",
        what: "the entry under a flow's partner tuple is taken as its other half without leading back (F5)",
        file: "ct.rs",
        find: "    (unsafe { (*o).reply_tuple(key.proto) } == *key).then_some(o)",
        replace: "    Some(o)",
    },
    Mutant {
        name: "refresh-from-own-expiry",
        what: "a packet refreshes the other half only when its own lifetime jumps a second (a one-way flow's reply half dies)",
        file: "ct.rs",
        find: "        || expires > entry.partner_expires_ns.saturating_add(REFRESH_NS);",
        replace: "        || expires > entry.expires_ns.saturating_add(REFRESH_NS);",
    },
    Mutant {
        name: "never-promoted",
        what: "answered flows stay in CONNTRACK_NEW (a SYN flood can evict them)",
        file: "ct.rs",
        find: "    let promoting = !f.answered && answered_by(p.proto, state, entry.dir);",
        replace: "    let promoting = !f.answered && answered_by(p.proto, state, entry.dir) && p.len == 0;",
    },
    Mutant {
        name: "dnat-any-destination",
        what: "a published port is translated for any destination address, not only the host's",
        file: "uplink.rs",
        find: "            if nat::is_host_addr(&p.daddr) && nat::opens_flow(p) {",
        replace: "            if nat::opens_flow(p) {",
    },
    Mutant {
        name: "unsolicited-passes",
        what: "packets from the uplink straight to md addresses pass",
        file: "uplink.rs",
        find: "    if nat::in_md_subnet(&p.daddr) {\n        return Verdict::Drop(DROP_UNSOLICITED);\n    }\n",
        replace: "",
    },
];

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only the mutants whose name contains STR.
    #[arg(long, value_name = "STR")]
    pub only: Option<String>,
    /// Property-test cases per mutant (MD_PROPTEST_CASES).
    #[arg(long, default_value_t = 1000)]
    pub cases: u32,
}

/// Applies `m` to `text`: the text must occur exactly once.
pub fn apply(m: &Mutant, text: &str) -> Result<String> {
    match text.matches(m.find).count() {
        1 => Ok(text.replacen(m.find, m.replace, 1)),
        n => bail!(
            "mutant {} expects its text once in md-ebpf/src/{}, found {n} times: update the mutant",
            m.name,
            m.file
        ),
    }
}

/// Test outcomes by "binary::test", from libtest's output.
pub fn parse_results(out: &str) -> BTreeMap<String, bool> {
    let mut bin = String::new();
    let mut r = BTreeMap::new();
    for line in out.lines() {
        if let Some(rest) = line.trim().strip_prefix("Running ") {
            bin = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .trim_start_matches("tests/")
                .trim_end_matches(".rs")
                .to_string();
        } else if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, outcome)) = rest.rsplit_once(" ... ") {
                match outcome.trim() {
                    "ok" => r.insert(format!("{bin}::{name}"), true),
                    "FAILED" => r.insert(format!("{bin}::{name}"), false),
                    _ => None,
                };
            }
        }
    }
    r
}

/// Copies the workspace's sources (not target/, not .git) to `dest`.
fn copy_workspace(root: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    std::fs::create_dir_all(dest)?;
    for entry in std::fs::read_dir(root)? {
        let name = entry?.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        util::run(Command::new("cp").arg("-a").arg(root.join(&name)).arg(dest))?;
    }
    Ok(())
}

/// Gives md-ebpf's sources a new mtime: the copy keeps the workspace's (`cp -a`), older than
/// the objects a previous run left in the shared target dir, and cargo would reuse the last
/// mutant's object as fresh.
fn touch_sources(dir: &Path) -> Result<()> {
    let now = std::time::SystemTime::now();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_modified(now))
            .with_context(|| format!("touching {}", p.display()))?;
    }
    Ok(())
}

/// Runs the BPF tests against `obj`; returns the outcomes and whether the object failed to
/// load (a verifier rejection is no kill: the mutant must be fixed).
fn run_tests(obj: &Path, cases: u32, log: &Path) -> Result<(BTreeMap<String, bool>, bool)> {
    let mut c = util::host_cargo();
    c.env("MD_E2E", "1")
        .env("MD_USER_BIN", "/bin/true")
        .env("MD_EBPF_OBJ", obj)
        .env("MD_PROPTEST_CASES", cases.to_string())
        .env("MD_PROPTEST_NO_SHRINK", "1")
        .args([
            "test",
            "-p",
            "md-tests",
            "--test",
            "datapath_unit",
            "--test",
            "datapath_model",
            "--no-fail-fast",
            "--",
            "--test-threads=1",
        ]);
    eprintln!("+ {}", util::show(&c));
    // One file for both streams: cargo's "Running <binary>" lines (stderr) must stay in order
    // with libtest's results (stdout).
    let file = std::fs::File::create(log)?;
    c.stdout(file.try_clone()?).stderr(file);
    c.status().context("running the BPF tests")?;
    let text = std::fs::read_to_string(log)?;
    let unloadable = text.contains("loading md's eBPF object") || text.contains("VerifierError");
    Ok((parse_results(&text), unloadable))
}

pub fn run(opts: &Options) -> Result<()> {
    if !util::is_root() {
        bail!("`cargo xtask datapath-mutants` must run as root (BPF_PROG_TEST_RUN)");
    }
    let tc = toolchain::ensure()?;
    let root = util::workspace_root();
    let work = util::host_target_dir().join("dp-mutants");
    let src = work.join("src");
    let bpf = work.join("bpf");
    copy_workspace(&root, &src)?;
    let ebpf_src = root.join("md-ebpf/src");

    eprintln!("==> baseline (unmutated md-ebpf)");
    touch_sources(&src.join("md-ebpf/src"))?;
    let obj = build_ebpf::build_object(&tc, &src, &bpf)?;
    let baseline_obj = obj.clone();
    let base_obj = work.join("baseline.o");
    std::fs::write(&base_obj, obj)?;
    let (base, unloadable) = run_tests(&base_obj, opts.cases, &work.join("baseline.log"))?;
    if unloadable || base.is_empty() {
        bail!(
            "the unmutated object does not load or no test ran: see {}",
            work.join("baseline.log").display()
        );
    }
    let passing: Vec<&String> = base.iter().filter(|(_, ok)| **ok).map(|(n, _)| n).collect();
    println!(
        "baseline: {} of {} BPF tests pass (only those count as killers)",
        passing.len(),
        base.len()
    );

    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for m in MUTANTS.iter().filter(|m| {
        opts.only
            .as_ref()
            .is_none_or(|o| m.name.contains(o.as_str()))
    }) {
        eprintln!("\n==> mutant {}: {}", m.name, m.what);
        let started = Instant::now();
        // Every mutant starts from the pristine sources.
        let file = src.join("md-ebpf/src").join(m.file);
        let pristine = std::fs::read_to_string(ebpf_src.join(m.file))?;
        std::fs::write(&file, apply(m, &pristine)?)?;
        touch_sources(&src.join("md-ebpf/src"))?;
        let built = build_ebpf::build_object(&tc, &src, &bpf);
        std::fs::write(&file, &pristine)?;
        let obj = match built {
            Ok(o) => o,
            Err(e) => {
                bad.push(format!("{}: does not build ({e:#})", m.name));
                continue;
            }
        };
        if obj == baseline_obj {
            bad.push(format!("{}: built the same object as the baseline", m.name));
            continue;
        }
        let path: PathBuf = work.join(format!("{}.o", m.name));
        std::fs::write(&path, obj)?;
        let (got, unloadable) =
            run_tests(&path, opts.cases, &work.join(format!("{}.log", m.name)))?;
        let killers: Vec<String> = passing
            .iter()
            .filter(|n| got.get(**n) != Some(&true))
            .map(|n| n.to_string())
            .collect();
        if unloadable {
            bad.push(format!("{}: rejected by the verifier", m.name));
        } else if killers.is_empty() {
            bad.push(format!("{}: SURVIVED every test", m.name));
        }
        println!(
            "mutant {}: {} ({:.0}s)",
            m.name,
            if killers.is_empty() {
                "survived".to_string()
            } else {
                format!("killed by {}", killers.join(", "))
            },
            started.elapsed().as_secs_f64()
        );
        rows.push((m, killers));
    }

    let mut report = String::from("| mutant | what it breaks | killed by |\n|---|---|---|\n");
    for (m, killers) in &rows {
        let shown: Vec<String> = killers.iter().take(4).map(|k| format!("`{k}`")).collect();
        let more = killers.len().saturating_sub(4);
        report += &format!(
            "| `{}` | {} | {}{} |\n",
            m.name,
            m.what,
            if shown.is_empty() {
                "**nothing**".to_string()
            } else {
                shown.join(", ")
            },
            if more > 0 {
                format!(" (+{more} more)")
            } else {
                String::new()
            }
        );
    }
    std::fs::write(work.join("report.md"), &report)?;
    println!("\n{report}\n(report: {})", work.join("report.md").display());
    if !bad.is_empty() {
        bail!("datapath mutants not killed:\n  {}", bad.join("\n  "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mutant_applies_once_to_the_current_sources() {
        let src = util::workspace_root().join("md-ebpf/src");
        for m in MUTANTS {
            let text = std::fs::read_to_string(src.join(m.file)).unwrap();
            let mutated = apply(m, &text).unwrap_or_else(|e| panic!("{e:#}"));
            assert_ne!(mutated, text, "{} changes nothing", m.name);
        }
        let names: std::collections::BTreeSet<_> = MUTANTS.iter().map(|m| m.name).collect();
        assert_eq!(names.len(), MUTANTS.len(), "mutant names are unique");
    }

    #[test]
    fn results_are_read_per_test_binary() {
        let out = "     Running tests/datapath_unit.rs (target/debug/deps/datapath_unit-1)\n\
                   test snat_tcp ... ok\ntest dnat ... FAILED\n\
                   Running tests/datapath_model.rs (target/debug/deps/datapath_model-2)\n\
                   test datapath_matches_model ... ok\n";
        let r = parse_results(out);
        assert_eq!(r.get("datapath_unit::snat_tcp"), Some(&true));
        assert_eq!(r.get("datapath_unit::dnat"), Some(&false));
        assert_eq!(r.get("datapath_model::datapath_matches_model"), Some(&true));
        assert_eq!(r.len(), 3);
    }
}
