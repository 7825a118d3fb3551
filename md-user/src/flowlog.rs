//! Flow logs from `md-user monitor`: what an event's packet became after translation, its
//! wall-clock time, and the file the lines go to, rotated by size (the renaming and pruning
//! are file-rotate's; when to rotate is decided here so a file ends at a line end).

use std::{
    fs::OpenOptions,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use file_rotate::{compression::Compression, suffix::AppendCount, ContentLimit, FileRotate};
#[cfg(test)]
use md_common::{CtEntry, CtEntry6};
use md_common::{Event, Event6, CT_KIND_DNAT, CT_KIND_HAIRPIN, CT_KIND_SNAT, EVENT_NAT};

/// Source and destination of a packet (ICMP echo: the identifier is the port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
}

/// A datapath event of either family (EVENTS holds [`Event`]s and [`Event6`]s).
#[derive(Debug, Clone, Copy)]
pub struct FlowEvent {
    pub ts_ns: u64,
    pub kind: u8,
    pub reason: u8,
    pub proto: u8,
    pub ifindex: u32,
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
    pub nat: (IpAddr, u16),
}

impl From<&Event> for FlowEvent {
    fn from(e: &Event) -> FlowEvent {
        FlowEvent {
            ts_ns: e.ts_ns,
            kind: e.kind,
            reason: e.reason,
            proto: e.proto,
            ifindex: e.ifindex,
            src: (Ipv4Addr::from(e.saddr).into(), e.sport),
            dst: (Ipv4Addr::from(e.daddr).into(), e.dport),
            nat: (Ipv4Addr::from(e.nat_addr).into(), e.nat_port),
        }
    }
}

impl From<&Event6> for FlowEvent {
    fn from(e: &Event6) -> FlowEvent {
        FlowEvent {
            ts_ns: e.ts_ns,
            kind: e.kind,
            reason: e.reason,
            proto: e.proto,
            ifindex: e.ifindex,
            src: (Ipv6Addr::from(e.saddr).into(), e.sport),
            dst: (Ipv6Addr::from(e.daddr).into(), e.dport),
            nat: (Ipv6Addr::from(e.nat_addr).into(), e.nat_port),
        }
    }
}

/// The event in the ring buffer item `item`: an [`Event6`] by its size, else an [`Event`].
pub fn parse_event(item: &[u8]) -> Option<FlowEvent> {
    if item.len() >= std::mem::size_of::<Event6>() {
        let e: Event6 = bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<Event6>()]);
        return Some((&e).into());
    }
    if item.len() >= std::mem::size_of::<Event>() {
        let e: Event = bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<Event>()]);
        return Some((&e).into());
    }
    None
}

impl Tuple {
    pub fn of_flow(ev: &FlowEvent) -> Tuple {
        Tuple {
            src: ev.src,
            dst: ev.dst,
        }
    }
}

/// `ip:port`, `[ip6]:port`.
pub fn endpoint((ip, port): (IpAddr, u16)) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// The tuple the event's packet left with. SNAT rewrites the source to the event's NAT
/// address and port, DNAT the destination. A hairpin to the caller's own published port also
/// gets the gateway as its source, which the event does not carry: `tracked` (the tracker
/// entry of the event's original tuple, when it is still there) does. (What `monitor` does
/// with [`translated_flow`], on the raw event.)
#[cfg(test)]
pub fn translated(ev: &Event, tracked: Option<&CtEntry>) -> Tuple {
    let hairpin_src = tracked
        .filter(|e| e.kind == CT_KIND_HAIRPIN)
        .map(|e| (Ipv4Addr::from(e.nat_saddr).into(), e.nat_sport));
    translated_flow(&ev.into(), hairpin_src)
}

/// [`translated`] for an IPv6 event.
#[cfg(test)]
pub fn translated6(ev: &Event6, tracked: Option<&CtEntry6>) -> Tuple {
    let hairpin_src = tracked
        .filter(|e| e.kind == CT_KIND_HAIRPIN)
        .map(|e| (Ipv6Addr::from(e.nat_saddr).into(), e.nat_sport));
    translated_flow(&ev.into(), hairpin_src)
}

/// The same for an event of either family; `hairpin_src` is a hairpin's new source from the
/// tracker.
pub fn translated_flow(ev: &FlowEvent, hairpin_src: Option<(IpAddr, u16)>) -> Tuple {
    let mut t = Tuple::of_flow(ev);
    if ev.kind != EVENT_NAT {
        return t;
    }
    match ev.reason {
        CT_KIND_SNAT => t.src = ev.nat,
        CT_KIND_DNAT | CT_KIND_HAIRPIN => {
            t.dst = ev.nat;
            if let Some(src) = hairpin_src {
                t.src = src;
            }
        }
        _ => {}
    }
    t
}

/// The wall-clock time of a CLOCK_MONOTONIC timestamp, given both clocks read now.
pub fn wall_clock(ts_ns: u64, monotonic_now: u64, real_now: SystemTime) -> SystemTime {
    let ago = Duration::from_nanos(monotonic_now.saturating_sub(ts_ns));
    real_now.checked_sub(ago).unwrap_or(UNIX_EPOCH)
}

/// RFC 3339 in UTC with nanoseconds, e.g. `2026-06-01T12:00:00.123456789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// `--max-size`: bytes, or with a K, M or G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("{s:?} is no size (e.g. 512K, 10M, 1G)")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is no size (e.g. 512K, 10M, 1G)"))?;
    match n.checked_mul(1 << shift) {
        Some(0) | None => Err(format!("{s:?}: the size must be at least one byte")),
        Some(b) => Ok(b),
    }
}

/// Where `--output` lines go.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub path: PathBuf,
    pub max_size: u64,
    /// Files kept, the live one included.
    pub max_files: u32,
}

/// An appending line writer that rotates FILE → FILE.1 → FILE.2 … before a line would take
/// FILE past `max_size`, keeping `max_files` files in all.
pub struct FlowLog {
    file: FileRotate<AppendCount>,
    size: u64,
    max_size: u64,
    path: PathBuf,
}

impl FlowLog {
    pub fn open(r: &Rotation) -> Result<FlowLog> {
        let path = std::path::absolute(&r.path)
            .with_context(|| format!("opening {}", r.path.display()))?;
        // Open it once ourselves: file-rotate keeps quiet about a file it cannot open (and
        // panics on a directory it cannot make), we want a clear error before monitoring.
        let probe = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let size = probe.metadata()?.len();
        drop(probe);
        let file = FileRotate::new(
            &path,
            AppendCount::new(r.max_files.saturating_sub(1) as usize),
            ContentLimit::None,
            Compression::None,
            None,
        );
        Ok(FlowLog {
            file,
            size,
            max_size: r.max_size,
            path,
        })
    }

    /// Appends `line` and a newline in one write.
    pub fn write_line(&mut self, line: &str) -> Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let what = || format!("writing {}", self.path.display());
        // A line longer than the limit still goes into a file of its own.
        if self.size > 0 && self.size + buf.len() as u64 > self.max_size {
            if !self.path.parent().is_some_and(|d| d.is_dir()) {
                // file-rotate would panic making it again.
                anyhow::bail!("{}: its directory is gone", what());
            }
            self.file.rotate().with_context(what)?;
            if !self.path.exists() {
                // file-rotate would write nowhere, silently.
                anyhow::bail!("{}: the file could not be reopened after rotation", what());
            }
            self.size = 0;
        }
        self.file.write_all(&buf).with_context(what)?;
        self.size += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use md_common::{CT_DIR_ORIGINAL, EVENT_DROP};

    fn ev(kind: u8, reason: u8) -> Event {
        Event {
            kind,
            reason,
            proto: 6,
            saddr: [172, 18, 0, 2],
            daddr: [192, 0, 2, 1],
            sport: 41234,
            dport: 8080,
            nat_addr: [172, 18, 0, 3],
            nat_port: 80,
            ..Event::default()
        }
    }

    fn ep(s: &str) -> (IpAddr, u16) {
        let a: std::net::SocketAddr = s.parse().unwrap();
        (a.ip(), a.port())
    }

    #[test]
    fn ipv6_events_and_endpoints() {
        let e = Event6 {
            kind: EVENT_NAT,
            reason: CT_KIND_SNAT,
            saddr: "fd00:1::2".parse::<Ipv6Addr>().unwrap().octets(),
            daddr: "2001:db8:1::2".parse::<Ipv6Addr>().unwrap().octets(),
            sport: 40000,
            dport: 80,
            nat_addr: "2001:db8:1::1".parse::<Ipv6Addr>().unwrap().octets(),
            nat_port: 61000,
            ..Event6::default()
        };
        let bytes = bytemuck::bytes_of(&e).to_vec();
        let f = parse_event(&bytes).unwrap();
        assert_eq!(endpoint(f.src), "[fd00:1::2]:40000");
        let t = translated6(&e, None);
        assert_eq!(t.src, ep("[2001:db8:1::1]:61000"));
        assert_eq!(t.dst, ep("[2001:db8:1::2]:80"));
        let v4 = bytemuck::bytes_of(&Event::default()).to_vec();
        assert!(parse_event(&v4).unwrap().src.0.is_ipv4());
        assert!(parse_event(&v4[..10]).is_none());
    }

    #[test]
    fn translation_follows_the_nat_kind() {
        let before = Tuple {
            src: ep("172.18.0.2:41234"),
            dst: ep("192.0.2.1:8080"),
        };
        assert_eq!(translated(&ev(EVENT_DROP, 1), None), before);
        let snat = translated(&ev(EVENT_NAT, CT_KIND_SNAT), None);
        assert_eq!(snat.src, ep("172.18.0.3:80"));
        assert_eq!(snat.dst, before.dst);
        let dnat = translated(&ev(EVENT_NAT, CT_KIND_DNAT), None);
        assert_eq!(dnat.src, before.src);
        assert_eq!(dnat.dst, ep("172.18.0.3:80"));

        // A hairpin's new source comes from the tracker; a plain DNAT entry changes nothing.
        let mut entry = CtEntry {
            nat_saddr: [172, 18, 0, 1],
            nat_daddr: [172, 18, 0, 3],
            nat_sport: 61111,
            nat_dport: 80,
            kind: CT_KIND_HAIRPIN,
            dir: CT_DIR_ORIGINAL,
            ..CtEntry::default()
        };
        for reason in [CT_KIND_DNAT, CT_KIND_HAIRPIN] {
            let h = translated(&ev(EVENT_NAT, reason), Some(&entry));
            assert_eq!(h.src, ep("172.18.0.1:61111"), "reason {reason}");
            assert_eq!(h.dst, ep("172.18.0.3:80"));
        }
        entry.kind = CT_KIND_DNAT;
        assert_eq!(
            translated(&ev(EVENT_NAT, CT_KIND_DNAT), Some(&entry)).src,
            before.src
        );
    }

    #[test]
    fn monotonic_timestamps_become_rfc3339_wall_clock() {
        let real = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        let t = wall_clock(10_000_000_000, 12_500_000_000, real);
        assert_eq!(real.duration_since(t).unwrap(), Duration::from_millis(2500));
        assert_eq!(rfc3339(t), "2026-05-28T20:26:37.500000000Z");
        // An event stamped after the clocks were read is not put in the future.
        assert_eq!(wall_clock(13_000_000_000, 12_500_000_000, real), real);
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("2048"), Ok(2048));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        for bad in ["", "0", "M", "10X", "-1", "1.5M", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "md-flowlog-{tag}-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn read(p: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn rotation_keeps_whole_lines_under_the_size_and_the_newest_files() {
        let dir = tempdir("rotate");
        let path = dir.join("flows.log");
        let r = Rotation {
            path: path.clone(),
            max_size: 100,
            max_files: 3,
        };
        let mut log = FlowLog::open(&r).unwrap();
        // 30-byte lines: three fit in 100 bytes, the fourth opens a new file.
        let lines: Vec<String> = (0..20)
            .map(|i| format!("{{\"n\":{i:02},\"pad\":\"xxxxxxxxxxxx\"}}"))
            .collect();
        assert!(lines.iter().all(|l| l.len() + 1 == 30));
        for l in &lines {
            log.write_line(l).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["flows.log", "flows.log.1", "flows.log.2"]);
        for n in &names {
            let size = std::fs::metadata(dir.join(n)).unwrap().len();
            assert!(size <= 100, "{n} has {size} bytes");
        }
        // Newest last: flows.log.2, flows.log.1, flows.log hold the last 8 lines in order.
        let kept: Vec<String> = ["flows.log.2", "flows.log.1", "flows.log"]
            .iter()
            .flat_map(|n| read(&dir.join(n)))
            .collect();
        assert_eq!(kept, lines[12..]);

        // Reopening appends to the live file and counts what is already there.
        drop(log);
        let mut log = FlowLog::open(&r).unwrap();
        log.write_line(&lines[0]).unwrap();
        assert_eq!(
            read(&path),
            [lines[18].clone(), lines[19].clone(), lines[0].clone()]
        );
        log.write_line(&lines[1]).unwrap();
        assert_eq!(read(&path), [lines[1].clone()]);
        assert_eq!(
            read(&dir.join("flows.log.1")),
            [lines[18].clone(), lines[19].clone(), lines[0].clone()]
        );

        // One file: rotation only truncates; a line longer than the limit still gets written.
        let one = dir.join("one.log");
        let mut log = FlowLog::open(&Rotation {
            path: one.clone(),
            max_size: 10,
            max_files: 1,
        })
        .unwrap();
        log.write_line("0123456789abcdef").unwrap();
        log.write_line("short").unwrap();
        assert_eq!(read(&one), ["short"]);
        assert!(!dir.join("one.log.1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_output_is_one_clear_error() {
        let dir = tempdir("bad");
        let err = FlowLog::open(&Rotation {
            path: dir.join("missing").join("flows.log"),
            max_size: 100,
            max_files: 2,
        })
        .err()
        .expect("a file in a missing directory cannot be opened");
        let msg = format!("{err:#}");
        assert!(msg.contains("missing/flows.log"), "{msg}");
        assert!(!dir.join("missing").exists(), "nothing was created");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
