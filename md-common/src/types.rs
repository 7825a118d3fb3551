use bytemuck::{Pod, Zeroable};

/// An IPv4 address in network byte order, as it appears in the packet.
pub type Ip4 = [u8; 4];
/// An IPv6 address in network byte order.
pub type Ip6 = [u8; 16];

macro_rules! pod {
    ($($(#[$m:meta])* pub struct $name:ident $body:tt = $size:expr;)*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
        pub struct $name $body
        const _: () = assert!(core::mem::size_of::<$name>() == $size);
        #[cfg(feature = "user")]
        unsafe impl aya::Pod for $name {}
    )*};
}

pod! {
    /// A container interface on an md bridge. Key: the container's IPv4 address.
    pub struct Endpoint {
        /// Host-side veth: where packets for this container are redirected.
        pub ifindex: u32,
        /// Policy identity, stable per container name across restarts.
        pub identity: u32,
        /// The md network (bridge) the interface is on.
        pub net_id: u32,
        /// The interface's address (the key of ENDPOINTS, repeated for VETH_OWNERS).
        pub ip: Ip4,
        /// Container-side MAC; frames from the container must carry it.
        pub mac: [u8; 6],
        pub _pad: [u8; 2],
    } = 24;

    /// An md network (one bridge and subnet). Key: network id.
    pub struct Network {
        pub gateway: Ip4,
        pub subnet: Ip4,
        pub prefix_len: u8,
        pub _pad: [u8; 1],
        /// Gateway (bridge) MAC: the source MAC of frames md redirects into a container.
        pub gateway_mac: [u8; 6],
        pub bridge_ifindex: u32,
        /// The gateway's IPv6 address on a dual-stack network (zero otherwise).
        pub gateway6: Ip6,
        /// How the network meets the world: [`NET_IPV6`], [`NET_ROUTED6`], [`NET_ROUTED4`],
        /// [`NET_INTERNAL`] (no mode flag: Docker's default gateway mode, `nat`).
        pub flags: u32,
    } = 40;

    /// Host-wide settings, the single slot of `CONFIG`.
    pub struct Config {
        /// netns cookie of md's host namespace: socket programs act only there.
        pub host_netns_cookie: u64,
        pub uplink_ifindex: u32,
        /// Address of the default route's interface (informational: masquerade takes the
        /// address the host's routing picks for each flow's way out).
        pub uplink_ip: Ip4,
        /// Source ports SNAT allocates from, inclusive (outside the host's ephemeral range).
        pub nat_port_min: u16,
        pub nat_port_max: u16,
        /// [`POLICY_ALLOW`] or [`POLICY_DENY`] for container pairs without a rule.
        pub policy_default: u8,
        /// [`DATAPATH_STACK`] or [`DATAPATH_REDIRECT`]: how packets md has decided on travel.
        pub datapath: u8,
        pub _pad: [u8; 2],
        /// Tracker lifetimes in seconds.
        pub ct_tcp_syn_secs: u32,
        pub ct_tcp_established_secs: u32,
        pub ct_tcp_closing_secs: u32,
        pub ct_udp_secs: u32,
        pub ct_icmp_secs: u32,
        pub _pad2: [u8; 4],
    } = 48;

    /// Where a published port leads.
    pub struct PortTarget {
        pub ip: Ip4,
        pub port: u16,
        /// PORT_* flags.
        pub flags: u16,
        /// Identity of the publishing container.
        pub identity: u32,
        pub _pad2: u32,
        /// New connections (or UDP flows) translated through this port.
        pub hits: u64,
    } = 24;

    /// A policy rule between two container identities.
    pub struct PolicyKey {
        pub src_identity: u32,
        pub dst_identity: u32,
    } = 8;

    pub struct PolicyRule {
        /// [`POLICY_ALLOW`] or [`POLICY_DENY`].
        pub verdict: u8,
        pub _pad: [u8; 7],
        /// Packets dropped by this rule.
        pub drops: u64,
    } = 16;

    /// Counters for one md-managed interface (a container's host-side veth, or the uplink).
    /// "egress" is traffic leaving the container, "ingress" traffic entering it.
    pub struct IfStats {
        pub egress_packets: u64,
        pub egress_bytes: u64,
        pub ingress_packets: u64,
        pub ingress_bytes: u64,
        pub snat: u64,
        pub dnat: u64,
        pub drop_policy: u64,
        pub drop_spoof: u64,
        pub drop_isolation: u64,
        pub drop_unsupported: u64,
        pub drop_nat_ports: u64,
        pub drop_malformed: u64,
        pub drop_unsolicited: u64,
        pub drop_forward: u64,
        pub drop_no_source: u64,
        /// Packets md delivered itself (redirect datapath), past the bridge and the host stack.
        pub redirected: u64,
    } = 128;

    /// A fragmented datagram as it arrived: later fragments carry no ports, so they follow the
    /// translation of their first fragment (Cilium's ipfrag map).
    pub struct FragKey {
        pub saddr: Ip4,
        pub daddr: Ip4,
        pub id: u16,
        pub proto: u8,
        pub _pad: u8,
    } = 12;

    /// The addresses a datagram's first fragment was given.
    pub struct FragEntry {
        pub saddr: Ip4,
        pub daddr: Ip4,
        /// CLOCK_MONOTONIC nanoseconds after which later fragments no longer follow.
        pub expires_ns: u64,
    } = 16;

    /// Where a published port leads over IPv6 (PORT_MAP6).
    pub struct PortTarget6 {
        pub ip: Ip6,
        pub port: u16,
        /// PORT_* flags.
        pub flags: u16,
        /// Identity of the publishing container.
        pub identity: u32,
        /// New connections (or UDP flows) translated through this port.
        pub hits: u64,
    } = 32;

    /// An IPv6 datagram as it arrived; its fragment header's 32-bit identification.
    pub struct FragKey6 {
        pub saddr: Ip6,
        pub daddr: Ip6,
        pub id: u32,
        pub proto: u8,
        pub _pad: [u8; 3],
    } = 40;

    /// The addresses an IPv6 datagram's first fragment was given.
    pub struct FragEntry6 {
        pub saddr: Ip6,
        pub daddr: Ip6,
        pub expires_ns: u64,
    } = 40;

    /// SOCK_REV6 key: a host socket whose destination connect6/sendmsg6 rewrote.
    pub struct SockRevKey6 {
        pub cookie: u64,
        pub ip: Ip6,
        pub port: u16,
        pub _pad: [u8; 6],
    } = 32;

    pub struct SockRevValue6 {
        pub ip: Ip6,
        pub port: u16,
        pub _pad: u16,
    } = 20;

    /// A datapath event about an IPv6 packet: [`Event`]'s fields with IPv6 addresses (the ring
    /// holds both; a reader tells them apart by size).
    pub struct Event6 {
        pub ts_ns: u64,
        pub kind: u8,
        pub reason: u8,
        pub proto: u8,
        pub _pad: u8,
        pub ifindex: u32,
        pub saddr: Ip6,
        pub daddr: Ip6,
        pub sport: u16,
        pub dport: u16,
        pub nat_addr: Ip6,
        pub nat_port: u16,
        pub _pad2: u16,
    } = 72;

    /// Reverse translation for a host UDP socket whose destination connect4/sendmsg4 rewrote.
    pub struct SockRevKey {
        pub cookie: u64,
        pub ip: Ip4,
        pub port: u16,
        pub _pad: u16,
    } = 16;

    pub struct SockRevValue {
        pub ip: Ip4,
        pub port: u16,
        pub _pad: u16,
    } = 8;

    /// A container on another host of an overlay network (issue 17). Key: its IPv4 address.
    pub struct Remote {
        /// The underlay address of the host it lives on (where VXLAN packets go, or the
        /// next hop of its block in native routing).
        pub host: Ip4,
        /// Its policy identity, the same on every host (allocated through the store).
        pub identity: u32,
        /// The overlay network's id on *this* host (ids are per host).
        pub net_id: u32,
        /// [`OVERLAY_TUNNEL`] or [`OVERLAY_NATIVE`].
        pub mode: u8,
        pub _pad: [u8; 3],
    } = 16;

    /// This host's VXLAN device, the single slot of `TUNNEL`.
    pub struct Tunnel {
        /// The collect-metadata VXLAN device packets to other hosts are redirected to (0: none).
        pub ifindex: u32,
        /// This host's underlay address: the outer source of what it encapsulates.
        pub local: Ip4,
    } = 8;

    /// A datapath event for `md-user monitor`.
    pub struct Event {
        pub ts_ns: u64,
        /// [`EVENT_DROP`], [`EVENT_NAT`], [`EVENT_POLICY`].
        pub kind: u8,
        /// Drop reason ([`DROP_POLICY`] …) or NAT kind ([`CT_KIND_SNAT`] …).
        pub reason: u8,
        pub proto: u8,
        pub _pad: u8,
        pub ifindex: u32,
        pub saddr: Ip4,
        pub daddr: Ip4,
        pub sport: u16,
        pub dport: u16,
        pub nat_addr: Ip4,
        pub nat_port: u16,
        pub _pad2: u16,
        pub _pad3: u32,
    } = 40;
}

/// Map types shared by both families, generic over the address (`Ip4` or `Ip6`): the same
/// fields, the same logic on both sides. Neither instance has implicit padding (asserted
/// below), which is what makes them plain old data.
macro_rules! pod_instances {
    ($name:ident: $($a:ty = $size:expr),*) => {$(
        const _: () = assert!(core::mem::size_of::<$name<$a>>() == $size);
        unsafe impl Zeroable for $name<$a> {}
        unsafe impl Pod for $name<$a> {}
        #[cfg(feature = "user")]
        unsafe impl aya::Pod for $name<$a> {}
    )*};
}

/// A flow tuple in one direction. ICMP echo puts the identifier in `sport` for requests and in
/// `dport` for replies, so a reply's tuple is the request's reversed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtKeyOf<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Scalars, not [u8; 3]: zeroing a byte array becomes a call to the eBPF side's
    // byte-at-a-time memset, twice for every packet parsed.
    pub _pad: u8,
    pub _pad2: u16,
}
pub type CtKey = CtKeyOf<Ip4>;
pub type CtKey6 = CtKeyOf<Ip6>;
pod_instances!(CtKeyOf: Ip4 = 16, Ip6 = 40);

/// One direction of a tracked flow: what a packet with the key's tuple becomes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntryOf<A> {
    pub nat_saddr: A,
    pub nat_daddr: A,
    pub nat_sport: u16,
    pub nat_dport: u16,
    /// [`CT_KIND_NONE`], [`CT_KIND_SNAT`], [`CT_KIND_DNAT`], [`CT_KIND_HAIRPIN`] or
    /// [`CT_KIND_ROUTED`].
    pub kind: u8,
    /// [`CT_DIR_ORIGINAL`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    /// [`TCP_SYN_SENT`], [`TCP_ESTABLISHED`], [`TCP_CLOSING`], [`TCP_FIN_ORIGINAL`],
    /// [`TCP_FIN_REPLY`]; 0 for UDP/ICMP.
    pub tcp_state: u8,
    /// Where the entry is applied: [`CT_HOOK_VETH`] or [`CT_HOOK_UPLINK`].
    pub hook: u8,
    /// CLOCK_MONOTONIC nanoseconds after which the entry is dead.
    pub expires_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Host-side veth of the container the flow belongs to (for stats).
    pub ifindex: u32,
    /// Policy identity of the container the original direction is headed to (0: none).
    pub identity: u32,
    /// TCP: the sequence number just after the last segment this direction sent (seq + data
    /// + SYN/FIN); 0 before the first. With `ack` it is the window edge a RST must hit.
    pub seq_next: u32,
    /// TCP: the last acknowledgement number this direction sent (0: none yet).
    pub ack: u32,
    /// The `expires_ns` this half last gave the other half: a packet refreshes the other half
    /// when its own lifetime has moved a second past it, so the other never trails by more.
    pub partner_expires_ns: u64,
}
pub type CtEntry = CtEntryOf<Ip4>;
pub type CtEntry6 = CtEntryOf<Ip6>;
pod_instances!(CtEntryOf: Ip4 = 64, Ip6 = 88);

/// A published port. `ip` is all zeros for "every host address" of the family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortKeyOf<A> {
    pub ip: A,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
pub type PortKey = PortKeyOf<Ip4>;
pub type PortKey6 = PortKeyOf<Ip6>;
pod_instances!(PortKeyOf: Ip4 = 8, Ip6 = 20);

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// NETWORKS flags: the network is dual-stack (its containers have IPv6 addresses).
pub const NET_IPV6: u32 = 1;
/// IPv6 in routed mode (Docker's gateway_mode_ipv6=routed): no NAT66; from outside, only the
/// containers' published ports (and ICMPv6 echo) are reachable, directly on their addresses.
pub const NET_ROUTED6: u32 = 2;

/// IPv4 in routed mode (Docker's gateway_mode_ipv4=routed): no masquerade;
/// from outside, only the containers' published ports (and ICMP echo) are reachable, directly
/// on their own addresses and ports.
pub const NET_ROUTED4: u32 = 4;
/// An internal network (Docker's `--internal`, and gateway mode `isolated`, which needs it):
/// nothing of it leaves by an uplink, nothing from an uplink reaches it.
pub const NET_INTERNAL: u32 = 8;

pub const CT_KIND_NONE: u8 = 0;
pub const CT_KIND_SNAT: u8 = 1;
pub const CT_KIND_DNAT: u8 = 2;
/// Container → host address → same container: DNAT plus SNAT to the gateway.
pub const CT_KIND_HAIRPIN: u8 = 3;
/// A routed network's flow, opened by the container's first packet leaving by an uplink:
/// tracked at the uplink like a masqueraded one (its answers are let in), never translated.
pub const CT_KIND_ROUTED: u8 = 4;

pub const CT_DIR_ORIGINAL: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

pub const CT_HOOK_VETH: u8 = 0;
pub const CT_HOOK_UPLINK: u8 = 1;

pub const TCP_NONE: u8 = 0;
pub const TCP_SYN_SENT: u8 = 1;
pub const TCP_ESTABLISHED: u8 = 2;
pub const TCP_CLOSING: u8 = 3;
/// One side sent FIN (half-closed): the other may still talk for long.
pub const TCP_FIN_ORIGINAL: u8 = 4;
pub const TCP_FIN_REPLY: u8 = 5;
/// The reply direction answered the first packet; the handshake is not complete yet.
pub const TCP_SYN_RECV: u8 = 6;

/// Human name of a tracker TCP state.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        TCP_SYN_SENT => "syn-sent",
        TCP_SYN_RECV => "syn-recv",
        TCP_ESTABLISHED => "established",
        TCP_CLOSING => "closing",
        TCP_FIN_ORIGINAL => "fin-original",
        TCP_FIN_REPLY => "fin-reply",
        _ => "none",
    }
}

/// HOST_ADDRS values: flags of one of the host's addresses.
pub const HOST_ADDR_LOCAL: u32 = 1;

/// PortTarget flag: the runtime that published the port holds the host port itself (Podman's
/// conmon keeps a listener on it to reserve it), so the port is translated even though a host
/// socket listens there, as the reference portmap plugin's DNAT does.
pub const PORT_RUNTIME_RESERVED: u16 = 1;
/// The gateway of an md network: its resolver listens there and is never translated.
pub const HOST_ADDR_GATEWAY: u32 = 2;

/// Where each network's resolver listens (UDP and TCP), on the gateway.
pub const RESOLVER_PORT: u16 = 53;

/// Datapath modes (CONFIG.datapath). Stack: after md's programs decide, packets walk the
/// bridge and the host's IP stack as usual.
pub const DATAPATH_STACK: u8 = 0;
/// Redirect: md delivers what it decided itself: from an uplink straight into the container
/// (bpf_redirect_peer), from a container straight to the uplink the FIB names (bpf_redirect)
/// or into another container (bpf_redirect_peer), skipping the bridge and the host stack.
pub const DATAPATH_REDIRECT: u8 = 1;

/// The skb mark of a frame whose uplink translation was done at the container's veth in the
/// redirect datapath: the uplink's egress program lets it by, and clears the mark, instead of
/// looking its flow up again. Marks never cross into another namespace (veth scrubs them), so
/// no container can forge one.
pub const MARK_TRANSLATED: u32 = 0x6d64_7478;

/// Overlay modes (Remote.mode): VXLAN through the collect-metadata device, the sender's
/// identity in the VNI; or native routing over a shared underlay (identity from the registry).
pub const OVERLAY_TUNNEL: u8 = 1;
pub const OVERLAY_NATIVE: u8 = 2;
/// Identities allocated through the store (overlay containers) start here: they must fit
/// the 24-bit VNI, and local identities (counted from 1 on each host) stay below.
pub const CLUSTER_IDENTITY_MIN: u32 = 1 << 20;
pub const CLUSTER_IDENTITY_MAX: u32 = (1 << 24) - 1;

pub const POLICY_ALLOW: u8 = 1;
pub const POLICY_DENY: u8 = 2;

pub const EVENT_DROP: u8 = 1;
pub const EVENT_NAT: u8 = 2;
pub const EVENT_POLICY: u8 = 3;

pub const DROP_POLICY: u8 = 1;
pub const DROP_SPOOF: u8 = 2;
pub const DROP_ISOLATION: u8 = 3;
pub const DROP_UNSUPPORTED: u8 = 4;
pub const DROP_NAT_PORTS: u8 = 5;
pub const DROP_MALFORMED: u8 = 6;
/// From the uplink straight to a container address, not through a published port.
pub const DROP_UNSOLICITED: u8 = 7;
/// Arrived on a host interface to be routed out of another, not md's: the host forwards only
/// md's traffic (Docker sets FORWARD to DROP).
pub const DROP_FORWARD: u8 = 8;
/// A container's flow leaves by an interface without an address to masquerade it behind.
pub const DROP_NO_SOURCE: u8 = 9;

/// Human name of a drop reason (stats, monitor).
pub fn drop_reason_name(reason: u8) -> &'static str {
    match reason {
        DROP_POLICY => "policy",
        DROP_SPOOF => "spoofed-source",
        DROP_ISOLATION => "network-isolation",
        DROP_UNSUPPORTED => "unsupported-protocol",
        DROP_NAT_PORTS => "nat-ports-exhausted",
        DROP_MALFORMED => "malformed",
        DROP_UNSOLICITED => "unsolicited",
        DROP_FORWARD => "not-forwarded",
        DROP_NO_SOURCE => "no-source-address",
        _ => "unknown",
    }
}

impl Config {
    /// md's defaults: NAT ports above Linux's default ephemeral range (32768–60999), tracker
    /// lifetimes in the range production datapaths use.
    pub const fn defaults() -> Self {
        Config {
            host_netns_cookie: 0,
            uplink_ifindex: 0,
            uplink_ip: [0; 4],
            nat_port_min: 61000,
            nat_port_max: 65535,
            policy_default: POLICY_ALLOW,
            datapath: DATAPATH_REDIRECT,
            _pad: [0; 2],
            ct_tcp_syn_secs: 60,
            ct_tcp_established_secs: 6 * 3600,
            ct_tcp_closing_secs: 10,
            ct_udp_secs: 60,
            ct_icmp_secs: 10,
            _pad2: [0; 4],
        }
    }
}

impl<A: Copy> CtKeyOf<A> {
    pub const fn new(saddr: A, daddr: A, sport: u16, dport: u16, proto: u8) -> Self {
        CtKeyOf {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// The tuple of packets flowing the other way.
    pub const fn reversed(&self) -> Self {
        CtKeyOf::new(self.daddr, self.saddr, self.dport, self.sport, self.proto)
    }
}

impl<A: Copy> CtEntryOf<A> {
    /// The tuple of the packets answering the ones this entry translates: the other half's
    /// key (`nat_tuple(proto).reversed()`, built in one go).
    pub const fn reply_tuple(&self, proto: u8) -> CtKeyOf<A> {
        CtKeyOf::new(
            self.nat_daddr,
            self.nat_saddr,
            self.nat_dport,
            self.nat_sport,
            proto,
        )
    }

    /// The tuple a packet matching this entry leaves with.
    pub const fn nat_tuple(&self, proto: u8) -> CtKeyOf<A> {
        CtKeyOf::new(
            self.nat_saddr,
            self.nat_daddr,
            self.nat_sport,
            self.nat_dport,
            proto,
        )
    }
}

impl<A: Copy> PortKeyOf<A> {
    pub const fn new(ip: A, port: u16, proto: u8) -> Self {
        PortKeyOf {
            ip,
            port,
            proto,
            _pad: 0,
        }
    }
}
