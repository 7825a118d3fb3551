//! Namespaces through syscalls: create a network namespace, run code inside one, and the
//! pre-exec steps that put CMD into its namespaces.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use anyhow::{Context, Result};

/// A network namespace, alive while this handle (or any process inside) exists.
pub struct Netns {
    fd: OwnedFd,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Netns {
    /// Creates a new, empty network namespace. The unshare happens on a throwaway thread, so
    /// the calling thread stays in the host namespace.
    pub fn create() -> Result<Netns> {
        std::thread::spawn(|| -> io::Result<OwnedFd> {
            check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
            Ok(File::open("/proc/thread-self/ns/net")?.into())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
        .context("creating a network namespace")
        .map(|fd| Netns { fd })
    }

    pub fn open(path: &Path) -> Result<Netns> {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Netns { fd: f.into() })
    }

    /// The network namespace of a running process.
    pub fn of_pid(pid: u32) -> Result<Netns> {
        Self::open(Path::new(&format!("/proc/{pid}/ns/net")))
    }

    pub fn try_clone_fd(&self) -> OwnedFd {
        self.fd.try_clone().expect("dup of a namespace fd")
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it opens live there).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let fd = self.fd.try_clone()?;
        std::thread::spawn(move || -> Result<T> {
            check(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) })
                .context("entering the container's network namespace")?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }
}

/// Cookie of the calling thread's network namespace (SO_NETNS_COOKIE), the value socket
/// programs compare `bpf_get_netns_cookie` with.
pub fn current_netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket");
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    })
    .context("reading the network namespace cookie")?;
    Ok(cookie)
}

/// The hostname a container gets.
pub enum Uts {
    /// Its own UTS namespace with this hostname.
    New(std::ffi::CString),
    /// Another container's UTS namespace.
    Join(RawFd),
    /// The host's (network mode host).
    Inherit,
}

/// What CMD's child does between fork and exec. Only async-signal-safe calls: no allocation.
pub struct PreExec {
    /// The network namespace to enter; None keeps the host's.
    pub netns: Option<RawFd>,
    pub uts: Uts,
    /// Files bind-mounted over others in a private mount namespace (/etc/hosts, resolv.conf).
    pub binds: Vec<(std::ffi::CString, std::ffi::CString)>,
    /// The supervisor: if it died before the parent-death signal was armed, give up.
    pub parent: libc::pid_t,
    /// A confined CMD (not `--privileged`); None runs it with every capability in the host's
    /// PID namespace.
    pub confine: Option<Confinement>,
}

/// What a confined CMD gets: it is PID 1 of a new PID namespace (the supervisor unshared it),
/// has its own mount namespace with a /proc of that PID namespace and without the host's
/// bpffs mounts (as in Docker, where a container sees no bpffs: with CAP_DAC_OVERRIDE, which
/// Docker's set keeps, a pinned map opens by path without CAP_BPF), and keeps only `keep`.
pub struct Confinement {
    pub keep: crate::caps::Keep,
    /// bpffs mount points, innermost first.
    pub hide: Vec<std::ffi::CString>,
}

impl Confinement {
    /// Docker's defaults, with the bpffs mounts the supervisor sees now.
    pub fn docker_default() -> Confinement {
        Confinement {
            keep: crate::caps::Keep::docker_default(),
            hide: mounts_of_type(
                &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
                "bpf",
            ),
        }
    }
}

/// Mount points of filesystems of `fstype` in a mountinfo text, the last mounted first.
fn mounts_of_type(mountinfo: &str, fstype: &str) -> Vec<std::ffi::CString> {
    let mut out: Vec<std::ffi::CString> = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == fstype).then_some(())?;
            let mp = left.split_whitespace().nth(4)?;
            // mountinfo escapes space, tab, newline and backslash as octal.
            let mp = mp
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\");
            std::ffi::CString::new(mp).ok()
        })
        .collect();
    out.reverse();
    out
}

impl PreExec {
    /// # Safety
    /// Must only be called in the forked child before exec.
    pub unsafe fn apply(&self) -> io::Result<()> {
        // CMD dies with its supervisor, so a killed md-user never leaves an unsupervised
        // container behind (the next command reclaims its network).
        check(libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        // In a new PID namespace the parent is outside it and getppid() is 0: there the init
        // finds out through its pipe whether the supervisor is still there.
        let ppid = libc::getppid();
        if ppid != self.parent && !(ppid == 0 && self.confine.is_some()) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        if let Some(fd) = self.netns {
            check(libc::setns(fd, libc::CLONE_NEWNET))?;
        }
        match &self.uts {
            Uts::Join(fd) => check(libc::setns(*fd, libc::CLONE_NEWUTS))?,
            Uts::New(h) => {
                check(libc::unshare(libc::CLONE_NEWUTS))?;
                check(libc::sethostname(h.as_ptr(), h.count_bytes()))?;
            }
            Uts::Inherit => {}
        }
        if !self.binds.is_empty() || self.confine.is_some() {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing mounted here propagates back to the host.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            for (src, dst) in &self.binds {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            if let Some(c) = &self.confine {
                // Gone from this mount namespace only: / is a slave of the host's.
                for mp in &c.hide {
                    libc::umount2(mp.as_ptr(), libc::MNT_DETACH);
                }
                // A /proc of its own PID namespace: it sees its own processes, not the host's.
                check(libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ))?;
            }
        }
        // The child inherits md-user's signal mask; CMD must start with none blocked.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        check(libc::sigprocmask(
            libc::SIG_SETMASK,
            &set,
            std::ptr::null_mut(),
        ))?;
        // Last: everything above needs capabilities the container does not keep.
        if let Some(c) = &self.confine {
            c.keep.apply()?;
        }
        Ok(())
    }
}

/// Enters the namespaces of a running container process (for `exec`): its PID namespace from
/// the parent (setns on a PID namespace only applies to children), the others in the forked
/// child.
pub struct JoinPid {
    pub fds: Vec<(RawFd, libc::c_int)>,
    pid_ns: Option<RawFd>,
}

impl JoinPid {
    pub fn open(pid: u32) -> Result<(JoinPid, Vec<File>)> {
        let mut files = Vec::new();
        let mut fds = Vec::new();
        // The mount namespace last: entering it changes what /proc paths resolve to.
        for (ns, flag) in [
            ("pid", libc::CLONE_NEWPID),
            ("net", libc::CLONE_NEWNET),
            ("uts", libc::CLONE_NEWUTS),
            ("mnt", libc::CLONE_NEWNS),
        ] {
            let path = format!("/proc/{pid}/ns/{ns}");
            let same = std::fs::read_link(&path).ok()
                == std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
            if same {
                continue;
            }
            let f = File::open(&path)
                .with_context(|| format!("opening the {ns} namespace of pid {pid}"))?;
            fds.push((f.as_raw_fd(), flag));
            files.push(f);
        }
        let pid_ns = fds
            .iter()
            .position(|(_, flag)| *flag == libc::CLONE_NEWPID)
            .map(|i| fds.remove(i).0);
        Ok((JoinPid { fds, pid_ns }, files))
    }

    /// Makes the calling thread's next child a member of the container's PID namespace.
    pub fn enter_pid_ns(&self) -> Result<()> {
        if let Some(fd) = self.pid_ns {
            check(unsafe { libc::setns(fd, libc::CLONE_NEWPID) })
                .context("entering the container's PID namespace")?;
        }
        Ok(())
    }

    /// # Safety
    /// Must only be called in the forked child before exec.
    pub unsafe fn apply(&self) -> io::Result<()> {
        for (fd, flag) in &self.fds {
            check(libc::setns(*fd, *flag))?;
        }
        Ok(())
    }
}

/// Writes a sysctl through procfs in the calling thread's namespace.
pub fn write_sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpffs_mount_points_innermost_first() {
        let info = "\
22 1 0:21 / /sys rw - sysfs sysfs rw
30 22 0:26 / /sys/fs/bpf rw - bpf bpf rw,mode=700
31 30 0:27 / /sys/fs/bpf/md\\040test rw - bpf bpf rw
32 1 0:28 / /run rw - tmpfs tmpfs rw
";
        let got: Vec<String> = mounts_of_type(info, "bpf")
            .into_iter()
            .map(|c| c.into_string().unwrap())
            .collect();
        assert_eq!(got, ["/sys/fs/bpf/md test", "/sys/fs/bpf"]);
    }
}
