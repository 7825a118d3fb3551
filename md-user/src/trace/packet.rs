//! The packets a trace sends: built with their checksums, parsed back (and their checksums
//! checked) after each program rewrote them, and turned around into the answer the destination
//! would send. The bytes are etherparse's work; unit-tested without root.

use std::{fmt, net::Ipv4Addr};

use etherparse::{
    Ethernet2Slice, IpHeaders, IpNumber, Ipv4Header, Ipv4HeaderSlice, Ipv4Slice, LinkSlice,
    NetSlice, PacketBuilder, SlicedPacket, TransportSlice,
};
use md_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use serde::Serialize;

pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;

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

/// An Ethernet/IPv4 frame with `h`'s headers and `payload` after the L4 header (for an ICMP
/// error: the quoted packet), every checksum computed (etherparse's packet builder).
pub fn build_with(h: &Headers, payload: &[u8]) -> Vec<u8> {
    let mut ip = Ipv4Header::new(
        0,
        h.ttl,
        IpNumber(h.l4.proto()),
        h.saddr.octets(),
        h.daddr.octets(),
    )
    .expect("an empty payload fits");
    ip.identification = IP_ID;
    // Don't fragment, as Linux sends TCP and small datagrams.
    ip.dont_fragment = true;
    let b =
        PacketBuilder::ethernet2(h.eth_src, h.eth_dst).ip(IpHeaders::Ipv4(ip, Default::default()));
    let mut out = Vec::new();
    let written = match h.l4 {
        L4::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
        } => {
            let mut t = b.tcp(sport, dport, seq, 64240);
            if flags & TCP_SYN != 0 {
                t = t.syn();
            }
            if flags & TCP_ACK != 0 {
                t = t.ack(ack);
            }
            if flags & TCP_RST != 0 {
                t = t.rst();
            }
            if flags & TCP_FIN != 0 {
                t = t.fin();
            }
            t.write(&mut out, payload)
        }
        L4::Udp { sport, dport } => b.udp(sport, dport).write(&mut out, payload),
        L4::Icmp { typ, code, id, seq } => {
            let [i0, i1] = id.to_be_bytes();
            let [s0, s1] = seq.to_be_bytes();
            b.icmpv4_raw(typ, code, [i0, i1, s0, s1])
                .write(&mut out, payload)
        }
        L4::Other { .. } => return out,
    };
    written.expect("a small frame serializes");
    out
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

fn sliced(
    f: &[u8],
) -> Option<(
    Ethernet2Slice<'_>,
    Ipv4Slice<'_>,
    Option<TransportSlice<'_>>,
)> {
    let p = SlicedPacket::from_ethernet(f).ok()?;
    match (p.link, p.net) {
        (Some(LinkSlice::Ethernet2(eth)), Some(NetSlice::Ipv4(ip))) => Some((eth, ip, p.transport)),
        _ => None,
    }
}

/// Parses an Ethernet/IPv4 frame's headers; None for anything else.
pub fn parse(f: &[u8]) -> Option<Headers> {
    let (eth, ip, transport) = sliced(f)?;
    let hdr = ip.header();
    let l4 = match transport {
        Some(TransportSlice::Tcp(t)) => L4::Tcp {
            sport: t.source_port(),
            dport: t.destination_port(),
            seq: t.sequence_number(),
            ack: t.acknowledgment_number(),
            flags: t.header_slice()[13],
        },
        Some(TransportSlice::Udp(u)) => L4::Udp {
            sport: u.source_port(),
            dport: u.destination_port(),
        },
        Some(TransportSlice::Icmpv4(i)) => {
            let b = i.bytes5to8();
            L4::Icmp {
                typ: i.type_u8(),
                code: i.code_u8(),
                id: u16::from_be_bytes([b[0], b[1]]),
                seq: u16::from_be_bytes([b[2], b[3]]),
            }
        }
        _ => L4::Other {
            number: hdr.protocol().0,
        },
    };
    Some(Headers {
        eth_src: eth.source(),
        eth_dst: eth.destination(),
        saddr: hdr.source_addr(),
        daddr: hdr.destination_addr(),
        ttl: hdr.ttl(),
        l4,
    })
}

/// Whether the IPv4 header checksum and the L4 checksum (TCP, UDP unless 0, ICMP) of an
/// Ethernet/IPv4 frame are right.
pub fn checksums_ok(f: &[u8]) -> bool {
    let Some((_, ip, transport)) = sliced(f) else {
        return false;
    };
    let hdr = ip.header();
    if hdr.to_header().calc_header_checksum() != hdr.header_checksum() {
        return false;
    }
    let (src, dst) = (hdr.source(), hdr.destination());
    match transport {
        Some(TransportSlice::Tcp(t)) => t.calc_checksum_ipv4(src, dst).ok() == Some(t.checksum()),
        Some(TransportSlice::Udp(u)) => {
            u.checksum() == 0
                || u.to_header()
                    .calc_checksum_ipv4_raw(src, dst, u.payload())
                    .ok()
                    == Some(u.checksum())
        }
        Some(TransportSlice::Icmpv4(i)) => {
            i.header().icmp_type.calc_checksum(i.payload()) == i.checksum()
        }
        _ => true,
    }
}

/// Rewrites a frame's MAC addresses (what a bridge or the host's routing does) and, when
/// `routed`, decrements the TTL with the header checksum fixed.
pub fn relink(f: &mut [u8], src: Mac, dst: Mac, routed: bool) {
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    if !routed {
        return;
    }
    let Ok(hdr) = Ipv4HeaderSlice::from_slice(&f[ETH_HLEN..]) else {
        return;
    };
    let mut hdr = hdr.to_header();
    hdr.time_to_live = hdr.time_to_live.saturating_sub(1);
    hdr.header_checksum = hdr.calc_header_checksum();
    let bytes = hdr.to_bytes();
    f[ETH_HLEN..ETH_HLEN + bytes.len()].copy_from_slice(&bytes);
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
        for h in [syn(), answer(&syn()).unwrap()] {
            let good = build(&h);
            // Source address (IP header and TCP pseudo-header), a port, the TCP checksum.
            for at in [ETH_HLEN + 12, ETH_HLEN + 20, ETH_HLEN + 36] {
                let mut f = good.clone();
                f[at] ^= 1;
                assert!(!checksums_ok(&f), "{h}: byte {at} changed");
            }
        }
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
