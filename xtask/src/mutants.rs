//! `cargo xtask mutants`: the mutation score of md-user's pure logic (cargo-mutants).
//!
//! cargo-mutants rewrites one function at a time (returns a default, flips a comparison,
//! deletes a `!`, ...) and runs md-user's unit tests against each mutant; a mutant the tests
//! still pass is "missed". The score is caught / (caught + missed): unviable mutants (that do
//! not compile) are not counted, timeouts count as caught. Not part of `cargo xtask test`: it
//! builds and tests every mutant, one at a time (`--jobs 1` by default: the machine is shared).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::util;

/// The files measured, and the score they must reach (percent of viable mutants caught).
pub const FILES: &[&str] = &[
    "md-user/src/portmap.rs",
    "md-user/src/ipam.rs",
    "md-user/src/policy.rs",
    "md-user/src/state.rs",
    "md-user/src/dns.rs",
];
pub const MIN_SCORE: f64 = 90.0;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Measure only these files (default: the five above).
    #[arg(long = "file", value_name = "PATH")]
    pub files: Vec<String>,
    /// Mutants built and tested at once.
    #[arg(long, default_value_t = 1)]
    pub jobs: u32,
    /// Only list the mutants, run nothing.
    #[arg(long)]
    pub list: bool,
    /// Read the score of the last run (target/mutants/mutants.out) without running again.
    #[arg(long)]
    pub report_only: bool,
}

/// `cargo-mutants` on PATH, installed from crates.io when missing.
pub fn ensure_cargo_mutants() -> Result<()> {
    if util::which("cargo-mutants").is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-mutants from crates.io (once, a few minutes)");
    util::run(util::host_cargo().args(["install", "cargo-mutants", "--locked"]))?;
    if util::which("cargo-mutants").is_none() {
        bail!("cargo install cargo-mutants succeeded but cargo-mutants is not on PATH");
    }
    Ok(())
}

fn out_dir() -> PathBuf {
    util::host_target_dir().join("mutants")
}

pub fn run(opts: &Options) -> Result<()> {
    ensure_cargo_mutants()?;
    let files: Vec<&str> = if opts.files.is_empty() {
        FILES.to_vec()
    } else {
        opts.files.iter().map(String::as_str).collect()
    };
    if !opts.report_only {
        let mut c = util::host_cargo();
        c.args(["mutants", "--package", "md-user", "--no-shuffle"])
            .arg("--jobs")
            .arg(opts.jobs.to_string())
            .arg("--output")
            .arg(out_dir());
        for f in &files {
            c.args(["--file", f]);
        }
        if opts.list {
            c.arg("--list");
            return util::run(&mut c);
        }
        // cargo-mutants exits 2 when some mutant was missed: the score decides here.
        let shown = util::show(&c);
        eprintln!("+ {shown}");
        let status = c
            .status()
            .with_context(|| format!("cannot start `{shown}`"))?;
        if !matches!(status.code(), Some(0) | Some(2) | Some(3)) {
            bail!("`{shown}` failed ({status})");
        }
    }
    let outcomes = out_dir().join("mutants.out/outcomes.json");
    let json = std::fs::read_to_string(&outcomes)
        .with_context(|| format!("reading {}", outcomes.display()))?;
    let score = Score::from_outcomes(&json)?;
    print!("{}", score.table());
    let missed = out_dir().join("mutants.out/missed.txt");
    if score.missed > 0 {
        println!("missed mutants: {}", missed.display());
    }
    if score.percent() < MIN_SCORE {
        bail!(
            "mutation score {:.1} % is below {MIN_SCORE} % of viable mutants",
            score.percent()
        );
    }
    Ok(())
}

/// Mutants by outcome, overall and per file.
#[derive(Debug, Default, PartialEq)]
pub struct Score {
    pub caught: u32,
    pub missed: u32,
    pub timeout: u32,
    pub unviable: u32,
    pub per_file: Vec<(String, u32, u32)>,
}

impl Score {
    /// Caught (timeouts included) out of viable mutants, in percent (100 when none is viable).
    pub fn percent(&self) -> f64 {
        let viable = self.caught + self.timeout + self.missed;
        if viable == 0 {
            return 100.0;
        }
        f64::from(self.caught + self.timeout) * 100.0 / f64::from(viable)
    }

    /// Counts cargo-mutants' `outcomes.json`: one outcome per mutant, whose `summary` is
    /// CaughtMutant, MissedMutant, Timeout or Unviable (the baseline run is skipped).
    pub fn from_outcomes(json: &str) -> Result<Score> {
        let v: serde_json::Value = serde_json::from_str(json).context("parsing outcomes.json")?;
        let list = v["outcomes"]
            .as_array()
            .context("outcomes.json has no outcomes list")?;
        let mut s = Score::default();
        for o in list {
            let Some(mutant) = o["scenario"].get("Mutant") else {
                continue; // the baseline
            };
            let file = mutant["file"].as_str().unwrap_or("?").to_string();
            let caught = match o["summary"].as_str().unwrap_or("") {
                "CaughtMutant" => {
                    s.caught += 1;
                    true
                }
                "MissedMutant" => {
                    s.missed += 1;
                    false
                }
                "Timeout" => {
                    s.timeout += 1;
                    true
                }
                "Unviable" => {
                    s.unviable += 1;
                    continue;
                }
                other => bail!("unknown mutant outcome {other:?}"),
            };
            match s.per_file.iter_mut().find(|(f, _, _)| *f == file) {
                Some(row) => {
                    row.1 += u32::from(caught);
                    row.2 += 1;
                }
                None => s.per_file.push((file, u32::from(caught), 1)),
            }
        }
        s.per_file.sort();
        Ok(s)
    }

    /// A Markdown table (as in the README): file, caught / viable, percent.
    pub fn table(&self) -> String {
        let mut t = String::from("| file | caught / viable | score |\n|---|---|---|\n");
        for (f, caught, viable) in &self.per_file {
            let name = Path::new(f)
                .file_name()
                .map_or(f.clone(), |n| n.to_string_lossy().into_owned());
            t += &format!(
                "| {name} | {caught} / {viable} | {:.1} % |\n",
                f64::from(*caught) * 100.0 / f64::from((*viable).max(1))
            );
        }
        t += &format!(
            "| **all** | {} / {} | **{:.1} %** |\n",
            self.caught + self.timeout,
            self.caught + self.timeout + self.missed,
            self.percent()
        );
        t += &format!(
            "({} caught, {} timed out, {} missed; {} unviable not counted)\n",
            self.caught, self.timeout, self.missed, self.unviable
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(file: &str, summary: &str) -> String {
        format!(
            r#"{{"scenario":{{"Mutant":{{"file":"{file}","function":null}}}},"summary":"{summary}"}}"#
        )
    }

    #[test]
    fn score_counts_viable_mutants_only() {
        let json = format!(
            r#"{{"outcomes":[{{"scenario":"Baseline","summary":"Success"}},{},{},{},{},{}]}}"#,
            outcome("md-user/src/ipam.rs", "CaughtMutant"),
            outcome("md-user/src/ipam.rs", "MissedMutant"),
            outcome("md-user/src/dns.rs", "Timeout"),
            outcome("md-user/src/dns.rs", "Unviable"),
            outcome("md-user/src/dns.rs", "CaughtMutant"),
        );
        let s = Score::from_outcomes(&json).unwrap();
        assert_eq!((s.caught, s.missed, s.timeout, s.unviable), (2, 1, 1, 1));
        assert_eq!(
            s.per_file,
            [
                ("md-user/src/dns.rs".to_string(), 2, 2),
                ("md-user/src/ipam.rs".to_string(), 1, 2)
            ]
        );
        assert!((s.percent() - 75.0).abs() < 1e-9);
        let t = s.table();
        assert!(t.contains("| ipam.rs | 1 / 2 | 50.0 % |"), "{t}");
        assert!(t.contains("| **all** | 3 / 4 | **75.0 %** |"), "{t}");
    }

    #[test]
    fn unknown_outcomes_are_errors() {
        let json = format!(r#"{{"outcomes":[{}]}}"#, outcome("a.rs", "Exploded"));
        assert!(Score::from_outcomes(&json).is_err());
        assert!(Score::from_outcomes("{}").is_err());
        assert_eq!(Score::default().percent(), 100.0);
    }
}
