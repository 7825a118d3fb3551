//! Helpers shared by the end-to-end test files: fixture paths, detached runs, the one-way UDP
//! logger and its scripts, `stats --json` readers, common waits and assertions.

use crate::{fixture, Lab};

/// Absolute path of a file under `tests/fixtures/`, as a string for command lines.
#[track_caller]
pub fn fx(name: &str) -> String {
    fixture(name)
        .to_str()
        .expect("utf-8 fixture path")
        .to_string()
}

/// The arguments of `md-user run -d --name NAME OPTS... -- CMD...`.
pub fn run_args<'a>(name: &'a str, opts: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", "-d", "--name", name];
    a.extend_from_slice(opts);
    a.push("--");
    a.extend_from_slice(cmd);
    a
}

/// `md-user run -d --name NAME OPTS... -- CMD...`, asserting success; returns its stdout.
#[track_caller]
pub fn run_d(lab: &Lab, name: &str, opts: &[&str], cmd: &[&str]) -> String {
    lab.md_ok(&run_args(name, opts, cmd))
}
