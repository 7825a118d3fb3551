//! Process identity and signals. A pid alone can be reused; (pid, start time) cannot.

use std::fs;

/// Start time of a live (non-zombie) process in clock ticks since boot, from /proc/PID/stat.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); start time is field 22.
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether the process that had `start` as start time is still running.
pub fn alive(pid: u32, start: u64) -> bool {
    pid != 0 && start_time(pid) == Some(start)
}

pub fn self_identity() -> (u32, u64) {
    let pid = std::process::id();
    (pid, start_time(pid).unwrap_or(0))
}

/// Sends `sig` to the process if it is still the one we know.
pub fn signal(pid: u32, start: u64, sig: i32) -> bool {
    alive(pid, start) && unsafe { libc::kill(pid as i32, sig) } == 0
}

/// Starts `cmd` as a detached helper (its own session, no stdio) that reports readiness on a
/// pipe: `add_fd` appends the fd argument. Returns the child and what it wrote ("ok" or an
/// error) once it closed its end.
pub fn spawn_with_ready_pipe(
    mut cmd: std::process::Command,
    add_fd: impl FnOnce(&mut std::process::Command, i32),
) -> anyhow::Result<(std::process::Child, String)> {
    use std::{
        io::Read,
        os::{
            fd::{AsRawFd, FromRawFd, OwnedFd},
            unix::process::CommandExt,
        },
        process::Stdio,
    };
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wfd = wr.as_raw_fd();
    add_fd(&mut cmd, wfd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    unsafe {
        cmd.pre_exec(move || {
            // Its own session: the helper outlives this command and its terminal.
            if libc::setsid() < 0 || libc::fcntl(wfd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(wr);
    let mut msg = String::new();
    std::fs::File::from(rd).read_to_string(&mut msg)?;
    Ok((child, msg))
}

/// Kills every process still in a network namespace (what CMD left behind when it exited).
/// The caller holds `netns` open, so the namespace, and with it its inode number, cannot be
/// recycled for someone else's while we compare.
pub fn kill_namespace_members(netns: &crate::netns::Netns) {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = std::fs::File::from(netns.try_clone_fd()).metadata() else {
        return;
    };
    let own = std::process::id();
    for _ in 0..50 {
        let mut found = false;
        let Ok(entries) = fs::read_dir("/proc") else {
            return;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == own {
                continue;
            }
            let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/net")) else {
                continue;
            };
            if m.ino() == me.ino() && m.dev() == me.dev() {
                found = true;
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive() {
        let (pid, start) = self_identity();
        assert!(start > 0);
        assert!(alive(pid, start));
        assert!(!alive(pid, start + 1));
        assert!(!alive(0, start));
    }
}
