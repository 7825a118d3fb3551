//! The capabilities a container keeps: Docker's default set, nothing that reaches outside the
//! container (no CAP_SYS_ADMIN to setns into the host's network namespace, no CAP_BPF or
//! CAP_NET_ADMIN to rewrite md's pinned maps and programs).
//!
//! Dropped with raw prctl/capset calls rather than a crate: this runs between fork and exec of
//! a multi-threaded md-user, where only async-signal-safe calls are allowed, and the crates
//! (caps) build their sets on the heap.

use std::io;

const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_CHROOT: u32 = 18;
const CAP_MKNOD: u32 = 27;
const CAP_AUDIT_WRITE: u32 = 29;
const CAP_SETFCAP: u32 = 31;

/// Docker's default capabilities (moby's `oci/caps/defaults.go`).
pub const DOCKER_DEFAULT: [u32; 14] = [
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FSETID,
    CAP_FOWNER,
    CAP_MKNOD,
    CAP_NET_RAW,
    CAP_SETGID,
    CAP_SETUID,
    CAP_SETFCAP,
    CAP_SETPCAP,
    CAP_NET_BIND_SERVICE,
    CAP_SYS_CHROOT,
    CAP_KILL,
    CAP_AUDIT_WRITE,
];

/// A set of capabilities as the kernel's bit mask (bit N = capability N).
pub fn mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1 << c)
}

/// The highest capability this kernel knows (/proc/sys/kernel/cap_last_cap), read before fork.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// What a process keeps, decided before fork.
#[derive(Clone, Copy, Debug)]
pub struct Keep {
    pub mask: u64,
    pub last_cap: u32,
}

impl Keep {
    /// Docker's default set on this kernel.
    pub fn docker_default() -> Keep {
        Keep {
            mask: mask(&DOCKER_DEFAULT),
            last_cap: last_cap(),
        }
    }

    /// Limits the calling process to the kept capabilities: the others leave the bounding set
    /// (so no exec can bring them back), the ambient set is cleared, effective and permitted
    /// become the kept set and inheritable is empty (as in Docker since CVE-2022-24769).
    ///
    /// # Safety
    /// Only syscalls: safe to call between fork and exec.
    pub unsafe fn apply(&self) -> io::Result<()> {
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        for cap in 0..=self.last_cap.min(63) {
            if self.mask & (1 << cap) == 0 {
                check(libc::prctl(
                    libc::PR_CAPBSET_DROP,
                    cap as libc::c_ulong,
                    0,
                    0,
                    0,
                ))?;
            }
        }
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let low = self.mask as u32;
        let high = (self.mask >> 32) as u32;
        let data = [
            CapData {
                effective: low,
                permitted: low,
                inheritable: 0,
            },
            CapData {
                effective: high,
                permitted: high,
                inheritable: 0,
            },
        ];
        check(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int)
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_default_mask() {
        // What `docker run` shows in /proc/self/status (CapBnd, CapEff, CapPrm).
        assert_eq!(mask(&DOCKER_DEFAULT), 0xa80425fb);
        assert!(last_cap() >= CAP_SETFCAP);
    }
}
