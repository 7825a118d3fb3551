//! Process plumbing for the benchmark: commands with deadlines, background processes that die
//! with their guard, the interrupt flag, the monotonic clock shared by every namespace, and a
//! guard that puts a global sysctl back.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP set a flag instead of killing xtask, so that every lab guard still runs.
/// Children in the terminal's process group get Ctrl-C themselves and fail, which unwinds too.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails when the user asked to stop; called between steps.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every network namespace, so a probe in one
/// namespace and the orchestrator can compare timestamps.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `nsenter --net=<ns> -- program args...`: keeps the mount namespace (so /sys/fs/bpf stays
/// visible), unlike `ip netns exec`.
pub fn in_ns(ns: &Path, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let mut c = util::command("nsenter");
    c.arg(format!("--net={}", ns.display()))
        .arg("--")
        .arg(program)
        .args(args);
    c
}

/// Runs `cmd` with captured output; kills it at the deadline.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = util::show(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{shown}` did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // A daemon the command started may hold the pipes open: don't wait for its EOF forever.
    let grace = Duration::from_millis(500);
    Ok(Output {
        status,
        stdout: out.recv_timeout(grace).unwrap_or_default(),
        stderr: err.recv_timeout(grace).unwrap_or_default(),
    })
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// [`run_timeout`], failing unless the command exits 0; returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let shown = util::show(cmd);
    let out = run_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({})\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Shorthand for the many short setup commands (`ip ...`, `sysctl ...`).
pub fn sh(args: &[&str]) -> Result<String> {
    run_ok(
        util::command(args[0]).args(&args[1..]),
        Duration::from_secs(30),
    )
}

/// A background process, killed (SIGKILL) and reaped when the guard drops.
pub struct Bg {
    child: Child,
    what: String,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Bg {
    /// Starts `cmd`; stderr goes to `log`, stdout is kept for [`Bg::read_line`] or discarded.
    pub fn spawn(cmd: &mut Command, log: &Path, keep_stdout: bool) -> Result<Bg> {
        let what = util::show(cmd);
        let err = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(if keep_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        let stdout = child.stdout.take().map(BufReader::new);
        Ok(Bg {
            child,
            what,
            stdout,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line of stdout (blocking; the process's own deadline bounds it).
    pub fn read_line(&mut self) -> Result<String> {
        let r = self
            .stdout
            .as_mut()
            .with_context(|| format!("stdout of `{}` was not kept", self.what))?;
        let mut line = String::new();
        r.read_line(&mut line)?;
        if line.is_empty() {
            bail!("`{}` closed its output", self.what);
        }
        Ok(line.trim_end().to_string())
    }

    /// Waits for the exit (killing at the deadline); returns the status and the rest of stdout.
    pub fn finish(mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                bail!("`{}` did not finish within {timeout:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let mut rest = String::new();
        if let Some(r) = self.stdout.as_mut() {
            let _ = r.read_to_string(&mut rest);
        }
        Ok((status, rest))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Sets a sysctl through /proc/sys and restores the previous value on drop. Only for sysctls
/// the bench must flip globally (kernel.bpf_stats_enabled); per-namespace ones are set inside
/// the lab's namespaces and vanish with them.
pub struct SysctlGuard {
    path: String,
    old: String,
}

impl SysctlGuard {
    pub fn set(name: &str, value: &str) -> Result<SysctlGuard> {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        let old = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_string();
        std::fs::write(&path, value).with_context(|| format!("writing {path}"))?;
        Ok(SysctlGuard { path, old })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.old) {
            eprintln!(
                "bench: could not restore {} to {}: {e}",
                self.path, self.old
            );
        }
    }
}

/// The inode of a namespace file (`/run/netns/x`, `/proc/<pid>/ns/net`).
pub fn ns_inode(p: impl AsRef<Path>) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| m.ino())
}

/// Pids whose network namespace is one of `inodes`.
pub fn pids_in_netns(inodes: &[u64]) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(d) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in d.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(ino) = ns_inode(format!("/proc/{pid}/ns/net")) {
            if inodes.contains(&ino) {
                out.push(pid);
            }
        }
    }
    out
}

/// SIGKILLs every process in the given namespaces (a few passes: killing may reveal children).
pub fn kill_in_netns(inodes: &[u64]) {
    let me = std::process::id() as i32;
    for _ in 0..5 {
        let pids: Vec<i32> = pids_in_netns(inodes)
            .into_iter()
            .filter(|&p| p != me)
            .collect();
        if pids.is_empty() {
            return;
        }
        for &p in &pids {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
