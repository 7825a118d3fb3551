//! Helpers shared by the end-to-end test files: fixture paths, detached runs, the one-way UDP
//! logger and its scripts, `stats --json` readers, common waits and assertions.

use crate::fixture;

/// Absolute path of a file under `tests/fixtures/`, as a string for command lines.
#[track_caller]
pub fn fx(name: &str) -> String {
    fixture(name)
        .to_str()
        .expect("utf-8 fixture path")
        .to_string()
}
