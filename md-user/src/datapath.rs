//! The eBPF datapath: load once, pin everything, attach per interface, fill maps.
//!
//! Pin directory layout (`MD_BPF_PIN_DIR`):
//!   progs/<program>           loaded once, shared by every container
//!   maps/<MAP>                all per-container state lives here
//!   links/<ifname>-ingress    TCX links; removing the file detaches the program
//!   links/cgroup-<program>    socket programs at the cgroup-v2 root
//! md has no daemon: these pins are what keeps the datapath alive between commands.

use std::{
    borrow::Cow,
    ffi::CString,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, Map, MapData, PerCpuHashMap, PerCpuValues,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifier, TcAttachOptions, TcAttachType},
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError,
    },
    util::KernelVersion,
    Btf, EbpfLoader, Pod,
};
use md_common::{
    maps as m, Config, CtEntry, CtEntry6, CtEntryOf, CtKey, CtKey6, CtKeyOf, Endpoint, IfStats,
    Ip4, Ip6, Network, PolicyKey, PolicyRule, PortKey, PortKey6, PortTarget, PortTarget6, Remote,
    Tunnel, HOST_ADDR_GATEWAY, HOST_ADDR_LOCAL,
};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub struct Datapath {
    pub pin_dir: PathBuf,
}

/// Which end of an interface a program runs at.
#[derive(Clone, Copy)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }

    fn tc(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }
}

/// The eBPF object: embedded at build time, or MD_EBPF_OBJ at run time.
pub fn object_bytes() -> Result<Cow<'static, [u8]>> {
    if let Some(p) = std::env::var_os("MD_EBPF_OBJ") {
        return fs::read(&p)
            .map(Cow::Owned)
            .with_context(|| format!("reading MD_EBPF_OBJ={}", Path::new(&p).display()));
    }
    #[cfg(md_ebpf_embedded)]
    {
        Ok(Cow::Borrowed(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/md-ebpf.o"
        ))))
    }
    #[cfg(not(md_ebpf_embedded))]
    bail!("md-user was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild md-user (or set MD_EBPF_OBJ)")
}

/// A short digest of the object, to tell builds apart.
pub fn object_digest() -> Result<String> {
    use std::hash::{Hash, Hasher};
    let bytes = object_bytes()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Ok(format!("{:016x}", h.finish()))
}

const TC_PROGRAMS: &[&str] = &[
    m::PROG_VETH_INGRESS,
    m::PROG_VETH_EGRESS,
    m::PROG_UPLINK_INGRESS,
    m::PROG_UPLINK_EGRESS,
    m::PROG_L3_INGRESS,
    m::PROG_L3_EGRESS,
    m::PROG_TUNNEL_INGRESS,
];

fn sock_programs() -> [(&'static str, aya::programs::CgroupSockAddrAttachType); 8] {
    use aya::programs::CgroupSockAddrAttachType as T;
    [
        (m::PROG_SOCK_CONNECT4, T::Connect4),
        (m::PROG_SOCK_SENDMSG4, T::UDPSendMsg4),
        (m::PROG_SOCK_RECVMSG4, T::UDPRecvMsg4),
        (m::PROG_SOCK_GETPEERNAME4, T::GetPeerName4),
        (m::PROG_SOCK_CONNECT6, T::Connect6),
        (m::PROG_SOCK_SENDMSG6, T::UDPSendMsg6),
        (m::PROG_SOCK_RECVMSG6, T::UDPRecvMsg6),
        (m::PROG_SOCK_GETPEERNAME6, T::GetPeerName6),
    ]
}

fn statfs_type(p: &Path) -> Option<i64> {
    let c = CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0).then_some(s.f_type as i64)
}

fn mount_bpffs(at: &Path) -> Result<()> {
    fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    let target = CString::new(at.as_os_str().as_bytes())?;
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {}", at.display()));
    }
    Ok(())
}

/// The cgroup-v2 mount point, from mountinfo (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, others at /sys/fs/cgroup).
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    for line in info.lines() {
        // "... mountpoint opts ... - fstype source superopts"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mp) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mp.replace("\\040", " ")));
            }
        }
    }
    bail!("no cgroup2 mount found in /proc/self/mountinfo")
}

fn remove_file_if_exists(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

impl Datapath {
    pub fn new(pin_dir: &Path) -> Self {
        Datapath {
            pin_dir: pin_dir.to_path_buf(),
        }
    }

    pub fn prog_pin(&self, name: &str) -> PathBuf {
        self.pin_dir.join("progs").join(name)
    }

    pub fn map_pin(&self, name: &str) -> PathBuf {
        self.pin_dir.join("maps").join(name)
    }

    fn link_pin(&self, name: &str) -> PathBuf {
        self.pin_dir.join("links").join(name)
    }

    pub fn is_loaded(&self) -> bool {
        TC_PROGRAMS.iter().all(|p| self.prog_pin(p).exists())
            && m::ALL_MAPS.iter().all(|n| self.map_pin(n).exists())
    }

    /// Makes sure the pin directory is on a bpffs, mounting one where needed: at /sys/fs/bpf
    /// when the directory is below it (a fresh machine has none), else at the directory itself.
    fn ensure_bpffs(&self) -> Result<()> {
        let mut probe = self.pin_dir.clone();
        while !probe.exists() {
            if !probe.pop() {
                break;
            }
        }
        if statfs_type(&probe) == Some(BPF_FS_MAGIC) {
            return Ok(());
        }
        let sys_bpf = Path::new("/sys/fs/bpf");
        if self.pin_dir.starts_with(sys_bpf) && statfs_type(sys_bpf) != Some(BPF_FS_MAGIC) {
            mount_bpffs(sys_bpf)
        } else {
            mount_bpffs(&self.pin_dir)
        }
    }

    /// Loads every program and map from the object and pins them. Programs are loaded once
    /// and shared: containers differ only by map entries. HOST_ADDRS is sized for `host_addrs`
    /// addresses with room to grow.
    pub fn load(&self, host_addrs: usize) -> Result<()> {
        self.ensure_bpffs()?;
        for sub in ["progs", "maps", "links"] {
            fs::create_dir_all(self.pin_dir.join(sub))
                .with_context(|| format!("creating {}", self.pin_dir.join(sub).display()))?;
        }
        let bytes = object_bytes()?;
        let btf = Btf::from_sys_fs().ok();
        let host_addrs_max = (host_addrs * 4).max(m::HOST_ADDRS_MAX) as u32;
        let mut ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
            .map_max_entries(m::HOST_ADDRS, host_addrs_max)
            .map_max_entries(m::HOST_ADDRS6, host_addrs_max)
            .load(&bytes)
            .context("loading md's eBPF object")?;
        for name in TC_PROGRAMS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            load_retrying(|| prog.load()).with_context(|| format!("loading {name}"))?;
            prog.pin(self.prog_pin(name))
                .with_context(|| format!("pinning {name}"))?;
        }
        for (name, _) in sock_programs() {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            load_retrying(|| prog.load()).with_context(|| format!("loading {name}"))?;
            prog.pin(self.prog_pin(name))
                .with_context(|| format!("pinning {name}"))?;
        }
        for name in m::ALL_MAPS {
            let map = ebpf
                .map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))?;
            map.pin(self.map_pin(name))
                .with_context(|| format!("pinning map {name}"))?;
        }
        // Programs and maps stay alive through their pins after `ebpf` is dropped.
        Ok(())
    }

    /// Attaches a TC program to an interface. With TCX (Linux 6.6+) the link is pinned: it
    /// survives md-user exiting, and removing the pin detaches it. Older kernels get a clsact
    /// filter, which lives as long as the interface.
    pub fn attach_tc(&self, ifname: &str, hook: Hook, program: &str, pin_name: &str) -> Result<()> {
        let pin = self.link_pin(&format!("{pin_name}-{}", hook.name()));
        if pin.exists() {
            // A TCX link whose interface went away stays pinned but defunct (ifindex 0): an
            // interface recreated under the same name needs a new one.
            if tcx_link_ifindex(&pin).is_some_and(|i| i != 0) {
                return Ok(());
            }
            remove_file_if_exists(&pin)?;
        }
        if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            let mut prog = SchedClassifier::from_pin(self.prog_pin(program))
                .with_context(|| format!("opening pinned program {program}"))?;
            let ctx = || format!("attaching {program} to {ifname} {}", hook.name());
            let id = prog
                .attach_with_options(
                    ifname,
                    hook.tc(),
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(ctx)?;
            let link: FdLink = prog.take_link(id)?.try_into().with_context(ctx)?;
            link.pin(&pin).with_context(ctx)?;
        } else {
            self.attach_filter(ifname, hook, program)?;
        }
        Ok(())
    }

    /// Attaches `program` at `hook` of an interface md created and owns (a container's host
    /// veth) as a clsact cls_bpf filter, not a TCX link: every TCX attach waits for an RCU
    /// grace period under RTNL (10–35 ms each on a busy host), a filter insert does not. The
    /// filter goes with the interface; nothing is pinned. A kernel without clsact or cls_bpf
    /// gets a pinned TCX link instead.
    pub fn attach_owned(&self, ifname: &str, hook: Hook, program: &str) -> Result<()> {
        match self.attach_filter(ifname, hook, program) {
            Ok(()) => Ok(()),
            Err(e) => self
                .attach_tc(ifname, hook, program, ifname)
                .with_context(|| {
                    format!(
                        "after a clsact filter failed: {}",
                        crate::error::one_line(&e)
                    )
                }),
        }
    }

    fn attach_filter(&self, ifname: &str, hook: Hook, program: &str) -> Result<()> {
        let mut prog = SchedClassifier::from_pin(self.prog_pin(program))
            .with_context(|| format!("opening pinned program {program}"))?;
        let ctx = || format!("attaching {program} to {ifname} {}", hook.name());
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) => {}
            // One qdisc for both hooks: the second attach finds it.
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e).with_context(ctx),
        }
        let id = prog
            .attach_with_options(
                ifname,
                hook.tc(),
                TcAttachOptions::Netlink(Default::default()),
            )
            .with_context(ctx)?;
        // Keep the filter when `prog` is dropped.
        std::mem::forget(prog.take_link(id)?);
        Ok(())
    }

    /// Names of the TC attachments pinned, without their `-ingress`/`-egress` suffix.
    pub fn tc_pins(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.pin_dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_suffix("-ingress")
                    .or_else(|| n.strip_suffix("-egress"))
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The interface a pinned TC attachment is on: None when it is no live TCX link.
    pub fn tc_pin_ifindex(&self, pin_name: &str, hook: Hook) -> Option<u32> {
        tcx_link_ifindex(&self.link_pin(&format!("{pin_name}-{}", hook.name()))).filter(|i| *i != 0)
    }

    /// Removes a TC attachment made by `attach_tc` (the pin; an interface that is gone took
    /// its attachment with it).
    pub fn detach_tc(&self, pin_name: &str) -> Result<()> {
        for hook in [Hook::Ingress, Hook::Egress] {
            remove_file_if_exists(&self.link_pin(&format!("{pin_name}-{}", hook.name())))?;
        }
        Ok(())
    }

    /// The kernel's id of one of md's pinned programs.
    pub fn program_id(&self, program: &str) -> Result<u32> {
        Ok(SchedClassifier::from_pin(self.prog_pin(program))
            .with_context(|| format!("opening pinned program {program}"))?
            .info()?
            .id())
    }

    /// Whether `program` runs at `hook` of interface `ifname` (in this namespace). With TCX
    /// the kernel lists what is attached; older kernels keep clsact filters md cannot name, so
    /// there the interface's existence is all that is known.
    pub fn tc_attached(&self, ifname: &str, hook: Hook, program: &str) -> Result<bool> {
        if !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            return Ok(true);
        }
        let want = self.program_id(program)?;
        let (_, progs) = SchedClassifier::query_tcx(ifname, hook.tc())
            .with_context(|| format!("listing the programs at {ifname} {}", hook.name()))?;
        Ok(progs.iter().any(|p| p.id() == want))
    }

    /// Attaches the socket programs at the cgroup-v2 root so host processes reach published
    /// ports through 127.0.0.1 and the host's addresses. They act only on sockets of md's host
    /// namespace (netns cookie in CONFIG). Pinned under the pin dir: removing it detaches them.
    pub fn attach_cgroup(&self) -> Result<()> {
        let root = cgroup2_root()?;
        let cg = fs::File::open(&root).with_context(|| format!("opening {}", root.display()))?;
        for (name, attach_type) in sock_programs() {
            let pin = self.link_pin(&format!("cgroup-{name}"));
            if pin.exists() && PinnedLink::from_pin(&pin).is_ok() {
                continue;
            }
            remove_file_if_exists(&pin)?;
            let mut prog = CgroupSockAddr::from_pin(self.prog_pin(name), attach_type)
                .with_context(|| format!("opening pinned program {name}"))?;
            // A bpf_link at a cgroup coexists with other programs there; link_create takes
            // no ALLOW_MULTI flag (it fails with EINVAL).
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", root.display()))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            link.pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
        }
        Ok(())
    }

    /// Removes every pin md made (links first so programs detach, then programs and maps) and
    /// the directory. Best effort: returns the first error after trying everything.
    pub fn unload(&self) -> Result<()> {
        let mut first_err = None;
        for sub in ["links", "progs", "maps"] {
            let dir = self.pin_dir.join(sub);
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if let Err(err) = remove_file_if_exists(&e.path()) {
                        first_err.get_or_insert(err);
                    }
                }
            }
            let _ = fs::remove_dir(&dir);
        }
        if self.pin_dir.exists() {
            // A bpffs md mounted on the pin dir itself: unmount it, then remove the directory.
            if statfs_type(&self.pin_dir) == Some(BPF_FS_MAGIC)
                && self.pin_dir.parent().and_then(statfs_type) != Some(BPF_FS_MAGIC)
            {
                if let Ok(c) = CString::new(self.pin_dir.as_os_str().as_bytes()) {
                    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                }
            }
            let _ = fs::remove_dir(&self.pin_dir);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn map_data(&self, name: &str) -> Result<Map> {
        let data = MapData::from_pin(self.map_pin(name))
            .with_context(|| format!("opening pinned map {name} (is md's datapath loaded?)"))?;
        Map::from_map_data(data).with_context(|| format!("opening map {name}"))
    }

    pub fn hash<K: Pod, V: Pod>(&self, name: &str) -> Result<HashMap<MapData, K, V>> {
        Ok(HashMap::try_from(self.map_data(name)?)?)
    }

    pub fn endpoints(&self) -> Result<HashMap<MapData, Ip4, Endpoint>> {
        self.hash(m::ENDPOINTS)
    }

    pub fn veth_owners(&self) -> Result<HashMap<MapData, u32, Endpoint>> {
        self.hash(m::VETH_OWNERS)
    }

    pub fn networks(&self) -> Result<HashMap<MapData, u32, Network>> {
        self.hash(m::NETWORKS)
    }

    pub fn host_addrs(&self) -> Result<HashMap<MapData, Ip4, u32>> {
        self.hash(m::HOST_ADDRS)
    }

    pub fn endpoints6(&self) -> Result<HashMap<MapData, Ip6, Endpoint>> {
        self.hash(m::ENDPOINTS6)
    }

    pub fn host_addrs6(&self) -> Result<HashMap<MapData, Ip6, u32>> {
        self.hash(m::HOST_ADDRS6)
    }

    pub fn port_map6(&self) -> Result<HashMap<MapData, PortKey6, PortTarget6>> {
        self.hash(m::PORT_MAP6)
    }

    /// Tells the datapath a dual-stack network's IPv6 subnet.
    pub fn add_subnet6(&self, network: Ipv6Addr, prefix_len: u8, net_id: u32) -> Result<()> {
        let mut trie: LpmTrie<MapData, Ip6, u32> =
            LpmTrie::try_from(self.map_data(m::MD_SUBNETS6)?)?;
        let key = LpmKey::new(prefix_len as u32, network.octets());
        trie.insert(&key, net_id, 0).context("writing MD_SUBNETS6")
    }

    pub fn remove_subnet6(&self, network: Ipv6Addr, prefix_len: u8) -> Result<()> {
        let mut trie: LpmTrie<MapData, Ip6, u32> =
            LpmTrie::try_from(self.map_data(m::MD_SUBNETS6)?)?;
        let key = LpmKey::new(prefix_len as u32, network.octets());
        match trie.remove(&key) {
            Ok(()) => Ok(()),
            Err(e) if missing(&e) => Ok(()),
            Err(e) => Err(e).context("removing from MD_SUBNETS6"),
        }
    }

    pub fn md_subnets(&self) -> Result<LpmTrie<MapData, Ip4, u32>> {
        Ok(LpmTrie::try_from(self.map_data(m::MD_SUBNETS)?)?)
    }

    /// Tells the datapath an md network's subnet (nothing from the wire may claim or reach it).
    pub fn add_subnet(&self, network: Ipv4Addr, prefix_len: u8, net_id: u32) -> Result<()> {
        let key = LpmKey::new(prefix_len as u32, network.octets());
        self.md_subnets()?
            .insert(&key, net_id, 0)
            .context("writing MD_SUBNETS")
    }

    pub fn remove_subnet(&self, network: Ipv4Addr, prefix_len: u8) -> Result<()> {
        let key = LpmKey::new(prefix_len as u32, network.octets());
        match self.md_subnets()?.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            // Already gone (an overlay's span and its block, a teardown run again, the default
            // network of a host that only ran Docker's): an LPM trie says ENOENT.
            Err(e) if missing(&e) => Ok(()),
            Err(e) => Err(e).context("removing from MD_SUBNETS"),
        }
    }

    /// Containers on other hosts of overlay networks (issue 17).
    pub fn remote(&self) -> Result<HashMap<MapData, Ip4, Remote>> {
        self.hash(m::REMOTE)
    }

    /// This host's VXLAN device and underlay address.
    pub fn set_tunnel(&self, t: &Tunnel) -> Result<()> {
        let mut arr: Array<MapData, Tunnel> = Array::try_from(self.map_data(m::TUNNEL)?)?;
        arr.set(0, t, 0).context("writing TUNNEL")?;
        Ok(())
    }

    pub fn port_map(&self) -> Result<HashMap<MapData, PortKey, PortTarget>> {
        self.hash(m::PORT_MAP)
    }

    pub fn policy(&self) -> Result<HashMap<MapData, PolicyKey, PolicyRule>> {
        self.hash(m::POLICY)
    }

    /// How full a pinned map is: (entries, capacity). Entries are counted by walking the keys
    /// (BPF_MAP_GET_NEXT_KEY), which works for every hash-like map; ring buffers and arrays
    /// report their capacity as entries.
    pub fn map_fill(&self, name: &str) -> Result<(u64, u64)> {
        use std::os::fd::{AsFd, AsRawFd};
        const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
        let data = MapData::from_pin(self.map_pin(name))
            .with_context(|| format!("opening pinned map {name}"))?;
        let info = data.info()?;
        let max = info.max_entries() as u64;
        if matches!(
            info.map_type(),
            Ok(aya::maps::MapType::Array) | Ok(aya::maps::MapType::RingBuf)
        ) {
            return Ok((max, max));
        }
        let fd = data.fd().as_fd().as_raw_fd();
        let size = info.key_size() as usize;
        let (mut cur, mut next) = (vec![0u8; size], vec![0u8; size]);
        let mut count = 0u64;
        let mut first = true;
        loop {
            // union bpf_attr for map element commands: map_fd, pad, key, next_key.
            let attr: [u64; 3] = [
                fd as u64,
                if first { 0 } else { cur.as_ptr() as u64 },
                next.as_mut_ptr() as u64,
            ];
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_GET_NEXT_KEY,
                    attr.as_ptr(),
                    std::mem::size_of_val(&attr),
                )
            };
            if ret != 0 || count > max {
                break;
            }
            count += 1;
            first = false;
            std::mem::swap(&mut cur, &mut next);
        }
        Ok((count, max))
    }

    /// Both tracker maps: answered flows, then flows not answered yet.
    pub fn trackers(&self) -> Result<Vec<HashMap<MapData, CtKey, CtEntry>>> {
        m::TRACKERS.iter().map(|n| self.hash(n)).collect()
    }

    /// The IPv6 tracker maps, in the same order.
    pub fn trackers6(&self) -> Result<Vec<HashMap<MapData, CtKey6, CtEntry6>>> {
        m::TRACKERS6.iter().map(|n| self.hash(n)).collect()
    }

    pub fn if_stats(&self) -> Result<PerCpuHashMap<MapData, u32, IfStats>> {
        Ok(PerCpuHashMap::try_from(self.map_data(m::IF_STATS)?)?)
    }

    pub fn config(&self) -> Result<Config> {
        let arr: Array<MapData, Config> = Array::try_from(self.map_data(m::CONFIG)?)?;
        Ok(arr.get(&0, 0)?)
    }

    pub fn set_config(&self, cfg: &Config) -> Result<()> {
        let mut arr: Array<MapData, Config> = Array::try_from(self.map_data(m::CONFIG)?)?;
        arr.set(0, cfg, 0).context("writing CONFIG")?;
        Ok(())
    }

    /// Starts counting for an interface (zeroed per-CPU slots).
    pub fn reset_if_stats(&self, ifindex: u32) -> Result<()> {
        let mut stats = self.if_stats()?;
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero = PerCpuValues::try_from(vec![IfStats::default(); n])?;
        stats.insert(ifindex, zero, 0).context("writing IF_STATS")?;
        Ok(())
    }

    /// Replaces HOST_ADDRS with the host namespace's current addresses, the gateways of md's
    /// networks flagged as such. Returns the addresses that went away.
    pub fn set_host_addrs(&self, addrs: &[Ipv4Addr]) -> Result<Vec<Ipv4Addr>> {
        let gateways: Vec<Ip4> = self
            .networks()?
            .iter()
            .flatten()
            .map(|(_, n)| n.gateway)
            .collect();
        let want: Vec<Ip4> = addrs.iter().map(|a| a.octets()).collect();
        let stale = sync_host_addrs(&mut self.host_addrs()?, &want, &gateways)?;
        Ok(stale.into_iter().map(Ipv4Addr::from).collect())
    }

    /// The same for HOST_ADDRS6 and the host's IPv6 addresses.
    pub fn set_host_addrs6(&self, addrs: &[Ipv6Addr]) -> Result<Vec<Ipv6Addr>> {
        let gateways: Vec<Ip6> = self
            .networks()?
            .iter()
            .flatten()
            .filter(|(_, n)| n.flags & md_common::NET_IPV6 != 0)
            .map(|(_, n)| n.gateway6)
            .collect();
        let want: Vec<Ip6> = addrs.iter().map(|a| a.octets()).collect();
        let stale = sync_host_addrs(&mut self.host_addrs6()?, &want, &gateways)?;
        Ok(stale.into_iter().map(Ipv6Addr::from).collect())
    }

    /// Deletes tracker entries involving `ip` (before or after translation), so flows of a
    /// container that is gone never reach whoever gets its address or port next.
    pub fn purge_conntrack(&self, ip: Ipv4Addr) -> Result<usize> {
        let ip = ip.octets();
        let per_map = self.purge_conntrack_where(m::TRACKERS, |k, v| involves(k, v, &ip))?;
        Ok(per_map.iter().map(|(removed, _)| removed).sum())
    }

    /// The same in the IPv6 trackers.
    pub fn purge_conntrack6(&self, ip: Ipv6Addr) -> Result<usize> {
        let ip = ip.octets();
        let per_map = self.purge_conntrack_where(m::TRACKERS6, |k, v| involves(k, v, &ip))?;
        Ok(per_map.iter().map(|(removed, _)| removed).sum())
    }

    /// Deletes expired tracker entries; returns (collected, live ones remaining) per tracker
    /// map (answered, then unanswered), the IPv6 trackers' counts added to the IPv4 ones.
    pub fn gc_conntrack(&self) -> Result<Vec<(usize, usize)>> {
        let now = monotonic_ns();
        let v4 =
            self.purge_conntrack_where(m::TRACKERS, |_: &CtKey, v: &CtEntry| v.expires_ns <= now)?;
        let v6 = self
            .purge_conntrack_where(m::TRACKERS6, |_: &CtKeyOf<Ip6>, v: &CtEntryOf<Ip6>| {
                v.expires_ns <= now
            })
            .unwrap_or_default();
        Ok(v4
            .into_iter()
            .enumerate()
            .map(|(i, (removed, seen))| {
                let (r6, s6) = v6.get(i).copied().unwrap_or((0, 0));
                (removed + r6, seen + s6 - removed - r6)
            })
            .collect())
    }

    /// One pass over each tracker map of `maps`: deletes the entries `pred` picks. Returns how
    /// many it deleted and how many it saw, per map. An entry is checked again just before it
    /// goes: the datapath may have reused the key for a new flow since the listing.
    fn purge_conntrack_where<A: Copy + PartialEq>(
        &self,
        maps: &[&str],
        pred: impl Fn(&CtKeyOf<A>, &CtEntryOf<A>) -> bool,
    ) -> Result<Vec<(usize, usize)>>
    where
        CtKeyOf<A>: Pod,
        CtEntryOf<A>: Pod,
    {
        let mut out = Vec::new();
        let trackers: Vec<HashMap<MapData, CtKeyOf<A>, CtEntryOf<A>>> =
            maps.iter().map(|n| self.hash(n)).collect::<Result<_>>()?;
        for mut ct in trackers {
            let mut seen = 0;
            let doomed: Vec<CtKeyOf<A>> = ct
                .iter()
                .flatten()
                .inspect(|_| seen += 1)
                .filter(|(k, v)| pred(k, v))
                .map(|(k, _)| k)
                .collect();
            let mut removed = 0;
            for k in &doomed {
                if ct.get(k, 0).is_ok_and(|v| pred(k, &v)) && ct.remove(k).is_ok() {
                    removed += 1;
                }
            }
            out.push((removed, seen));
        }
        Ok(out)
    }
}

/// A delete of a key that is not there (a network whose bridge was never made): aya reports
/// the LPM trie's ENOENT as a plain syscall error.
fn missing(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Whether a tracker entry involves `ip`, before or after translation.
fn involves<A: PartialEq>(k: &CtKeyOf<A>, v: &CtEntryOf<A>, ip: &A) -> bool {
    k.saddr == *ip || k.daddr == *ip || v.nat_saddr == *ip || v.nat_daddr == *ip
}

/// Makes a host-address map say `want` (gateways flagged); returns the addresses removed.
fn sync_host_addrs<A: Pod + PartialEq>(
    map: &mut HashMap<MapData, A, u32>,
    want: &[A],
    gateways: &[A],
) -> Result<Vec<A>> {
    let stale: Vec<A> = map.keys().flatten().filter(|k| !want.contains(k)).collect();
    for k in &stale {
        let _ = map.remove(k);
    }
    for a in want {
        let flags = if gateways.contains(a) {
            HOST_ADDR_LOCAL | HOST_ADDR_GATEWAY
        } else {
            HOST_ADDR_LOCAL
        };
        if map.get(a, 0).ok() != Some(flags) {
            map.insert(a, flags, 0).context("writing host addresses")?;
        }
    }
    Ok(stale)
}

/// The interface of the TCX link pinned at `pin` (0 once its interface is gone). None when the
/// pin is no TCX link.
fn tcx_link_ifindex(pin: &Path) -> Option<u32> {
    tcx_link(pin).map(|l| l.0)
}

/// A TCX link pinned under the pin dir: where it is and what it runs.
#[derive(Debug, Clone)]
pub struct TcLink {
    pub ifindex: u32,
    pub ingress: bool,
    pub prog_id: u32,
}

impl Datapath {
    /// Every live TCX link md pinned (for `trace`: which program runs where).
    pub fn tc_links(&self) -> Vec<TcLink> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.pin_dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some((ifindex, prog_id, attach_type)) = tcx_link(&e.path()) {
                if ifindex != 0 {
                    out.push(TcLink {
                        ifindex,
                        // BPF_TCX_INGRESS = 46, BPF_TCX_EGRESS = 47.
                        ingress: attach_type == 46,
                        prog_id,
                    });
                }
            }
        }
        out
    }
}

/// (ifindex, program id, attach type) of the TCX link pinned at `pin`, read with BPF_OBJ_GET
/// and BPF_OBJ_GET_INFO_BY_FD: aya 0.14 does not expose a TCX link's ifindex.
fn tcx_link(pin: &Path) -> Option<(u32, u32, u32)> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_TCX: u32 = 11;
    let path = CString::new(pin.as_os_str().as_bytes()).ok()?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    let mut get = [0u64; 2];
    get[0] = path.as_ptr() as u64;
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            get.as_mut_ptr(),
            std::mem::size_of_val(&get),
        )
    };
    if fd < 0 {
        return None;
    }
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) tcx { ifindex, attach_type }.
    let mut info = [0u32; 16];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    (ret == 0 && info[0] == BPF_LINK_TYPE_TCX).then_some((info[4], info[2], info[5]))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Loads a program, again when the verifier gave up with EAGAIN: it does when a signal is
/// pending for the loading thread (libbpf retries the same way).
pub fn load_retrying(
    mut load: impl FnMut() -> Result<(), ProgramError>,
) -> Result<(), ProgramError> {
    let mut tries = 0;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 5 =>
            {
                tries += 1;
            }
            r => return r,
        }
    }
}
