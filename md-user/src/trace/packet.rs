//! The packets a trace sends: built from scratch with their checksums (RFC 1071), parsed back
//! for display after each program rewrote them, and turned around into the answer the
//! destination would send. Pure byte work, unit-tested without root.

use std::{fmt, net::Ipv4Addr};

use md_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use serde::Serialize;

pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_HLEN: usize = 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;

/// What a trace's UDP datagrams and echo requests carry.
const PAYLOAD: &[u8] = b"md-trace";
/// The IP identification of every packet a trace makes.
const IP_ID: u16 = 0x4d44;

/// The transport part of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "proto", rename_all = "lowercase")]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        #[serde(rename = "type")]
        typ: u8,
        code: u8,
        /// Echo identifier and sequence (0 for errors).
        id: u16,
        seq: u16,
    },
    Other {
        number: u8,
    },
}

/// The headers of an Ethernet/IPv4 frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    pub eth_src: Mac,
    pub eth_dst: Mac,
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub ttl: u8,
    pub l4: L4,
}

pub fn mac_str(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn tcp_flags_str(f: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (TCP_SYN, 'S'),
        (TCP_ACK, '.'),
        (TCP_FIN, 'F'),
        (TCP_RST, 'R'),
        (0x08, 'P'),
    ] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    s
}

impl L4 {
    pub fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Icmp { .. } => IPPROTO_ICMP,
            L4::Other { number } => *number,
        }
    }

    /// Source and destination ports (TCP, UDP); None otherwise.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match *self {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => Some((sport, dport)),
            _ => None,
        }
    }
}

impl Headers {
    /// `ip:port` of the source (just `ip` without ports).
    pub fn src(&self) -> String {
        match self.l4.ports() {
            Some((s, _)) => format!("{}:{s}", self.saddr),
            None => self.saddr.to_string(),
        }
    }

    pub fn dst(&self) -> String {
        match self.l4.ports() {
            Some((_, d)) => format!("{}:{d}", self.daddr),
            None => self.daddr.to_string(),
        }
    }

    /// What the packet is beyond its addresses: `tcp [S]`, `udp`, `icmp echo id 7`.
    pub fn what(&self) -> String {
        match self.l4 {
            L4::Tcp { flags, .. } => format!("tcp [{}]", tcp_flags_str(flags)),
            L4::Udp { .. } => "udp".into(),
            L4::Icmp { typ, code, id, .. } => match typ {
                ICMP_ECHO => format!("icmp echo id {id}"),
                ICMP_ECHO_REPLY => format!("icmp echo-reply id {id}"),
                ICMP_DEST_UNREACH => format!("icmp unreachable code {code}"),
                t => format!("icmp type {t} code {code}"),
            },
            L4::Other { number } => format!("ip proto {number}"),
        }
    }
}

impl fmt::Display for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} > {}  {} > {}  {} ttl {}",
            mac_str(&self.eth_src),
            mac_str(&self.eth_dst),
            self.src(),
            self.dst(),
            self.what(),
            self.ttl
        )
    }
}

/// The Internet checksum (RFC 1071) of `data`, folded and inverted.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

fn sum(data: &[u8]) -> u32 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s = s.wrapping_add(w as u32);
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn pseudo_sum(saddr: Ipv4Addr, daddr: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&saddr.octets());
    p.extend_from_slice(&daddr.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    sum(&p)
}

/// The L4 header and payload of `h` with its checksum.
fn l4_bytes(h: &Headers, payload: &[u8]) -> Vec<u8> {
    let mut b = match h.l4 {
        L4::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
        } => {
            let mut t = Vec::with_capacity(20);
            t.extend_from_slice(&sport.to_be_bytes());
            t.extend_from_slice(&dport.to_be_bytes());
            t.extend_from_slice(&seq.to_be_bytes());
            t.extend_from_slice(&ack.to_be_bytes());
            t.extend_from_slice(&[5 << 4, flags]);
            t.extend_from_slice(&64240u16.to_be_bytes());
            t.extend_from_slice(&[0, 0, 0, 0]);
            t
        }
        L4::Udp { sport, dport } => {
            let mut u = Vec::with_capacity(8);
            u.extend_from_slice(&sport.to_be_bytes());
            u.extend_from_slice(&dport.to_be_bytes());
            u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            u
        }
        L4::Icmp { typ, code, id, seq } => {
            let mut i = vec![typ, code, 0, 0];
            i.extend_from_slice(&id.to_be_bytes());
            i.extend_from_slice(&seq.to_be_bytes());
            i
        }
        L4::Other { .. } => Vec::new(),
    };
    b.extend_from_slice(payload);
    match h.l4 {
        L4::Tcp { .. } => {
            let c = !fold(pseudo_sum(h.saddr, h.daddr, IPPROTO_TCP, b.len()) + sum(&b));
            b[16..18].copy_from_slice(&c.to_be_bytes());
        }
        L4::Udp { .. } => {
            let mut c = !fold(pseudo_sum(h.saddr, h.daddr, IPPROTO_UDP, b.len()) + sum(&b));
            if c == 0 {
                c = 0xffff;
            }
            b[6..8].copy_from_slice(&c.to_be_bytes());
        }
        L4::Icmp { .. } => {
            let c = checksum(&b);
            b[2..4].copy_from_slice(&c.to_be_bytes());
        }
        L4::Other { .. } => {}
    }
    b
}

/// An Ethernet/IPv4 frame with `h`'s headers and `payload` after the L4 header (for an ICMP
/// error: the quoted packet).
pub fn build_with(h: &Headers, payload: &[u8]) -> Vec<u8> {
    let l4 = l4_bytes(h, payload);
    let mut f = Vec::with_capacity(ETH_HLEN + IP_HLEN + l4.len());
    f.extend_from_slice(&h.eth_dst);
    f.extend_from_slice(&h.eth_src);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let mut ip = [0u8; IP_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_HLEN + l4.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&IP_ID.to_be_bytes());
    // Don't fragment, as Linux sends TCP and small datagrams.
    ip[6] = 0x40;
    ip[8] = h.ttl;
    ip[9] = h.l4.proto();
    ip[12..16].copy_from_slice(&h.saddr.octets());
    ip[16..20].copy_from_slice(&h.daddr.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// The frame a sender would put on the wire for `h`: a SYN carries nothing, a datagram or an
/// echo request a short payload.
pub fn build(h: &Headers) -> Vec<u8> {
    let payload: &[u8] = match h.l4 {
        L4::Udp { .. } | L4::Icmp { .. } => PAYLOAD,
        _ => &[],
    };
    build_with(h, payload)
}

/// Parses an Ethernet/IPv4 frame's headers; None for anything else.
pub fn parse(f: &[u8]) -> Option<Headers> {
    if f.len() < ETH_HLEN + IP_HLEN || u16::from_be_bytes([f[12], f[13]]) != ETH_P_IP {
        return None;
    }
    let mac = |o: usize| -> Mac { f[o..o + 6].try_into().unwrap() };
    let ip = &f[ETH_HLEN..];
    if ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ihl < IP_HLEN || ip.len() < ihl {
        return None;
    }
    let l4 = &ip[ihl..];
    let be16 = |b: &[u8], o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let l4 = match ip[9] {
        IPPROTO_TCP if l4.len() >= 20 => L4::Tcp {
            sport: be16(l4, 0),
            dport: be16(l4, 2),
            seq: be32(l4, 4),
            ack: be32(l4, 8),
            flags: l4[13],
        },
        IPPROTO_UDP if l4.len() >= 8 => L4::Udp {
            sport: be16(l4, 0),
            dport: be16(l4, 2),
        },
        IPPROTO_ICMP if l4.len() >= 8 => L4::Icmp {
            typ: l4[0],
            code: l4[1],
            id: be16(l4, 4),
            seq: be16(l4, 6),
        },
        n => L4::Other { number: n },
    };
    Some(Headers {
        eth_src: mac(6),
        eth_dst: mac(0),
        saddr: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        daddr: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ttl: ip[8],
        l4,
    })
}

/// Whether the IPv4 header checksum and the L4 checksum (TCP, UDP unless 0, ICMP) of an
/// Ethernet/IPv4 frame are right.
pub fn checksums_ok(f: &[u8]) -> bool {
    if f.len() < ETH_HLEN + IP_HLEN {
        return false;
    }
    let ip = &f[ETH_HLEN..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ihl < IP_HLEN || tot < ihl || ip.len() < tot || fold(sum(&ip[..ihl])) != 0xffff {
        return false;
    }
    let saddr = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let daddr = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..tot];
    match ip[9] {
        IPPROTO_TCP => fold(pseudo_sum(saddr, daddr, IPPROTO_TCP, l4.len()) + sum(l4)) == 0xffff,
        IPPROTO_UDP if l4.len() >= 8 && l4[6..8] == [0, 0] => true,
        IPPROTO_UDP => fold(pseudo_sum(saddr, daddr, IPPROTO_UDP, l4.len()) + sum(l4)) == 0xffff,
        IPPROTO_ICMP => fold(sum(l4)) == 0xffff,
        _ => true,
    }
}

/// Rewrites a frame's MAC addresses (what a bridge or the host's routing does) and, when
/// `routed`, decrements the TTL with the header checksum fixed.
pub fn relink(f: &mut [u8], src: Mac, dst: Mac, routed: bool) {
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    if routed && f.len() >= ETH_HLEN + IP_HLEN {
        let ip = &mut f[ETH_HLEN..ETH_HLEN + IP_HLEN];
        ip[8] = ip[8].saturating_sub(1);
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

/// The sequence number a trace's answers start with.
const ANSWER_ISN: u32 = 0x6d64_0000;

/// The answer a destination gives to `got` (as it received it) when it accepts it: a SYN-ACK,
/// a datagram back, an echo reply. MACs are left for the caller to fill in. None when `got`
/// asks for no answer.
pub fn answer(got: &Headers) -> Option<Headers> {
    let l4 = match got.l4 {
        L4::Tcp {
            sport,
            dport,
            seq,
            flags,
            ..
        } if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 => L4::Tcp {
            sport: dport,
            dport: sport,
            seq: ANSWER_ISN,
            ack: seq.wrapping_add(1),
            flags: TCP_SYN | TCP_ACK,
        },
        L4::Udp { sport, dport } => L4::Udp {
            sport: dport,
            dport: sport,
        },
        L4::Icmp {
            typ: ICMP_ECHO,
            id,
            seq,
            ..
        } => L4::Icmp {
            typ: ICMP_ECHO_REPLY,
            code: 0,
            id,
            seq,
        },
        _ => return None,
    };
    Some(Headers {
        eth_src: got.eth_dst,
        eth_dst: got.eth_src,
        saddr: got.daddr,
        daddr: got.saddr,
        ttl: 64,
        l4,
    })
}

/// The answer of a destination where nothing listens: a RST for TCP, an ICMP port unreachable
/// quoting the datagram for UDP. Returns the headers and the payload to build them with.
pub fn refusal(got_frame: &[u8]) -> Option<(Headers, Vec<u8>)> {
    let got = parse(got_frame)?;
    match got.l4 {
        L4::Tcp {
            sport, dport, seq, ..
        } => Some((
            Headers {
                eth_src: got.eth_dst,
                eth_dst: got.eth_src,
                saddr: got.daddr,
                daddr: got.saddr,
                ttl: 64,
                l4: L4::Tcp {
                    sport: dport,
                    dport: sport,
                    seq: 0,
                    ack: seq.wrapping_add(1),
                    flags: TCP_RST | TCP_ACK,
                },
            },
            Vec::new(),
        )),
        L4::Udp { .. } => {
            let ip = &got_frame[ETH_HLEN..];
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            let quote = ip[..(ihl + 8).min(ip.len())].to_vec();
            Some((
                Headers {
                    eth_src: got.eth_dst,
                    eth_dst: got.eth_src,
                    saddr: got.daddr,
                    daddr: got.saddr,
                    ttl: 64,
                    l4: L4::Icmp {
                        typ: ICMP_DEST_UNREACH,
                        code: ICMP_PORT_UNREACH,
                        id: 0,
                        seq: 0,
                    },
                },
                quote,
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn() -> Headers {
        Headers {
            eth_src: [2, 0x42, 172, 18, 0, 2],
            eth_dst: [0x0e, 0x6d, 0, 0, 0, 1],
            saddr: Ipv4Addr::new(172, 18, 0, 2),
            daddr: Ipv4Addr::new(192, 0, 2, 1),
            ttl: 64,
            l4: L4::Tcp {
                sport: 40000,
                dport: 8080,
                seq: 1000,
                ack: 0,
                flags: TCP_SYN,
            },
        }
    }

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        let udp = Headers {
            l4: L4::Udp {
                sport: 40001,
                dport: 53,
            },
            ..syn()
        };
        let echo = Headers {
            l4: L4::Icmp {
                typ: ICMP_ECHO,
                code: 0,
                id: 77,
                seq: 1,
            },
            ..syn()
        };
        for h in [syn(), udp, echo] {
            let f = build(&h);
            assert_eq!(parse(&f), Some(h));
            assert!(checksums_ok(&f), "{h}");
        }
    }

    #[test]
    fn a_checksum_catches_a_changed_byte() {
        let mut f = build(&syn());
        f[ETH_HLEN + 12] ^= 1;
        assert!(!checksums_ok(&f));
        // The known header of RFC 1071's worked example sums to 0xffff with its checksum.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0);
    }

    #[test]
    fn relink_routes_one_hop() {
        let mut f = build(&syn());
        relink(&mut f, [1; 6], [2; 6], true);
        let h = parse(&f).unwrap();
        assert_eq!((h.eth_src, h.eth_dst, h.ttl), ([1; 6], [2; 6], 63));
        assert!(checksums_ok(&f));
    }

    #[test]
    fn answers_turn_the_packet_around() {
        let a = answer(&syn()).unwrap();
        assert_eq!((a.saddr, a.daddr), (syn().daddr, syn().saddr));
        assert_eq!((a.eth_src, a.eth_dst), (syn().eth_dst, syn().eth_src));
        assert_eq!(
            a.l4,
            L4::Tcp {
                sport: 8080,
                dport: 40000,
                seq: ANSWER_ISN,
                ack: 1001,
                flags: TCP_SYN | TCP_ACK
            }
        );
        let echo = Headers {
            l4: L4::Icmp {
                typ: ICMP_ECHO,
                code: 0,
                id: 9,
                seq: 3,
            },
            ..syn()
        };
        assert_eq!(
            answer(&echo).unwrap().l4,
            L4::Icmp {
                typ: ICMP_ECHO_REPLY,
                code: 0,
                id: 9,
                seq: 3
            }
        );
        let synack = answer(&syn()).unwrap();
        assert_eq!(answer(&synack), None, "a SYN-ACK asks for no answer here");
    }

    #[test]
    fn refusals_are_a_rst_or_a_port_unreachable_quoting_the_datagram() {
        let (rst, payload) = refusal(&build(&syn())).unwrap();
        assert!(payload.is_empty());
        assert!(matches!(rst.l4, L4::Tcp { flags, ack: 1001, .. } if flags == TCP_RST | TCP_ACK));
        let udp = Headers {
            l4: L4::Udp {
                sport: 40001,
                dport: 9999,
            },
            ..syn()
        };
        let got = build(&udp);
        let (err, quote) = refusal(&got).unwrap();
        assert_eq!(quote, got[ETH_HLEN..ETH_HLEN + 28].to_vec());
        let f = build_with(&err, &quote);
        assert!(checksums_ok(&f));
        assert_eq!(parse(&f).unwrap().what(), "icmp unreachable code 3");
    }
}
