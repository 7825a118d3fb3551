//! Running commands with a deadline, background processes that die with their guard, and the
//! `/proc` scans the lab uses to find whatever is left in its namespaces.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long the caller's stdout/stderr may stay open after the process it started has exited.
/// Anything longer means a leftover process (e.g. a detached supervisor) kept the pipes, which
/// would also hang `name=$(md-user run -d ...)` in a shell.
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// Renders a command line for messages.
pub fn show_cmd(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Renders an output for assertion messages.
pub fn show_output(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}--- stderr ---\n{}",
        show_status(out.status),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn show_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st}"),
    }
}

fn reader(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured) and waits at most `timeout`.
/// Panics when the deadline passes (after killing the process), when the program cannot be
/// started, or when the output pipes stay open long after the process exited.
#[track_caller]
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    try_run_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run_timeout`] without panicking (for cleanup code): the failure is the error string.
pub fn try_run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let what = show_cmd(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start `{what}`: {e}"))?;
    let out_rx = reader(child.stdout.take().expect("piped stdout"));
    let err_rx = reader(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err_rx.recv_timeout(PIPE_GRACE).unwrap_or_default();
                return Err(format!(
                    "`{what}` did not finish within {timeout:?}; killed it. stderr so far:\n{}",
                    String::from_utf8_lossy(&stderr)
                ));
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for `{what}`: {e}")),
        }
    };
    let grace_end = Instant::now() + PIPE_GRACE;
    let left = || grace_end.saturating_duration_since(Instant::now());
    let stdout = out_rx.recv_timeout(left());
    let stderr = err_rx.recv_timeout(left());
    match (stdout, stderr) {
        (Ok(stdout), Ok(stderr)) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        _ => Err(format!(
            "`{what}` exited ({}) but its stdout/stderr stayed open for {PIPE_GRACE:?}: \
             a process it left behind still holds the caller's pipes",
            show_status(status)
        )),
    }
}

/// A background process, killed (SIGKILL) and reaped when the guard is dropped.
/// Its stdout and stderr go to files, readable with [`Bg::stdout`] and [`Bg::stderr`].
#[must_use = "dropping a Bg kills the process at once"]
pub struct Bg {
    child: Child,
    what: String,
    status: Option<ExitStatus>,
    out: PathBuf,
    err: PathBuf,
}

impl Bg {
    /// Starts `cmd` with stdin from /dev/null and stdout/stderr to `<log_base>.out/.err`.
    pub fn spawn(cmd: &mut Command, log_base: &Path) -> Bg {
        let what = show_cmd(cmd);
        let out = log_base.with_extension("out");
        let err = log_base.with_extension("err");
        let mk =
            |p: &Path| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(mk(&out))
            .stderr(mk(&err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        Bg {
            child,
            what,
            status: None,
            out,
            err,
        }
    }

    /// The process id (stays valid until the guard is dropped: the process is not reaped before).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) unless the process has already been reaped.
    pub fn signal(&mut self, sig: i32) {
        if self.try_status().is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits at most `timeout` for the process to exit; panics (with its logs) otherwise.
    #[track_caller]
    pub fn wait_timeout(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                return st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "`{}` still running after {timeout:?}\n--- stdout ---\n{}--- stderr ---\n{}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits until the process printed a line equal to `line`; panics (with its logs) when it
    /// exits first or `timeout` passes.
    #[track_caller]
    pub fn wait_for_line(&mut self, line: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().lines().any(|l| l.trim() == line) {
                return;
            }
            let exited = self.try_status();
            if exited.is_some() || Instant::now() >= deadline {
                panic!(
                    "`{}` did not print {line:?} ({})\n--- stdout ---\n{}--- stderr ---\n{}",
                    self.what,
                    exited.map_or("timed out".to_string(), |s| format!("exited: {s}")),
                    self.stdout(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The inode of a namespace file (`/run/netns/X`, `/proc/PID/ns/net`).
pub fn ns_inode(path: impl AsRef<Path>) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Process start time (clock ticks since boot, field 22 of `/proc/PID/stat`); with the pid it
/// identifies a process across pid reuse.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True when the process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !stat[i + 1..].trim_start().starts_with(['Z', 'X']),
            None => false,
        },
        Err(_) => false,
    }
}

/// Every process whose network namespace is one of `inodes`.
pub fn pids_in_netns(inodes: &HashSet<u64>) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| ns_inode(format!("/proc/{pid}/ns/net")).is_some_and(|i| inodes.contains(&i)))
        .collect()
}

/// The children of `pid` (all threads), from `/proc/PID/task/*/children`.
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let p = t.path().join("children");
        if let Ok(s) = std::fs::read_to_string(p) {
            out.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
        }
    }
    out
}

/// `pid` and all its descendants.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let kids = children(out[i]);
        out.extend(
            kids.into_iter()
                .filter(|k| !out.contains(k))
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    out
}

/// The `comm` of a process.
pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}
