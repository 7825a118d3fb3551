//! Address management: subnets and the lowest-free-address allocator.
//!
//! Allocation happens under the state lock, from the addresses recorded in the state, so an
//! address is never handed out twice however many `run` commands race.

use std::{
    collections::HashSet,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix_len: u8,
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self> {
        if !(1..=30).contains(&prefix_len) {
            bail!("prefix length /{prefix_len} leaves no room for containers (use /1 to /30)");
        }
        let network = Ipv4Addr::from(u32::from(addr) & Self::mask_of(prefix_len));
        Ok(Subnet {
            network,
            prefix_len,
        })
    }

    fn mask_of(prefix_len: u8) -> u32 {
        u32::MAX << (32 - prefix_len as u32)
    }

    pub fn mask(&self) -> u32 {
        Self::mask_of(self.prefix_len)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// The first usable address; md's bridge takes it.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// Lowest address that is not the network, gateway, broadcast or in `used`.
    #[cfg(test)]
    pub fn allocate(&self, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr> {
        self.allocate_in(None, self.gateway(), used)
    }

    /// Lowest address of `range` (`--ip-range`; the whole subnet when None) that is not the
    /// network, `gateway`, broadcast or in `used`.
    pub fn allocate_in(
        &self,
        range: Option<&Subnet>,
        gateway: Ipv4Addr,
        used: &HashSet<Ipv4Addr>,
    ) -> Result<Ipv4Addr> {
        let pool = range.unwrap_or(self);
        let first = u32::from(pool.network).max(u32::from(self.network) + 1);
        let last = u32::from(pool.broadcast()).min(u32::from(self.broadcast()) - 1);
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| *ip != gateway && !used.contains(ip))
            .with_context(|| match range {
                Some(r) => format!("ip range {r} of subnet {self} has no free address"),
                None => format!("subnet {self} has no free address"),
            })
    }

    /// Checks a requested static address.
    #[cfg(test)]
    pub fn check_static(&self, ip: Ipv4Addr, used: &HashSet<Ipv4Addr>) -> Result<()> {
        self.check_static_with(ip, self.gateway(), used)
    }

    /// Checks a requested static address against the subnet, its reserved addresses (network,
    /// `gateway`, broadcast) and the addresses in use. As in Docker, a static address may lie
    /// outside `--ip-range` (that is what ranges are for).
    pub fn check_static_with(
        &self,
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
        used: &HashSet<Ipv4Addr>,
    ) -> Result<()> {
        if !self.contains(ip) {
            bail!("address {ip} is outside subnet {self}");
        }
        if ip == self.network || ip == gateway || ip == self.broadcast() {
            bail!("address {ip} is reserved in subnet {self}");
        }
        if used.contains(&ip) {
            bail!("address {ip} is already in use");
        }
        Ok(())
    }

    /// Checks a `--gateway` for this subnet.
    pub fn check_gateway(&self, gw: Ipv4Addr) -> Result<()> {
        if !self.contains(gw) {
            bail!("gateway {gw} is outside subnet {self}");
        }
        if gw == self.network || gw == self.broadcast() {
            bail!("gateway {gw} is the network or broadcast address of subnet {self}");
        }
        Ok(())
    }

    /// Parses an `--ip-range` of this subnet: CIDR inside it, /32 at most.
    pub fn parse_range(&self, s: &str) -> Result<Subnet> {
        let (addr, len) = s
            .split_once('/')
            .with_context(|| format!("ip range {s:?} must be CIDR, like 172.20.5.0/24"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("ip range {s:?}: {addr:?} is not an IPv4 address"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| (1..=32).contains(l))
            .with_context(|| format!("ip range {s:?}: {len:?} is not a prefix length"))?;
        let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
        let range = Subnet {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix_len: len,
        };
        if len < self.prefix_len || !self.contains(range.network) {
            bail!("ip range {range} is not inside subnet {self}");
        }
        Ok(range)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .with_context(|| format!("subnet {s:?} must be CIDR, like 172.18.0.0/16"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("subnet {s:?}: {addr:?} is not an IPv4 address"))?;
        let len: u8 = len
            .parse()
            .with_context(|| format!("subnet {s:?}: {len:?} is not a prefix length"))?;
        Subnet::new(addr, len)
    }
}

/// An IPv6 subnet of a dual-stack network. The gateway is its first address (`::1`), the
/// containers get the next ones in order, as Docker allocates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet6 {
    pub network: Ipv6Addr,
    pub prefix_len: u8,
}

impl Subnet6 {
    pub fn new(addr: Ipv6Addr, prefix_len: u8) -> Result<Self> {
        if !(1..=126).contains(&prefix_len) {
            bail!(
                "IPv6 prefix length /{prefix_len} leaves no room for containers (use /1 to /126)"
            );
        }
        let network = Ipv6Addr::from(u128::from(addr) & Self::mask_of(prefix_len));
        if network.is_loopback() || network.is_multicast() || network.is_unspecified() {
            bail!("{network}/{prefix_len} is no subnet for containers");
        }
        Ok(Subnet6 {
            network,
            prefix_len,
        })
    }

    fn mask_of(prefix_len: u8) -> u128 {
        u128::MAX << (128 - prefix_len as u32)
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & Self::mask_of(self.prefix_len) == u128::from(self.network)
    }

    pub fn overlaps(&self, other: &Subnet6) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    pub fn gateway(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network) + 1)
    }

    fn last(&self) -> u128 {
        u128::from(self.network) | !Self::mask_of(self.prefix_len)
    }

    /// Lowest address after the gateway that is not in `used`.
    pub fn allocate(&self, used: &HashSet<Ipv6Addr>) -> Result<Ipv6Addr> {
        let first = u128::from(self.gateway()) + 1;
        let last = self.last();
        (first..=last)
            .take(used.len() + 1)
            .map(Ipv6Addr::from)
            .find(|ip| !used.contains(ip))
            .with_context(|| format!("subnet {self} has no free address"))
    }

    pub fn check_static(&self, ip: Ipv6Addr, used: &HashSet<Ipv6Addr>) -> Result<()> {
        if !self.contains(ip) {
            bail!("address {ip} is outside subnet {self}");
        }
        if ip == self.network || ip == self.gateway() {
            bail!("address {ip} is reserved in subnet {self}");
        }
        if used.contains(&ip) {
            bail!("address {ip} is already in use");
        }
        Ok(())
    }
}

impl fmt::Display for Subnet6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Subnet6 {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .with_context(|| format!("subnet {s:?} must be CIDR, like fd00:1::/64"))?;
        let addr: Ipv6Addr = addr
            .parse()
            .with_context(|| format!("subnet {s:?}: {addr:?} is not an IPv6 address"))?;
        let len: u8 = len
            .parse()
            .with_context(|| format!("subnet {s:?}: {len:?} is not a prefix length"))?;
        Subnet6::new(addr, len)
    }
}

/// The ULA /48 md takes IPv6 subnets from when none is given, as Docker 27 does: `fd` and 40
/// bits of a SHA-256 of a stable host id (RFC 4193's global ID). The same host always gets the
/// same prefix; another host almost surely another.
pub fn ula_base(host_id: &str) -> Ipv6Addr {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(host_id.as_bytes());
    let mut b = [0u8; 16];
    b[0] = 0xfd;
    b[1..6].copy_from_slice(&h[..5]);
    Ipv6Addr::from(b)
}

/// The host's stable id: systemd's machine id, else the hostname.
pub fn host_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "md".to_string())
}

/// The first /64 of the ULA /48 `base` that overlaps none of `taken`.
pub fn next_ula64(base: Ipv6Addr, taken: &[Subnet6]) -> Result<Subnet6> {
    (0u128..=0xffff)
        .map(|i| Subnet6 {
            network: Ipv6Addr::from(u128::from(base) | (i << 64)),
            prefix_len: 64,
        })
        .find(|s| !taken.iter().any(|t| t.overlaps(s)))
        .with_context(|| format!("no free /64 left in {base}/48; pass --subnet6"))
}

/// The MAC md gives a container interface: locally administered, derived from its address
/// (Docker's 02:42:<ip> scheme), so it is unique wherever the address is.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `--mac-address`: six hex octets separated by ':' (or '-'), a unicast address other
/// than all zeros (the kernel refuses the others for an interface).
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || format!("invalid MAC address {s:?}: six hex bytes like 02:42:ac:12:00:09");
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        bail!("{}", bad());
    }
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(&parts) {
        if p.len() != 2 {
            bail!("{}", bad());
        }
        *b = u8::from_str_radix(p, 16).with_context(bad)?;
    }
    if m[0] & 1 != 0 {
        bail!("MAC address {s} is a multicast address; a container's must be unicast");
    }
    if m == [0; 6] {
        bail!("MAC address {s} is all zeros");
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_describe() {
        let s: Subnet = "172.18.5.7/16".parse().unwrap();
        assert_eq!(s.to_string(), "172.18.0.0/16");
        assert_eq!(s.gateway(), Ipv4Addr::new(172, 18, 0, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(172, 18, 255, 255));
        assert!(s.contains(Ipv4Addr::new(172, 18, 200, 1)));
        assert!(!s.contains(Ipv4Addr::new(172, 19, 0, 1)));
        for bad in [
            "172.18.0.0",
            "172.18.0.0/33",
            "172.18.0/16",
            "x/8",
            "10.0.0.0/31",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn allocates_lowest_free_and_never_twice() {
        let s: Subnet = "10.9.0.0/29".parse().unwrap(); // .1 gateway, .2-.6 usable, .7 broadcast
        let mut used = HashSet::new();
        let mut got = Vec::new();
        for _ in 0..5 {
            let ip = s.allocate(&used).unwrap();
            assert!(used.insert(ip), "{ip} handed out twice");
            got.push(ip.octets()[3]);
        }
        assert_eq!(got, [2, 3, 4, 5, 6]);
        assert!(s.allocate(&used).is_err());
        used.remove(&Ipv4Addr::new(10, 9, 0, 4));
        assert_eq!(s.allocate(&used).unwrap(), Ipv4Addr::new(10, 9, 0, 4));
    }

    #[test]
    fn static_addresses_are_checked() {
        let s: Subnet = "10.9.0.0/24".parse().unwrap();
        let used: HashSet<_> = [Ipv4Addr::new(10, 9, 0, 5)].into();
        assert!(s.check_static(Ipv4Addr::new(10, 9, 0, 6), &used).is_ok());
        assert!(s.check_static(Ipv4Addr::new(10, 9, 0, 5), &used).is_err());
        assert!(s.check_static(Ipv4Addr::new(10, 9, 0, 1), &used).is_err());
        assert!(s.check_static(Ipv4Addr::new(10, 9, 1, 6), &used).is_err());
    }

    #[test]
    fn ranges_and_gateways() {
        let s: Subnet = "10.9.0.0/24".parse().unwrap();
        let r = s.parse_range("10.9.0.130/25").unwrap();
        assert_eq!(r.to_string(), "10.9.0.128/25");
        let none = HashSet::new();
        assert_eq!(
            s.allocate_in(Some(&r), s.gateway(), &none).unwrap(),
            Ipv4Addr::new(10, 9, 0, 128)
        );
        // The last address of the range is the subnet's broadcast: never handed out.
        let small = s.parse_range("10.9.0.254/31").unwrap();
        let used: HashSet<_> = [Ipv4Addr::new(10, 9, 0, 254)].into();
        assert!(s.allocate_in(Some(&small), s.gateway(), &used).is_err());
        // A gateway of its own: .1 is free for containers, the gateway is not.
        let gw = Ipv4Addr::new(10, 9, 0, 2);
        s.check_gateway(gw).unwrap();
        assert_eq!(
            s.allocate_in(None, gw, &none).unwrap(),
            Ipv4Addr::new(10, 9, 0, 1)
        );
        let used: HashSet<_> = [Ipv4Addr::new(10, 9, 0, 1)].into();
        assert_eq!(
            s.allocate_in(None, gw, &used).unwrap(),
            Ipv4Addr::new(10, 9, 0, 3)
        );
        assert!(s.check_static_with(gw, gw, &none).is_err());
        assert!(s
            .check_static_with(Ipv4Addr::new(10, 9, 0, 1), gw, &none)
            .is_ok());
        for bad in [
            "10.9.1.0/25",
            "10.9.0.0/16",
            "10.9.0.0",
            "x/25",
            "10.9.0.0/33",
        ] {
            assert!(s.parse_range(bad).is_err(), "{bad}");
        }
        for bad in ["10.9.0.0", "10.9.0.255", "10.9.1.1"] {
            assert!(s.check_gateway(bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlap() {
        let a: Subnet = "10.0.0.0/8".parse().unwrap();
        let b: Subnet = "10.5.0.0/16".parse().unwrap();
        let c: Subnet = "11.0.0.0/16".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
    }

    #[test]
    fn ipv6_subnets() {
        let s: Subnet6 = "2001:db8:5::7/64".parse().unwrap();
        assert_eq!(s.to_string(), "2001:db8:5::/64");
        assert_eq!(s.gateway(), "2001:db8:5::1".parse::<Ipv6Addr>().unwrap());
        let mut used = HashSet::new();
        let a = s.allocate(&used).unwrap();
        assert_eq!(a, "2001:db8:5::2".parse::<Ipv6Addr>().unwrap());
        used.insert(a);
        assert_eq!(
            s.allocate(&used).unwrap(),
            "2001:db8:5::3".parse::<Ipv6Addr>().unwrap()
        );
        assert!(s
            .check_static("2001:db8:5::1".parse().unwrap(), &used)
            .is_err());
        assert!(s
            .check_static("2001:db8:6::9".parse().unwrap(), &used)
            .is_err());
        assert!(s
            .check_static("2001:db8:5::9".parse().unwrap(), &used)
            .is_ok());
        for bad in [
            "2001:db8::",
            "2001:db8::/129",
            "10.0.0.0/8",
            "::1/128",
            "ff02::/16",
            "x/64",
        ] {
            assert!(bad.parse::<Subnet6>().is_err(), "{bad}");
        }
        let big: Subnet6 = "2001:db8::/32".parse().unwrap();
        assert!(big.overlaps(&s) && s.overlaps(&big));
        let tiny: Subnet6 = "2001:db8:5::/126".parse().unwrap();
        let full: HashSet<_> = ["2001:db8:5::2", "2001:db8:5::3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert!(tiny.allocate(&full).is_err());
    }

    #[test]
    fn ula_from_host_id() {
        let a = ula_base("host-a");
        assert_eq!(a, ula_base("host-a"), "stable");
        assert_ne!(a, ula_base("host-b"));
        assert_eq!(a.octets()[0], 0xfd);
        assert_eq!(&a.octets()[6..], &[0; 10]);
        let first = next_ula64(a, &[]).unwrap();
        assert_eq!((first.network, first.prefix_len), (a, 64));
        let second = next_ula64(a, &[first]).unwrap();
        assert_eq!(second.network.octets()[7], 1);
        assert!(!second.overlaps(&first));
    }

    #[test]
    fn macs_parse_and_print() {
        let m = parse_mac("02:42:AC:12:00:09").unwrap();
        assert_eq!(m, [0x02, 0x42, 0xac, 0x12, 0x00, 0x09]);
        assert_eq!(format_mac(&m), "02:42:ac:12:00:09");
        assert_eq!(parse_mac("02-42-ac-12-00-09").unwrap(), m);
        for bad in [
            "",
            "02:42:ac:12:00",
            "02:42:ac:12:00:09:01",
            "02:42:ac:12:00:zz",
            "2:42:ac:12:00:09",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mac_from_ip() {
        assert_eq!(
            mac_for(Ipv4Addr::new(172, 18, 0, 2)),
            [0x02, 0x42, 172, 18, 0, 2]
        );
    }
}
