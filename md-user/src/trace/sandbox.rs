//! A private copy of md's datapath for `trace`: the same object md-user embeds, loaded again
//! with maps of its own (nothing pinned, nothing attached), the live pinned maps' contents
//! copied in, and packets run through its TC programs with BPF_PROG_TEST_RUN. Whatever the
//! programs count, track or report lands in the copy and dies with it: `stats`, `monitor` and
//! the live tracker never see it.
//!
//! Route and socket lookups inside the programs (bpf_fib_lookup, bpf_sk_lookup) happen in the
//! network namespace of the thread running the test, which is md's host namespace (checked):
//! they only read.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, LpmTrie, Map, MapData, MapType, PerCpuHashMap, RingBuf},
    programs::{Program, ProgramInfo, SchedClassifier, TestRun, TestRunOptions},
    Btf, Ebpf, EbpfLoader, Pod,
};
use md_common::{maps as m, Config, Event, IfStats};

use crate::datapath::Datapath;

/// `offsetof(struct __sk_buff, ifindex)` and the struct's size on 64-bit kernels.
const SKB_IFINDEX_OFF: usize = 40;
/// `__sk_buff.mark`.
const SKB_MARK_OFF: usize = 8;
const SKB_CTX_LEN: usize = 192;

/// LRU maps evict before they are full (per-CPU free lists): the copy gets this much room
/// more per CPU, so copying a nearly full tracker loses nothing.
const LRU_SLACK_PER_CPU: u32 = 512;

/// A map copied from the live datapath.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Copied {
    pub map: String,
    pub entries: usize,
    /// The live map's capacity.
    pub capacity: u32,
}

/// A program of the copy and whether it is the one md has loaded (same kernel tag: a digest
/// of its instructions with map references blanked).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Loaded {
    pub program: String,
    pub tag: String,
    pub same_as_live: bool,
}

pub struct Sandbox {
    ebpf: Ebpf,
    events: Option<RingBuf<MapData>>,
    pub copied: Vec<Copied>,
    pub programs: Vec<Loaded>,
}

/// The MapData behind any map variant.
fn data(map: &Map) -> &MapData {
    match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    }
}

// ---- raw map access: copies work on bytes, whatever the map's types ----------------------

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `union bpf_attr` for the map element commands: map_fd, key, value (or next_key), flags.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem(cmd: libc::c_long, fd: i32, key: *const u8, value: *mut u8) -> std::io::Result<()> {
    let attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags: 0,
    };
    // SAFETY: attr points at buffers of the map's key and value sizes that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn is_per_cpu(t: &MapType) -> bool {
    matches!(
        t,
        MapType::PerCpuHash | MapType::PerCpuArray | MapType::LruPerCpuHash
    )
}

/// Copies every entry of `from` into `to` (same key and value sizes). Returns how many.
fn copy_entries(from: &MapData, to: &MapData, per_cpu: bool) -> Result<usize> {
    let info = from.info()?;
    let ks = info.key_size() as usize;
    let vs = if per_cpu {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        (info.value_size() as usize).div_ceil(8) * 8 * cpus
    } else {
        info.value_size() as usize
    };
    let (src, dst) = (from.fd().as_fd().as_raw_fd(), to.fd().as_fd().as_raw_fd());
    let (mut cur, mut next, mut val) = (vec![0u8; ks], vec![0u8; ks], vec![0u8; vs]);
    let mut first = true;
    let mut n = 0;
    loop {
        let key = if first {
            std::ptr::null()
        } else {
            cur.as_ptr()
        };
        if elem(BPF_MAP_GET_NEXT_KEY, src, key, next.as_mut_ptr()).is_err() {
            break;
        }
        first = false;
        std::mem::swap(&mut cur, &mut next);
        // An entry deleted since the listing is simply not copied.
        if elem(BPF_MAP_LOOKUP_ELEM, src, cur.as_ptr(), val.as_mut_ptr()).is_err() {
            continue;
        }
        elem(BPF_MAP_UPDATE_ELEM, dst, cur.as_ptr(), val.as_mut_ptr())
            .context("writing the private copy")?;
        n += 1;
        if n > info.max_entries() as usize {
            break;
        }
    }
    Ok(n)
}

impl Sandbox {
    /// Loads md's object privately and fills its maps from the live ones pinned by `dp`.
    pub fn load(dp: &Datapath) -> Result<Sandbox> {
        let bytes = crate::datapath::object_bytes()?;
        let btf = Btf::from_sys_fs().ok();
        // Every live map, by the name it is pinned under, with its kernel info.
        let mut live: BTreeMap<String, (MapData, aya::maps::MapInfo)> = BTreeMap::new();
        let dir = dp.pin_dir.join("maps");
        for e in std::fs::read_dir(&dir)
            .with_context(|| format!("reading {} (is md's datapath loaded?)", dir.display()))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let data = MapData::from_pin(e.path())
                .with_context(|| format!("opening pinned map {name}"))?;
            let info = data.info()?;
            live.insert(name, (data, info));
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)? as u32;
        let sizes: Vec<(String, u32)> = live
            .iter()
            .map(|(name, (_, info))| {
                let lru = matches!(
                    info.map_type(),
                    Ok(MapType::LruHash | MapType::LruPerCpuHash)
                );
                let extra = if lru { LRU_SLACK_PER_CPU * cpus } else { 0 };
                (name.clone(), info.max_entries() + extra)
            })
            .collect();
        let mut loader = EbpfLoader::new();
        loader.btf(btf.as_ref());
        for (name, size) in &sizes {
            loader.map_max_entries(name, *size);
        }
        let mut ebpf = loader
            .load(&bytes)
            .context("loading a private copy of md's eBPF object")?;

        let mut copied = Vec::new();
        for (name, map) in ebpf.maps() {
            let Some((from, info)) = live.get(name) else {
                continue;
            };
            let to = data(map);
            let t = info.map_type()?;
            if matches!(t, MapType::RingBuf) {
                continue;
            }
            let mine = to.info()?;
            if mine.key_size() != info.key_size()
                || mine.value_size() != info.value_size()
                || mine.map_type()? != t
            {
                bail!("the live map {name} differs from this md-user's (another md build loaded the datapath)");
            }
            let entries = copy_entries(from, to, is_per_cpu(&t))
                .with_context(|| format!("copying map {name}"))?;
            copied.push(Copied {
                map: name.to_string(),
                entries,
                capacity: info.max_entries(),
            });
        }
        copied.sort_by(|a, b| a.map.cmp(&b.map));
        let events = ebpf
            .take_map(m::EVENTS)
            .map(RingBuf::try_from)
            .transpose()?;

        let mut programs = Vec::new();
        for (name, prog) in ebpf.programs_mut() {
            let Program::SchedClassifier(p) = prog else {
                continue;
            };
            crate::datapath::load_retrying(|| p.load())
                .with_context(|| format!("loading a private copy of {name}"))?;
            let tag = p.info()?.tag();
            let live_tag = ProgramInfo::from_pin(dp.prog_pin(name))
                .ok()
                .map(|i| i.tag());
            programs.push(Loaded {
                program: name.to_string(),
                tag: format!("{tag:016x}"),
                same_as_live: live_tag == Some(tag),
            });
        }
        Ok(Sandbox {
            ebpf,
            events,
            copied,
            programs,
        })
    }

    /// Runs `frame` through program `prog` as if it arrived at interface `ifindex` (the
    /// program sees it as `__sk_buff.ifindex`) carrying skb mark `mark`. Returns the TC return
    /// code, the frame as the program left it, and the mark it left.
    pub fn run(
        &self,
        prog: &str,
        ifindex: u32,
        mark: u32,
        frame: &[u8],
    ) -> Result<(i32, Vec<u8>, u32)> {
        let p: &SchedClassifier = self
            .ebpf
            .program(prog)
            .with_context(|| format!("program {prog} is not in md's object"))?
            .try_into()?;
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut out = vec![0u8; frame.len() + 2048];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ctx_out: Some(&mut ctx_out),
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {prog}"))?;
        out.truncate(r.data_size_out as usize);
        let mut m = [0u8; 4];
        m.copy_from_slice(&ctx_out[SKB_MARK_OFF..SKB_MARK_OFF + 4]);
        Ok((r.return_value as i32, out, u32::from_ne_bytes(m)))
    }

    pub fn has_program(&self, prog: &str) -> bool {
        self.programs.iter().any(|p| p.program == prog)
    }

    fn map(&self, name: &str) -> Result<&Map> {
        self.ebpf
            .map(name)
            .with_context(|| format!("map {name} is not in md's object"))
    }

    pub fn hash<K: Pod, V: Pod>(&self, name: &str) -> Result<HashMap<&MapData, K, V>> {
        Ok(HashMap::try_from(self.map(name)?)?)
    }

    /// A hash map's entries.
    pub fn entries<K: Pod, V: Pod>(&self, name: &str) -> Result<Vec<(K, V)>> {
        Ok(self.hash::<K, V>(name)?.iter().flatten().collect())
    }

    pub fn get<K: Pod, V: Pod>(&self, name: &str, key: &K) -> Option<V> {
        self.hash::<K, V>(name).ok()?.get(key, 0).ok()
    }

    pub fn lpm<K: Pod, V: Pod>(&self, name: &str) -> Result<LpmTrie<&MapData, K, V>> {
        Ok(LpmTrie::try_from(self.map(name)?)?)
    }

    pub fn config(&self) -> Result<Config> {
        let a: aya::maps::Array<&MapData, Config> =
            aya::maps::Array::try_from(self.map(m::CONFIG)?)?;
        Ok(a.get(&0, 0)?)
    }

    /// Every interface's counters, summed over CPUs.
    pub fn if_stats(&self) -> Result<BTreeMap<u32, IfStats>> {
        let map: PerCpuHashMap<&MapData, u32, IfStats> =
            PerCpuHashMap::try_from(self.map(m::IF_STATS)?)?;
        let mut out = BTreeMap::new();
        for (k, per_cpu) in map.iter().flatten() {
            let mut t = IfStats::default();
            for s in per_cpu.iter() {
                crate::commands::stats::add(&mut t, s);
            }
            out.insert(k, t);
        }
        Ok(out)
    }

    /// The events the programs reported since the last call (what `monitor` would have shown).
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(ring) = &mut self.events {
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<Event>() {
                    out.push(bytemuck::pod_read_unaligned(
                        &item[..std::mem::size_of::<Event>()],
                    ));
                }
            }
        }
        out
    }
}

/// Whether `path` exists and is a pinned program (for the attachments' program names).
pub fn pinned_program_id(path: &Path) -> Option<u32> {
    ProgramInfo::from_pin(path).ok().map(|i| i.id())
}
