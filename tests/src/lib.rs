//! Lab harness for md's end-to-end tests.
//!
//! Every test builds a [`Lab`]: a throwaway "host" network namespace (where md-user runs) with an
//! uplink veth to an "outside" namespace (192.0.2.0/24). Nothing touches the machine's real
//! interfaces or routing, and the lab's `Drop` removes everything it made, also when a test panics.
//!
//! End-to-end tests start with
//! ```no_run
//! if !md_tests::require_e2e() { return; }
//! ```
//! which skips them unless `MD_E2E=1`, and panics when `MD_E2E=1` but the run cannot work (not
//! root, `MD_USER_BIN` missing), so `cargo xtask test` cannot pass by skipping silently.

pub mod cni;
pub mod docker;
pub mod helpers;
mod lab;
pub mod model;
pub mod multihost;
pub mod pkt;
pub mod process;
pub mod runtimes;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

pub use lab::{
    is_md_veth, is_mountpoint, remove_pin_dir, Lab, Segment, GATEWAY, HOST_UPLINK_IP,
    HOST_UPLINK_IP6, MD_TIMEOUT, OUTSIDE_IP, OUTSIDE_IP6, UPLINK,
};
pub use process::Bg;

/// True when end-to-end tests should run. Prints a skip line and returns false unless `MD_E2E`
/// is set (to anything but "0" or ""). Panics if it is set but the tests cannot run: not root,
/// `MD_USER_BIN` unset or not an executable file, or a base tool (ip, nsenter) missing.
pub fn require_e2e() -> bool {
    match std::env::var("MD_E2E") {
        Ok(v) if !v.is_empty() && v != "0" => {}
        _ => {
            eprintln!("skipped: set MD_E2E=1 (needs root)");
            return false;
        }
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "MD_E2E is set but the tests are not running as root"
    );
    let bin = md_user_bin();
    assert!(
        is_executable(&bin),
        "MD_USER_BIN={} is not an executable file",
        bin.display()
    );
    require_tools(&["ip", "nsenter"]);
    true
}

/// The md-user binary under test (env `MD_USER_BIN`); panics if unset.
#[track_caller]
pub fn md_user_bin() -> PathBuf {
    match std::env::var_os("MD_USER_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!("MD_E2E is set but MD_USER_BIN is not: point it at the md-user binary"),
    }
}

/// Panics unless every tool is on PATH (a missing tool must fail the run, not skip it).
#[track_caller]
pub fn require_tools(tools: &[&str]) {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "e2e tests need these tools on PATH: {missing:?} (the test command must install them)"
    );
}

/// The first executable called `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Absolute path of a file under `tests/fixtures/`.
#[track_caller]
pub fn fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    assert!(p.exists(), "missing fixture {}", p.display());
    p
}

/// Polls `check` until it returns true; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    wait_for(what, timeout, || check().then_some(()))
}

/// Polls `check` until it returns `Some`; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Stdout of a command as a trimmed string.
pub fn stdout_str(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Stderr of a command as a trimmed string.
pub fn stderr_str(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md_veth_names() {
        assert!(is_md_veth("md3f9a2c1b"));
        assert!(is_md_veth("mdabcd"));
        assert!(!is_md_veth("md0"), "the bridge is not a veth");
        assert!(!is_md_veth("md"));
        assert!(!is_md_veth("mdzz1234"));
        assert!(!is_md_veth("up0"));
        assert!(!is_md_veth("eth0"));
    }

    #[test]
    fn wait_for_returns_value_and_times_out() {
        let mut n = 0;
        assert_eq!(
            wait_for("n reaches 3", Duration::from_secs(5), || {
                n += 1;
                (n >= 3).then_some(n)
            }),
            3
        );
        let r =
            std::panic::catch_unwind(|| wait_until("never", Duration::from_millis(50), || false));
        assert!(r.is_err());
    }

    #[test]
    fn run_timeout_kills_slow_commands() {
        let out = process::run_timeout(
            std::process::Command::new("sh").args(["-c", "echo hi; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(stdout_str(&out), "hi");
        assert_eq!(stderr_str(&out), "err");
        let t = Instant::now();
        let r = process::try_run_timeout(
            std::process::Command::new("sleep").arg("30"),
            Duration::from_millis(200),
        );
        assert!(r.is_err() && t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn run_timeout_flags_pipes_held_by_leftovers() {
        // The shell exits at once but leaves a child holding stdout: what a detached supervisor
        // that forgot to close the caller's stdio looks like.
        let pidfile = std::env::temp_dir().join(format!("md-tests-pipe-{}", std::process::id()));
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo $! > \"$0\"; echo started"])
            .arg(&pidfile);
        let r = process::try_run_timeout(&mut cmd, Duration::from_secs(20));
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is the sleep we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(&pidfile);
        let e = r.expect_err("a leftover holding the pipe must be reported");
        assert!(e.contains("stayed open"), "{e}");
    }
}
