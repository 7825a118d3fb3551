//! A tiny packet builder and checker for BPF_PROG_TEST_RUN tests: Ethernet + IPv4 (with
//! options) + TCP, UDP or ICMP, and ARP.
//!
//! Checksums are computed here from scratch (RFC 1071), independently of md's datapath, so a
//! test can tell whether the datapath's incremental updates are right: an output packet is
//! correct when every checksum in it equals a recomputation over its bytes.

/// An IPv4 address as it appears on the wire.
pub type Ip4 = [u8; 4];
pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PORT_UNREACH: u8 = 3;

/// IP flags/fragment offset field: more fragments.
pub const IP_MF: u16 = 0x2000;
/// IP flags/fragment offset field: don't fragment.
pub const IP_DF: u16 = 0x4000;

// ---------------------------------------------------------------------------------------------
// RFC 1071

/// Adds `data` to a running one's-complement sum as big-endian 16-bit words (an odd last byte
/// is padded with zero). The result is not folded.
pub fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

/// Folds a running sum into 16 bits (end-around carry).
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` (RFC 1071): the complement of the folded sum.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// The TCP/UDP pseudo-header sum (RFC 793/768): addresses, protocol, L4 length.
pub fn pseudo_sum(saddr: Ip4, daddr: Ip4, proto: u8, l4_len: usize) -> u64 {
    let mut acc = sum16(&saddr, 0);
    acc = sum16(&daddr, acc);
    acc += u64::from(proto);
    acc + l4_len as u64
}

/// TCP or UDP checksum over the pseudo-header and `segment` (whose checksum field must be
/// zero). For UDP a result of 0 is sent as 0xffff (RFC 768).
pub fn l4_checksum(saddr: Ip4, daddr: Ip4, proto: u8, segment: &[u8]) -> u16 {
    let c = !fold(sum16(
        segment,
        pseudo_sum(saddr, daddr, proto, segment.len()),
    ));
    if proto == IPPROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

// ---------------------------------------------------------------------------------------------
// Building

/// The transport part of a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
    },
    Udp {
        sport: u16,
        dport: u16,
        /// Send 0 ("no checksum") instead of the real checksum.
        no_csum: bool,
    },
    /// ICMP: type, code and the 4 bytes after the checksum (echo: identifier, sequence).
    Icmp { typ: u8, code: u8, rest: [u8; 4] },
    /// Raw bytes after the IP header, sent as they are (no checksum computed); the header says
    /// TCP (e.g. a non-first fragment).
    Raw(Vec<u8>),
    /// The same with another protocol number in the IP header.
    RawProto(u8, Vec<u8>),
}

/// An Ethernet/IPv4 packet description; [`Ipv4Pkt::build`] makes the bytes.
#[derive(Clone, Debug)]
pub struct Ipv4Pkt {
    pub eth_dst: Mac,
    pub eth_src: Mac,
    pub saddr: Ip4,
    pub daddr: Ip4,
    pub ttl: u8,
    pub id: u16,
    /// Flags and fragment offset (in 8-byte units), as in the header.
    pub frag: u16,
    /// IP options, a multiple of 4 bytes.
    pub options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Ipv4Pkt {
    fn new(saddr: Ip4, daddr: Ip4, l4: L4) -> Self {
        Ipv4Pkt {
            eth_dst: [0x02, 0, 0, 0, 0, 0xd0],
            eth_src: [0x02, 0, 0, 0, 0, 0x50],
            saddr,
            daddr,
            ttl: 64,
            id: 0x1c46,
            frag: IP_DF,
            options: Vec::new(),
            l4,
            payload: Vec::new(),
        }
    }

    pub fn tcp(saddr: Ip4, sport: u16, daddr: Ip4, dport: u16, flags: u8) -> Self {
        let ack = if flags & TCP_ACK != 0 { 0x0102_0304 } else { 0 };
        Self::new(
            saddr,
            daddr,
            L4::Tcp {
                sport,
                dport,
                flags,
                seq: 0x1111_2222,
                ack,
            },
        )
    }

    pub fn udp(saddr: Ip4, sport: u16, daddr: Ip4, dport: u16) -> Self {
        Self::new(
            saddr,
            daddr,
            L4::Udp {
                sport,
                dport,
                no_csum: false,
            },
        )
        .payload(b"md udp test payload")
    }

    pub fn icmp(saddr: Ip4, daddr: Ip4, typ: u8, code: u8, rest: [u8; 4]) -> Self {
        Self::new(saddr, daddr, L4::Icmp { typ, code, rest })
    }

    /// ICMP echo request with identifier `id`.
    pub fn echo(saddr: Ip4, daddr: Ip4, id: u16, seq: u16) -> Self {
        let (i, s) = (id.to_be_bytes(), seq.to_be_bytes());
        Self::icmp(saddr, daddr, ICMP_ECHO, 0, [i[0], i[1], s[0], s[1]])
            .payload(b"md ping payload!")
    }

    /// ICMP echo reply with identifier `id`.
    pub fn echo_reply(saddr: Ip4, daddr: Ip4, id: u16, seq: u16) -> Self {
        let (i, s) = (id.to_be_bytes(), seq.to_be_bytes());
        Self::icmp(saddr, daddr, ICMP_ECHO_REPLY, 0, [i[0], i[1], s[0], s[1]])
            .payload(b"md ping payload!")
    }

    /// An ICMP error (`typ`/`code`) quoting `quoted` (an IP datagram, no Ethernet header).
    pub fn icmp_error(saddr: Ip4, daddr: Ip4, typ: u8, code: u8, quoted: &[u8]) -> Self {
        Self::icmp(saddr, daddr, typ, code, [0; 4]).payload(quoted)
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn macs(mut self, src: Mac, dst: Mac) -> Self {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    pub fn options(mut self, opts: &[u8]) -> Self {
        assert!(
            opts.len().is_multiple_of(4) && opts.len() <= 40,
            "bad IP options"
        );
        self.options = opts.to_vec();
        self
    }

    pub fn frag(mut self, frag: u16) -> Self {
        self.frag = frag;
        self
    }

    /// TCP only: the sequence and acknowledgement numbers.
    pub fn seq_ack(mut self, seq_no: u32, ack_no: u32) -> Self {
        match &mut self.l4 {
            L4::Tcp { seq, ack, .. } => {
                *seq = seq_no;
                *ack = ack_no;
            }
            _ => panic!("seq_ack on a non-TCP packet"),
        }
        self
    }

    /// UDP only: send checksum 0 ("none").
    pub fn no_udp_csum(mut self) -> Self {
        match &mut self.l4 {
            L4::Udp { no_csum, .. } => *no_csum = true,
            _ => panic!("no_udp_csum on a non-UDP packet"),
        }
        self
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Icmp { .. } => IPPROTO_ICMP,
            // Raw: the caller decides; TCP is the common case (e.g. a non-first fragment).
            L4::Raw(_) => IPPROTO_TCP,
            L4::RawProto(p, _) => p,
        }
    }

    /// The L4 header and payload with every checksum computed.
    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
            } => {
                let mut h = Vec::with_capacity(20);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&ack.to_be_bytes());
                h.push(5 << 4); // data offset 5 words
                h.push(*flags);
                h.extend_from_slice(&64240u16.to_be_bytes()); // window
                h.extend_from_slice(&[0, 0]); // checksum
                h.extend_from_slice(&[0, 0]); // urgent pointer
                h
            }
            L4::Udp { sport, dport, .. } => {
                let len = (8 + self.payload.len()) as u16;
                let mut h = Vec::with_capacity(8);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h
            }
            L4::Icmp { typ, code, rest } => {
                let mut h = vec![*typ, *code, 0, 0];
                h.extend_from_slice(rest);
                h
            }
            L4::Raw(b) | L4::RawProto(_, b) => b.clone(),
        };
        l4.extend_from_slice(&self.payload);
        match &self.l4 {
            L4::Tcp { .. } => {
                let c = l4_checksum(self.saddr, self.daddr, IPPROTO_TCP, &l4);
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp { no_csum, .. } => {
                if !no_csum {
                    let c = l4_checksum(self.saddr, self.daddr, IPPROTO_UDP, &l4);
                    l4[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            L4::Icmp { .. } => {
                let c = checksum(&l4);
                l4[2..4].copy_from_slice(&c.to_be_bytes());
            }
            L4::Raw(_) | L4::RawProto(..) => {}
        }
        l4
    }

    /// The IP datagram (no Ethernet header), checksums computed.
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let ihl = 20 + self.options.len();
        let total = (ihl + l4.len()) as u16;
        let mut ip = Vec::with_capacity(ihl + l4.len());
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(0); // DSCP/ECN
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.saddr);
        ip.extend_from_slice(&self.daddr);
        ip.extend_from_slice(&self.options);
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip
    }

    /// The Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let mut f = eth_header(self.eth_dst, self.eth_src, ETH_P_IP);
        f.extend_from_slice(&self.ip_bytes());
        f
    }
}

pub fn eth_header(dst: Mac, src: Mac, proto: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&proto.to_be_bytes());
    f
}

/// An Ethernet/IPv4 ARP request: `sha`/`spa` asking for `tpa`, sent from `eth_src`.
pub fn arp_request(eth_src: Mac, sha: Mac, spa: Ip4, tpa: Ip4) -> Vec<u8> {
    let mut f = eth_header([0xff; 6], eth_src, ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f
}

/// A minimal IPv6/UDP frame (md does not handle IPv6; containers may not send it).
pub fn ipv6_udp(eth_src: Mac, eth_dst: Mac) -> Vec<u8> {
    let mut f = eth_header(eth_dst, eth_src, ETH_P_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, IPPROTO_UDP, 64]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
    f
}

// ---------------------------------------------------------------------------------------------
// Reading and checking

/// A read-only view of an Ethernet/IPv4 frame.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub frame: &'a [u8],
}

impl<'a> View<'a> {
    /// Panics unless `frame` is Ethernet + a complete IPv4 header.
    #[track_caller]
    pub fn new(frame: &'a [u8]) -> Self {
        assert!(
            frame.len() >= ETH_HLEN + 20,
            "frame too short: {frame:02x?}"
        );
        assert_eq!(
            u16::from_be_bytes([frame[12], frame[13]]),
            ETH_P_IP,
            "not IPv4"
        );
        let v = View { frame };
        assert!(v.ihl() >= 20 && frame.len() >= ETH_HLEN + v.total_len());
        v
    }

    pub fn eth_dst(&self) -> Mac {
        self.frame[0..6].try_into().unwrap()
    }
    pub fn eth_src(&self) -> Mac {
        self.frame[6..12].try_into().unwrap()
    }
    pub fn ip(&self) -> &'a [u8] {
        &self.frame[ETH_HLEN..ETH_HLEN + self.total_len()]
    }
    pub fn ihl(&self) -> usize {
        usize::from(self.frame[ETH_HLEN] & 0x0f) * 4
    }
    pub fn total_len(&self) -> usize {
        usize::from(u16::from_be_bytes([
            self.frame[ETH_HLEN + 2],
            self.frame[ETH_HLEN + 3],
        ]))
    }
    pub fn proto(&self) -> u8 {
        self.frame[ETH_HLEN + 9]
    }
    pub fn saddr(&self) -> Ip4 {
        self.ip()[12..16].try_into().unwrap()
    }
    pub fn daddr(&self) -> Ip4 {
        self.ip()[16..20].try_into().unwrap()
    }
    /// The L4 header and payload.
    pub fn l4(&self) -> &'a [u8] {
        &self.ip()[self.ihl()..]
    }
    fn be16(b: &[u8], off: usize) -> u16 {
        u16::from_be_bytes([b[off], b[off + 1]])
    }
    pub fn sport(&self) -> u16 {
        Self::be16(self.l4(), 0)
    }
    pub fn dport(&self) -> u16 {
        Self::be16(self.l4(), 2)
    }
    pub fn tcp_flags(&self) -> u8 {
        self.l4()[13]
    }
    pub fn icmp_type(&self) -> u8 {
        self.l4()[0]
    }
    /// ICMP echo identifier.
    pub fn icmp_id(&self) -> u16 {
        Self::be16(self.l4(), 4)
    }
    /// The L4 checksum field as sent.
    pub fn l4_csum_field(&self) -> u16 {
        match self.proto() {
            IPPROTO_TCP => Self::be16(self.l4(), 16),
            IPPROTO_UDP => Self::be16(self.l4(), 6),
            IPPROTO_ICMP => Self::be16(self.l4(), 2),
            p => panic!("no L4 checksum for protocol {p}"),
        }
    }

    /// The IPv4 header checksum recomputed from scratch, and the one in the header.
    pub fn ip_csum(&self) -> (u16, u16) {
        ip_header_csum(self.ip())
    }

    /// The L4 checksum recomputed from scratch over the whole segment (TCP/UDP: with the
    /// pseudo-header; ICMP: the whole message), and the one in the packet.
    pub fn l4_csum(&self) -> (u16, u16) {
        let mut seg = self.l4().to_vec();
        let off = match self.proto() {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            IPPROTO_ICMP => 2,
            p => panic!("no L4 checksum for protocol {p}"),
        };
        let sent = u16::from_be_bytes([seg[off], seg[off + 1]]);
        seg[off] = 0;
        seg[off + 1] = 0;
        let want = if self.proto() == IPPROTO_ICMP {
            checksum(&seg)
        } else {
            l4_checksum(self.saddr(), self.daddr(), self.proto(), &seg)
        };
        (want, sent)
    }

    /// Panics unless the IP checksum and the L4 checksum (if the protocol has one and it is
    /// not UDP's "no checksum" 0) equal a recomputation from scratch.
    #[track_caller]
    pub fn assert_checksums(&self, what: &str) {
        let (want, got) = self.ip_csum();
        assert_eq!(
            got, want,
            "{what}: IP header checksum {got:#06x}, recomputed {want:#06x}"
        );
        if self.frame[ETH_HLEN + 6..ETH_HLEN + 8] != [0, 0]
            && self.frame[ETH_HLEN + 6..ETH_HLEN + 8] != IP_DF.to_be_bytes()
        {
            return; // a fragment: the L4 checksum covers bytes this frame does not hold
        }
        match self.proto() {
            IPPROTO_TCP | IPPROTO_ICMP => {}
            IPPROTO_UDP if self.l4_csum_field() != 0 => {}
            _ => return,
        }
        let (want, got) = self.l4_csum();
        assert_eq!(
            got,
            want,
            "{what}: L4 (proto {}) checksum {got:#06x}, recomputed {want:#06x}",
            self.proto()
        );
    }
}

/// The checksum of an IPv4 header (`ip` starts with it) recomputed from scratch, and the one
/// in the header.
pub fn ip_header_csum(ip: &[u8]) -> (u16, u16) {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let mut h = ip[..ihl].to_vec();
    let sent = u16::from_be_bytes([h[10], h[11]]);
    h[10] = 0;
    h[11] = 0;
    (checksum(&h), sent)
}

/// Rewrites fields of an IP datagram (`ip`, no Ethernet header) in place without touching any
/// checksum: to build what a translated packet must look like byte for byte.
pub fn poke_addr(ip: &mut [u8], src: bool, addr: Ip4) {
    let off = if src { 12 } else { 16 };
    ip[off..off + 4].copy_from_slice(&addr);
}

/// See [`poke_addr`]: sets a TCP/UDP port (`src`: source) of datagram `ip`.
pub fn poke_port(ip: &mut [u8], src: bool, port: u16) {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let off = ihl + if src { 0 } else { 2 };
    ip[off..off + 2].copy_from_slice(&port.to_be_bytes());
}

/// Recomputes the IPv4 header checksum of datagram `ip` in place.
pub fn fix_ip_csum(ip: &mut [u8]) {
    let (c, _) = ip_header_csum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum16(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
        // Odd length: the last byte is the high byte of a word.
        assert_eq!(fold(sum16(&[0x01], 0)), 0x0100);
    }

    #[test]
    fn known_ipv4_header() {
        // A header from the wild (Wikipedia's IPv4 checksum example), checksum b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        h[10] = 0xb8;
        h[11] = 0x61;
        assert_eq!(ip_header_csum(&h), (0xb861, 0xb861));
        // A correct header sums to 0xffff.
        assert_eq!(fold(sum16(&h, 0)), 0xffff);
    }

    #[test]
    fn known_udp_datagram() {
        // 10.0.0.1:1234 -> 10.0.0.2:53, payload "hi": checksum computed by hand:
        // pseudo 0a00+0001+0a00+0002+0011+000a = 0x141e; udp 04d2+0035+000a+0000+6869 = 0x6d7a;
        // sum 0x8198 -> ~ = 0x7e67.
        let seg = [0x04, 0xd2, 0x00, 0x35, 0x00, 0x0a, 0x00, 0x00, b'h', b'i'];
        assert_eq!(
            l4_checksum([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_UDP, &seg),
            0x7e67
        );
    }

    #[test]
    fn built_packets_verify() {
        for p in [
            Ipv4Pkt::tcp([172, 18, 0, 2], 40000, [192, 0, 2, 2], 80, TCP_SYN),
            Ipv4Pkt::udp([172, 18, 0, 2], 40000, [192, 0, 2, 2], 53).options(&[1, 1, 1, 0]),
            Ipv4Pkt::echo([172, 18, 0, 2], [192, 0, 2, 2], 0x1234, 1),
            Ipv4Pkt::udp([1, 2, 3, 4], 5, [6, 7, 8, 9], 10).no_udp_csum(),
        ] {
            let f = p.build();
            let v = View::new(&f);
            v.assert_checksums("built");
            assert_eq!(v.saddr(), p.saddr);
            assert_eq!(v.ihl(), 20 + p.options.len());
        }
        // A corrupted byte is caught.
        let mut f = Ipv4Pkt::tcp([10, 0, 0, 1], 1, [10, 0, 0, 2], 2, TCP_SYN).build();
        f[ETH_HLEN + 20 + 4] ^= 1;
        let v = View::new(&f);
        assert_ne!(v.l4_csum().0, v.l4_csum().1);
    }
}

// ---------------------------------------------------------------------------------------------
// IPv6

/// An IPv6 address as it appears on the wire.
pub type Ip6 = [u8; 16];

pub const IPPROTO_ICMPV6: u8 = 58;
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_DEST: u8 = 60;

pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP6_ECHO: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const NDP_ROUTER_ADVERT: u8 = 134;
pub const NDP_NEIGH_SOLICIT: u8 = 135;
pub const NDP_NEIGH_ADVERT: u8 = 136;

/// The IPv6 pseudo-header sum (RFC 8200 8.1): addresses, upper-layer length (32 bits), next
/// header.
pub fn pseudo_sum6(saddr: Ip6, daddr: Ip6, next: u8, l4_len: usize) -> u64 {
    let mut acc = sum16(&saddr, 0);
    acc = sum16(&daddr, acc);
    acc = sum16(&(l4_len as u32).to_be_bytes(), acc);
    acc + u64::from(next)
}

/// TCP, UDP or ICMPv6 checksum over the IPv6 pseudo-header and `segment` (its checksum field
/// zero). UDP's 0 is sent as 0xffff (over IPv6 a UDP checksum is never 0).
pub fn l4_checksum6(saddr: Ip6, daddr: Ip6, proto: u8, segment: &[u8]) -> u16 {
    let c = !fold(sum16(
        segment,
        pseudo_sum6(saddr, daddr, proto, segment.len()),
    ));
    if proto == IPPROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// An extension header before the L4 header: (type, bytes after the next-header byte). The
/// length byte is computed.
#[derive(Clone, Debug)]
pub enum Ext {
    /// Hop-by-hop, routing or destination options: `body` is padded to 8-byte units.
    Options(u8, Vec<u8>),
    /// A fragment header: offset in 8-byte units, more fragments, identification.
    Fragment { offset: u16, more: bool, id: u32 },
}

/// An Ethernet/IPv6 packet description; [`Ipv6Pkt::build`] makes the bytes. The L4 part
/// reuses [`L4`] (its `Icmp` variant is ICMPv6 here).
#[derive(Clone, Debug)]
pub struct Ipv6Pkt {
    pub eth_dst: Mac,
    pub eth_src: Mac,
    pub saddr: Ip6,
    pub daddr: Ip6,
    pub hop_limit: u8,
    pub ext: Vec<Ext>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Ipv6Pkt {
    fn new(saddr: Ip6, daddr: Ip6, l4: L4) -> Self {
        Ipv6Pkt {
            eth_dst: [0x02, 0, 0, 0, 0, 0xd0],
            eth_src: [0x02, 0, 0, 0, 0, 0x50],
            saddr,
            daddr,
            hop_limit: 64,
            ext: Vec::new(),
            l4,
            payload: Vec::new(),
        }
    }

    pub fn tcp(saddr: Ip6, sport: u16, daddr: Ip6, dport: u16, flags: u8) -> Self {
        let ack = if flags & TCP_ACK != 0 { 0x0102_0304 } else { 0 };
        Self::new(
            saddr,
            daddr,
            L4::Tcp {
                sport,
                dport,
                flags,
                seq: 0x1111_2222,
                ack,
            },
        )
    }

    pub fn udp(saddr: Ip6, sport: u16, daddr: Ip6, dport: u16) -> Self {
        Self::new(
            saddr,
            daddr,
            L4::Udp {
                sport,
                dport,
                no_csum: false,
            },
        )
        .payload(b"md udp6 test payload")
    }

    pub fn icmp(saddr: Ip6, daddr: Ip6, typ: u8, code: u8, rest: [u8; 4]) -> Self {
        Self::new(saddr, daddr, L4::Icmp { typ, code, rest })
    }

    pub fn echo(saddr: Ip6, daddr: Ip6, id: u16, seq: u16) -> Self {
        let (i, s) = (id.to_be_bytes(), seq.to_be_bytes());
        Self::icmp(saddr, daddr, ICMP6_ECHO, 0, [i[0], i[1], s[0], s[1]]).payload(b"md ping6!")
    }

    pub fn echo_reply(saddr: Ip6, daddr: Ip6, id: u16, seq: u16) -> Self {
        let (i, s) = (id.to_be_bytes(), seq.to_be_bytes());
        Self::icmp(saddr, daddr, ICMP6_ECHO_REPLY, 0, [i[0], i[1], s[0], s[1]])
            .payload(b"md ping6!")
    }

    /// An ICMPv6 error quoting `quoted` (an IPv6 datagram, no Ethernet header).
    pub fn icmp_error(saddr: Ip6, daddr: Ip6, typ: u8, code: u8, quoted: &[u8]) -> Self {
        let rest = if typ == ICMP6_PACKET_TOO_BIG {
            1280u32.to_be_bytes()
        } else {
            [0; 4]
        };
        Self::icmp(saddr, daddr, typ, code, rest).payload(quoted)
    }

    /// A neighbour advertisement (override) for `target` with `lladdr` as its link-layer
    /// address.
    pub fn neigh_advert(saddr: Ip6, daddr: Ip6, target: Ip6, lladdr: Mac) -> Self {
        let mut body = target.to_vec();
        body.extend_from_slice(&[2, 1]);
        body.extend_from_slice(&lladdr);
        let mut p = Self::icmp(saddr, daddr, NDP_NEIGH_ADVERT, 0, [0x20, 0, 0, 0]).payload(&body);
        p.hop_limit = 255;
        p
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn macs(mut self, src: Mac, dst: Mac) -> Self {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    pub fn ext(mut self, e: Ext) -> Self {
        self.ext.push(e);
        self
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Icmp { .. } => IPPROTO_ICMPV6,
            L4::Raw(_) => IPPROTO_TCP,
            L4::RawProto(p, _) => p,
        }
    }

    /// The L4 header and payload, checksums computed over the pseudo-header.
    pub fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
            } => {
                let mut h = Vec::with_capacity(20);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&ack.to_be_bytes());
                h.push(5 << 4);
                h.push(*flags);
                h.extend_from_slice(&64240u16.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 0]);
                h
            }
            L4::Udp { sport, dport, .. } => {
                let len = (8 + self.payload.len()) as u16;
                let mut h = Vec::with_capacity(8);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h
            }
            L4::Icmp { typ, code, rest } => {
                let mut h = vec![*typ, *code, 0, 0];
                h.extend_from_slice(rest);
                h
            }
            L4::Raw(b) | L4::RawProto(_, b) => b.clone(),
        };
        l4.extend_from_slice(&self.payload);
        let off = match &self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { .. } => Some(6),
            L4::Icmp { .. } => Some(2),
            _ => None,
        };
        if let Some(off) = off {
            let c = l4_checksum6(self.saddr, self.daddr, self.proto(), &l4);
            l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        l4
    }

    /// The extension headers, chained to `last` (the L4 protocol).
    fn ext_bytes(&self) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        let types: Vec<u8> = self
            .ext
            .iter()
            .map(|e| match e {
                Ext::Options(t, _) => *t,
                Ext::Fragment { .. } => NEXTHDR_FRAGMENT,
            })
            .collect();
        for (i, e) in self.ext.iter().enumerate() {
            let next = types.get(i + 1).copied().unwrap_or(self.proto());
            match e {
                Ext::Options(_, body) => {
                    let mut b = body.clone();
                    while (b.len() + 2) % 8 != 0 {
                        b.push(0);
                    }
                    out.push(next);
                    out.push(((b.len() + 2) / 8 - 1) as u8);
                    out.extend_from_slice(&b);
                }
                Ext::Fragment { offset, more, id } => {
                    out.push(next);
                    out.push(0);
                    out.extend_from_slice(&((offset << 3) | *more as u16).to_be_bytes());
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
        }
        (types.first().copied().unwrap_or(self.proto()), out)
    }

    /// The IPv6 datagram (no Ethernet header).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let (first, ext) = self.ext_bytes();
        let payload_len = (ext.len() + l4.len()) as u16;
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&payload_len.to_be_bytes());
        ip.push(first);
        ip.push(self.hop_limit);
        ip.extend_from_slice(&self.saddr);
        ip.extend_from_slice(&self.daddr);
        ip.extend_from_slice(&ext);
        ip.extend_from_slice(&l4);
        ip
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = eth_header(self.eth_dst, self.eth_src, ETH_P_IPV6);
        f.extend_from_slice(&self.ip_bytes());
        f
    }
}

/// A read-only view of an Ethernet/IPv6 frame, extension headers walked.
#[derive(Clone, Copy)]
pub struct View6<'a> {
    pub frame: &'a [u8],
}

impl<'a> View6<'a> {
    #[track_caller]
    pub fn new(frame: &'a [u8]) -> Self {
        assert!(
            frame.len() >= ETH_HLEN + 40,
            "frame too short: {frame:02x?}"
        );
        assert_eq!(
            u16::from_be_bytes([frame[12], frame[13]]),
            ETH_P_IPV6,
            "not IPv6"
        );
        View6 { frame }
    }
    fn ip(&self) -> &'a [u8] {
        &self.frame[ETH_HLEN..]
    }
    pub fn saddr(&self) -> Ip6 {
        self.ip()[8..24].try_into().unwrap()
    }
    pub fn daddr(&self) -> Ip6 {
        self.ip()[24..40].try_into().unwrap()
    }
    pub fn hop_limit(&self) -> u8 {
        self.ip()[7]
    }
    /// (L4 protocol, offset of the L4 header in the IP datagram, a later fragment).
    pub fn l4_at(&self) -> (u8, usize, bool) {
        let ip = self.ip();
        let (mut next, mut off) = (ip[6], 40);
        loop {
            match next {
                NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                    let len = (usize::from(ip[off + 1]) + 1) * 8;
                    next = ip[off];
                    off += len;
                }
                NEXTHDR_FRAGMENT => {
                    let fo = u16::from_be_bytes([ip[off + 2], ip[off + 3]]);
                    next = ip[off];
                    off += 8;
                    if fo >> 3 != 0 {
                        return (next, off, true);
                    }
                }
                p => return (p, off, false),
            }
        }
    }
    pub fn l4(&self) -> &'a [u8] {
        let payload_len = usize::from(u16::from_be_bytes([self.ip()[4], self.ip()[5]]));
        &self.ip()[self.l4_at().1..40 + payload_len]
    }
    pub fn sport(&self) -> u16 {
        u16::from_be_bytes([self.l4()[0], self.l4()[1]])
    }
    pub fn dport(&self) -> u16 {
        u16::from_be_bytes([self.l4()[2], self.l4()[3]])
    }
    /// ICMPv6 echo identifier.
    pub fn icmp_id(&self) -> u16 {
        u16::from_be_bytes([self.l4()[4], self.l4()[5]])
    }

    /// The L4 checksum recomputed from scratch over the pseudo-header (TCP, UDP, ICMPv6), and
    /// the one in the packet.
    pub fn l4_csum(&self) -> (u16, u16) {
        let proto = self.l4_at().0;
        let off = match proto {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            IPPROTO_ICMPV6 => 2,
            p => panic!("no L4 checksum for protocol {p}"),
        };
        let mut seg = self.l4().to_vec();
        let sent = u16::from_be_bytes([seg[off], seg[off + 1]]);
        seg[off] = 0;
        seg[off + 1] = 0;
        (l4_checksum6(self.saddr(), self.daddr(), proto, &seg), sent)
    }

    /// Panics unless the L4 checksum equals a recomputation from scratch (not for a later
    /// fragment, whose checksum is in the first one).
    #[track_caller]
    pub fn assert_checksum(&self, what: &str) {
        if self.l4_at().2 {
            return;
        }
        let (want, got) = self.l4_csum();
        assert_eq!(
            got, want,
            "{what}: L4 checksum {got:#06x}, recomputed {want:#06x}"
        );
    }
}

#[cfg(test)]
mod tests6 {
    use super::*;

    #[test]
    fn known_icmpv6_echo_checksum() {
        // fe80::1 -> ff02::1 echo request id 0x1234 seq 1, no payload: checksum by hand.
        // pseudo: fe80+0001+ff02+0001+0008+003a = 0x1fec0 (sums below); icmp 8000+1234+0001.
        let mut s = [0u8; 16];
        s[0] = 0xfe;
        s[1] = 0x80;
        s[15] = 1;
        let mut d = [0u8; 16];
        d[0] = 0xff;
        d[1] = 0x02;
        d[15] = 1;
        let seg = [0x80, 0, 0, 0, 0x12, 0x34, 0, 1];
        let sum: u64 = 0xfe80 + 1 + 0xff02 + 1 + 8 + 58 + 0x8000 + 0x1234 + 1;
        assert_eq!(l4_checksum6(s, d, IPPROTO_ICMPV6, &seg), !fold(sum));
    }

    #[test]
    fn built_ipv6_packets_verify() {
        let a = [0xfd, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let b = [0x20, 1, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        for p in [
            Ipv6Pkt::tcp(a, 40000, b, 80, TCP_SYN),
            Ipv6Pkt::udp(a, 40000, b, 53).ext(Ext::Options(NEXTHDR_HOP, vec![5, 2, 0, 0])),
            Ipv6Pkt::echo(a, b, 7, 1).ext(Ext::Options(NEXTHDR_DEST, vec![1, 0])),
        ] {
            let f = p.build();
            let v = View6::new(&f);
            v.assert_checksum("built");
            assert_eq!(v.saddr(), a);
            assert_eq!(v.l4_at().0, p.proto());
        }
        let mut f = Ipv6Pkt::tcp(a, 1, b, 2, TCP_SYN).build();
        f[ETH_HLEN + 40 + 4] ^= 1;
        let v = View6::new(&f);
        assert_ne!(v.l4_csum().0, v.l4_csum().1);
    }
}
