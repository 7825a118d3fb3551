//! The bench's outputs: the markdown table (stdout and table.md), JSON lines, the machine
//! description and a hand-written SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::datapaths::{Env, NetavarkMode, ALL};
use super::stats::{higher_is_better, Results, Summary};
use super::Plan;
use crate::util;

const DOCKER: &str = "docker-iptables";
const PLAIN: &str = "plain";
const MD: &str = "md";
/// What md is compared with as "the best peer": the other container datapaths.
const PEERS: &[&str] = &[DOCKER, "podman-netavark", "cni-reference", "docker-daemon"];

fn cmd_line(program: &str, args: &[&str]) -> String {
    util::output_of(util::command(program).args(args))
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// The md revision being built: `git describe`, and how many of md's files were uncommitted
/// (others may be editing the tree while the bench runs). Taken at build time.
pub fn md_revision() -> String {
    let git = |args: &[&str]| {
        util::output_of(
            util::command("git")
                .current_dir(util::workspace_root())
                .args(args),
        )
    };
    let rev = git(&["describe", "--always"])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = git(&[
        "status",
        "--porcelain",
        "--",
        "md-user",
        "md-ebpf",
        "md-common",
    ])
    .map(|s| s.lines().count())
    .unwrap_or(0);
    if dirty > 0 {
        format!("{rev} with {dirty} uncommitted file(s) in md-user/md-ebpf/md-common")
    } else {
        rev
    }
}

/// What ran where: CPU, memory, kernel, tool versions, the plan.
pub fn machine(env: &Env, plan: &Plan) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown")
        .to_string();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: f64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb / 1024.0 / 1024.0)
        })
        .unwrap_or(0.0);
    let netavark = match &env.netavark {
        NetavarkMode::Binary(p) => cmd_line(&p.to_string_lossy(), &["--version"]),
        NetavarkMode::Rules => "not run (its nftables ruleset loaded with nft)".into(),
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "- CPU: {model}, {cpus} vCPUs (shared, noisy VM); memory {mem_gib:.0} GiB"
    );
    let _ = writeln!(
        s,
        "- kernel {}; Debian {}",
        cmd_line("uname", &["-r"]),
        std::fs::read_to_string("/etc/debian_version")
            .unwrap_or_default()
            .trim()
    );
    let _ = writeln!(
        s,
        "- {}; {}; {}; netavark: {netavark}",
        cmd_line("iptables", &["--version"]),
        cmd_line("nft", &["--version"]),
        cmd_line("iperf3", &["--version"])
    );
    let _ = writeln!(
        s,
        "- md at {}; md-user and the load generator built --release",
        env.md_rev
    );
    let _ = writeln!(
        s,
        "- {} run: {} repetitions; iperf3 -t {}; rr {} s; new connections {} s; scaling runs {} s each",
        if plan.quick { "quick" } else { "full" },
        plan.reps,
        plan.iperf_secs,
        plan.rr_secs,
        plan.crr_secs,
        plan.scale_secs
    );
    s
}

fn fmt_val(v: f64) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let n = v.round() as i64;
        let digits = n.abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 {
            format!("-{out}")
        } else {
            out
        }
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(s: Option<&Summary>) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.n == 1 => fmt_val(s.median),
        Some(s) => format!(
            "{} ({}–{})",
            fmt_val(s.median),
            fmt_val(s.min),
            fmt_val(s.max)
        ),
    }
}

/// The datapaths' column order.
fn dps() -> Vec<&'static str> {
    ALL.iter().map(|d| d.name()).collect()
}

/// Rows as (scenario, metric, unit) in first-measured order.
fn rows(sum: &[Summary]) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = Vec::new();
    for s in sum {
        let k = (s.scenario.clone(), s.metric.clone(), s.unit.clone());
        if !v.contains(&k) {
            v.push(k);
        }
    }
    v
}

fn find<'a>(sum: &'a [Summary], dp: &str, sc: &str, m: &str) -> Option<&'a Summary> {
    sum.iter()
        .find(|s| s.datapath == dp && s.scenario == sc && s.metric == m)
}

fn ratio(a: Option<&Summary>, b: Option<&Summary>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.median != 0.0 => format!("{:.2}", a.median / b.median),
        _ => "—".into(),
    }
}

/// The markdown table: median (min–max) per datapath, and md's ratios of medians.
pub fn table(r: &Results) -> String {
    let sum = r.summaries();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | metric | {} | md/best peer | md/iptables | md/plain | docker-md/docker-daemon |",
        dps().join(" | ")
    );
    let _ = writeln!(s, "|---|---|{}---|---|---|---|", "---|".repeat(dps().len()));
    for (sc, m, unit) in rows(&sum) {
        let better = match unit.as_str() {
            "Gbit/s" | "req/s" | "conn/s" => " ↑",
            "µs" | "ms" | "s" => " ↓",
            _ => "",
        };
        let mut line = format!("| {sc} | {m} ({unit}){better} |");
        for dp in dps() {
            let _ = write!(line, " {} |", cell(find(&sum, dp, &sc, &m)));
        }
        let md = find(&sum, MD, &sc, &m);
        // Scaling scenarios compare with plain routing's base value (plain has no ports/rules).
        let plain = find(&sum, PLAIN, &sc, &m).or_else(|| {
            (sc != "control plane" && !sc.starts_with("md BPF"))
                .then(|| find(&sum, PLAIN, "base", &m))
                .flatten()
        });
        // The best of the peers md replaces, in the metric's own direction.
        let lower_better = matches!(unit.as_str(), "µs" | "ms" | "s");
        let best_peer = PEERS
            .iter()
            .filter_map(|p| find(&sum, p, &sc, &m))
            .min_by(|a, b| {
                let o = a.median.total_cmp(&b.median);
                if lower_better {
                    o
                } else {
                    o.reverse()
                }
            });
        // Docker with md against Docker's own bridge driver and iptables (issue 16).
        let _ = write!(
            line,
            " {} | {} | {} | {} |",
            ratio(md, best_peer),
            ratio(md, find(&sum, DOCKER, &sc, &m)),
            ratio(md, plain),
            ratio(
                find(&sum, "docker-md", &sc, &m),
                find(&sum, "docker-daemon", &sc, &m)
            )
        );
        s += &line;
        s.push('\n');
    }
    s
}

pub fn write_all(dir: &Path, r: &Results, machine: &str, plan: &Plan, print: bool) -> Result<()> {
    let w = |name: &str, body: String| {
        let p = dir.join(name);
        std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))
    };
    let samples: String = r.samples.iter().map(|s| s.json_line() + "\n").collect();
    w("results.jsonl", samples)?;
    let sum = r.summaries();
    w(
        "summary.jsonl",
        sum.iter().map(|s| s.json_line() + "\n").collect(),
    )?;
    w("machine.txt", machine.to_string())?;
    let table = table(r);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### md datapath benchmark ({})\n\n{machine}\nCells: median (min–max) over the repetitions; \
         ↑ higher is better, ↓ lower is better; ratios are of medians (scaling rows compare with \
         plain routing's base value).\n\n{table}",
        if plan.quick { "cargo xtask bench --quick" } else { "cargo xtask bench" }
    );
    if !r.notes.is_empty() {
        md += "\nNotes:\n";
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    w("table.md", md.clone())?;
    w("chart.svg", chart(&sum))?;
    if print {
        println!("\n{md}");
    }
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn color(dp: &str) -> &'static str {
    match dp {
        PLAIN => "#8c8c8c",
        DOCKER => "#1d63ed",
        "podman-netavark" => "#892ca0",
        "cni-reference" => "#2f9e44",
        "docker-daemon" => "#0b7285",
        "docker-md" => "#c2255c",
        "md-stack" => "#f59f00",
        _ => "#e8590c",
    }
}

/// Horizontal grouped bars, one group per (scenario, metric), each datapath's median relative
/// to plain routing's base value (100%), inverted for latencies so that longer is always
/// better; whiskers show min–max.
pub fn chart(sum: &[Summary]) -> String {
    struct Bar<'a> {
        dp: &'a str,
        rel: f64,
        lo: f64,
        hi: f64,
        label: String,
    }
    // (scenario, label, bars)
    let mut groups: Vec<(String, String, Vec<Bar>)> = Vec::new();
    for (sc, m, unit) in rows(sum) {
        if !matches!(unit.as_str(), "Gbit/s" | "req/s" | "conn/s" | "µs") {
            continue;
        }
        // Relative to plain routing in the same scenario (IPv6), else at the base.
        let plain = find(sum, PLAIN, &sc, &m).or_else(|| find(sum, PLAIN, "base", &m));
        let Some(base) = plain.map(|s| s.median) else {
            continue;
        };
        let up = higher_is_better(&unit);
        let rel = |v: f64| {
            if up {
                v / base * 100.0
            } else {
                base / v * 100.0
            }
        };
        let mut bars = Vec::new();
        for dp in dps() {
            if let Some(s) = find(sum, dp, &sc, &m) {
                let (a, b) = (rel(s.min), rel(s.max));
                bars.push(Bar {
                    dp,
                    rel: rel(s.median),
                    lo: a.min(b),
                    hi: a.max(b),
                    label: format!("{} {unit}", fmt_val(s.median)),
                });
            }
        }
        if !bars.is_empty() {
            let arrow = if up { "↑" } else { "↓" };
            groups.push((sc.clone(), format!("{m} ({unit} {arrow})"), bars));
        }
    }
    let (left, width, bar_h, gap, header) = (300.0, 900.0, 13.0, 14.0, 24.0);
    let plot_w = width - left - 150.0;
    let max_rel = groups
        .iter()
        .flat_map(|(_, _, b)| b.iter().map(|b| b.hi))
        .fold(120.0_f64, f64::max)
        .min(400.0);
    let x = |rel: f64| left + rel.clamp(0.0, max_rel) / max_rel * plot_w;
    let height: f64 = 70.0
        + groups
            .iter()
            .map(|(_, _, b)| b.len() as f64 * bar_h + gap)
            .sum::<f64>()
        + header
            * groups
                .iter()
                .map(|(sc, _, _)| sc)
                .collect::<std::collections::BTreeSet<_>>()
                .len() as f64
        + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">md vs Docker iptables vs netavark, relative to plain routing (100%; longer is better)</text>"#
    );
    let mut lx = 10.0;
    for dp in dps() {
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="32" width="12" height="12" fill="{}"/><text x="{}" y="42">{}</text>"#,
            color(dp),
            lx + 16.0,
            esc(dp)
        );
        lx += 150.0;
    }
    let top = 60.0;
    let _ = writeln!(
        s,
        r##"<line x1="{x100:.1}" y1="{top}" x2="{x100:.1}" y2="{:.0}" stroke="#444" stroke-dasharray="4,3"/><text x="{x100:.1}" y="{:.0}" text-anchor="middle">100%</text>"##,
        height - 25.0,
        height - 12.0,
        x100 = x(100.0)
    );
    let mut y = top;
    let mut last_sc = "";
    for (sc, label, bars) in &groups {
        if sc != last_sc {
            y += header;
            let title = if sc == "base" {
                "no extra ports or rules".to_string()
            } else if sc == "IPv6" {
                "over IPv6, no extra ports or rules".to_string()
            } else {
                format!("with {sc}")
            };
            let _ = writeln!(
                s,
                r##"<text x="10" y="{:.1}" font-size="12" font-weight="bold">{}</text><line x1="10" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ccc"/>"##,
                y - 8.0,
                esc(&title),
                width - 10.0,
                y - 4.0,
                y - 4.0
            );
            last_sc = sc;
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + bars.len() as f64 * bar_h / 2.0 + 4.0,
            esc(label)
        );
        for b in bars {
            let w = x(b.rel) - left;
            let _ = writeln!(
                s,
                r##"<rect x="{left}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{}"><title>{}: {:.0}% ({})</title></rect><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#222"/><text x="{:.1}" y="{:.1}" font-size="9">{:.0}% · {}</text>"##,
                bar_h - 2.0,
                color(b.dp),
                esc(b.dp),
                b.rel,
                esc(&b.label),
                x(b.lo),
                x(b.hi),
                y + (bar_h - 2.0) / 2.0,
                y + (bar_h - 2.0) / 2.0,
                x(b.hi.max(b.rel)) + 4.0,
                y + bar_h - 4.0,
                b.rel,
                esc(&b.label)
            );
            y += bar_h;
        }
        y += gap;
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Results {
        let mut r = Results::default();
        for (dp, v) in [("plain", 10.0), ("docker-iptables", 20.0), ("md", 15.0)] {
            for rep in 0..3 {
                r.add(dp, "base", "rr p50", v + rep as f64, "µs", rep);
            }
        }
        r.add("md", "1000 ports", "rr p50", 16.0, "µs", 0);
        r.add("docker-iptables", "1000 ports", "rr p50", 32.0, "µs", 0);
        r.add("docker-daemon", "1000 ports", "rr p50", 40.0, "µs", 0);
        r.add("docker-md", "1000 ports", "rr p50", 10.0, "µs", 0);
        r
    }

    #[test]
    fn table_has_medians_spreads_and_ratios() {
        let t = table(&results());
        let base = t.lines().find(|l| l.starts_with("| base")).unwrap();
        assert!(base.contains("11.0 (10.0–12.0)"), "{base}");
        assert!(base.contains("| — |"), "netavark missing: {base}");
        assert!(base.ends_with("| 0.76 | 1.45 | — |"), "{base}");
        let scaled = t.lines().find(|l| l.starts_with("| 1000 ports")).unwrap();
        // md/plain against plain's base value; Docker on md against Docker's own.
        assert!(scaled.ends_with("| 0.50 | 1.45 | 0.25 |"), "{scaled}");
    }

    #[test]
    fn chart_is_one_svg_with_a_bar_per_value() {
        let svg = chart(&results().summaries());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<title>").count(), 7);
        // Latency is inverted: plain 11 µs vs docker 21 µs → docker at 52%.
        assert!(svg.contains("docker-iptables: 52%"), "{svg}");
    }

    #[test]
    fn numbers_are_readable() {
        assert_eq!(fmt_val(12345.4), "12,345");
        assert_eq!(fmt_val(123.4), "123");
        assert_eq!(fmt_val(12.34), "12.3");
        assert_eq!(fmt_val(1.234), "1.23");
        assert_eq!(fmt_val(f64::NAN), "—");
    }
}
