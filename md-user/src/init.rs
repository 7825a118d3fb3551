//! How CMD is started. A confined container (the default) gets a PID namespace of its own whose
//! PID 1 is md's tiny init (`md-user __init`, as `docker run --init` uses tini): PID 1 ignores
//! signals it has no handler for and must reap orphans, which CMD was not written to do. The
//! init starts CMD, forwards signals to it, reaps whatever is reparented to it and exits with
//! CMD's status; its exit takes the rest of the namespace with it. A privileged container runs
//! CMD directly in the host's PID namespace, as before.

use std::{
    fs::{self, File},
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{ExitCode, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::netns::PreExec;

/// Signals the init passes on to CMD. SIGKILL and SIGSTOP cannot be caught; the rest are the
/// synchronous ones a fault raises and SIGCHLD, which is the init's own business.
const FORWARDED: [libc::c_int; 12] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGALRM,
    libc::SIGCONT,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

/// Starts CMD (`program` with `argv`, argv[0] as given) in the namespaces `pre` enters, its
/// output to `log` when detached. Returns the process md waits for (the init, or CMD itself
/// when privileged) and CMD's pid as the host sees it.
///
/// A confined start makes this thread's next child the first process of a new PID namespace:
/// the caller (a container's supervisor) must not start anything else afterwards.
pub fn spawn(
    program: &Path,
    argv: &[String],
    log: Option<File>,
    pre: PreExec,
) -> Result<(tokio::process::Child, u32)> {
    let stdio = |cmd: &mut tokio::process::Command| -> Result<()> {
        if let Some(f) = &log {
            cmd.stdin(Stdio::null())
                .stdout(f.try_clone()?)
                .stderr(f.try_clone()?);
        }
        Ok(())
    };
    if pre.confine.is_none() {
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg0(&argv[0]).args(&argv[1..]);
        stdio(&mut cmd)?;
        unsafe {
            cmd.pre_exec(move || pre.apply());
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", argv[0]))?;
        let pid = child.id().context("CMD exited at once")?;
        return Ok((child, pid));
    }
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the init's pipe");
    }
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wfd = wr.as_raw_fd();
    // md-user itself; resolved by the child after its new /proc is mounted, where "self" is it.
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.arg0("md-user")
        .arg("__init")
        .arg("--ready-fd")
        .arg(wfd.to_string())
        .arg("--program")
        .arg(program)
        .arg("--")
        .args(argv);
    stdio(&mut cmd)?;
    unsafe {
        cmd.pre_exec(move || {
            pre.apply()?;
            // The init's end of the pipe survives the exec.
            if libc::fcntl(wfd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating a PID namespace");
    }
    let child = cmd.spawn().context("starting the container's init")?;
    drop(wr);
    let mut msg = String::new();
    File::from(rd)
        .read_to_string(&mut msg)
        .context("waiting for the container's init")?;
    let Some(ns_pid) = msg.strip_prefix("ok ").and_then(|p| p.trim().parse().ok()) else {
        let msg = msg.trim();
        if msg.is_empty() {
            bail!("the container's init exited before starting {}", argv[0]);
        }
        bail!("{msg}");
    };
    let init = child.id().context("the container's init exited at once")?;
    // CMD may be gone already (`run -- true`): then its init stands for it.
    let pid = host_pid(init, ns_pid).unwrap_or(init);
    Ok((child, pid))
}

/// The host pid of `parent`'s child that is `ns_pid` in its own PID namespace. Only the
/// parent's children are looked at (/proc/PID/task/PID/children): scanning all of /proc costs
/// a file read per process on the host, a hundred milliseconds next to a thousand containers.
fn host_pid(parent: u32, ns_pid: u32) -> Option<u32> {
    // Each thread has its own children list: the one that forked is not always the main one.
    let mut children = String::new();
    for t in fs::read_dir(format!("/proc/{parent}/task")).ok()?.flatten() {
        if let Ok(c) = fs::read_to_string(t.path().join("children")) {
            children.push_str(&c);
            children.push(' ');
        }
    }
    children.split_whitespace().find_map(|p| {
        let pid: u32 = p.parse().ok()?;
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::split_whitespace)
        };
        let ppid: u32 = field("PPid:")?.next()?.parse().ok()?;
        let inner: u32 = field("NSpid:")?.last()?.parse().ok()?;
        (ppid == parent && inner == ns_pid).then_some(pid)
    })
}

/// `md-user __init`: PID 1 of a container. Starts CMD, reports its pid on `ready_fd`, forwards
/// signals to it, reaps every child, and exits with CMD's status (128+N for signal N).
pub fn main(ready_fd: i32, program: &Path, argv: &[String]) -> Result<ExitCode> {
    // Not inherited by CMD.
    unsafe { libc::fcntl(ready_fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut ready = unsafe { File::from_raw_fd(ready_fd) };
    // Set by the supervisor before exec; kept unless credentials grew, which they did not.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error()).context("arming the parent-death signal");
    }
    // Blocked signals are never dropped, even for PID 1 without handlers; sigwaitinfo takes
    // them one by one.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mut cmd = std::process::Command::new(program);
    cmd.arg0(&argv[0]).args(&argv[1..]);
    unsafe {
        cmd.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let pid = match cmd.spawn() {
        Ok(child) => child.id() as libc::pid_t,
        Err(e) => {
            let _ = write!(ready, "starting {}: {e}", argv[0]);
            return Ok(ExitCode::from(127));
        }
    };
    // A write that fails means the supervisor died before its parent-death signal was armed
    // (EPIPE: nobody reads any more). CMD must not run unsupervised.
    if write!(ready, "ok {pid}").is_err() {
        unsafe { libc::kill(pid, libc::SIGKILL) };
        return Ok(ExitCode::FAILURE);
    }
    drop(ready);
    loop {
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if sig < 0 {
            continue; // EINTR
        }
        if sig != libc::SIGCHLD {
            unsafe { libc::kill(pid, sig) };
            continue;
        }
        let mut done = None;
        loop {
            let mut status = 0;
            let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if r <= 0 {
                break;
            }
            if r == pid {
                done = Some(status);
            }
        }
        if let Some(status) = done {
            return Ok(exit_code(status));
        }
    }
}

/// A wait status as an exit code: the code, or 128+N for a signal (as shells and tini do).
fn exit_code(status: libc::c_int) -> ExitCode {
    if libc::WIFEXITED(status) {
        ExitCode::from(libc::WEXITSTATUS(status) as u8)
    } else if libc::WIFSIGNALED(status) {
        ExitCode::from(128u8.wrapping_add(libc::WTERMSIG(status) as u8))
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_found_by_its_pid_in_its_namespace() {
        // Without a PID namespace a process's only NSpid is its pid.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        assert_eq!(host_pid(me, child.id()), Some(child.id()));
        assert_eq!(host_pid(me + 1, child.id()), None);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn statuses_become_exit_codes() {
        let code = |s| format!("{:?}", exit_code(s));
        // exited 3; killed by SIGTERM (15)
        assert_eq!(code(3 << 8), format!("{:?}", ExitCode::from(3)));
        assert_eq!(code(15), format!("{:?}", ExitCode::from(143)));
    }
}
