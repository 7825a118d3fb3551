//! Names and capacities of md's maps and programs: the pin directory layout.
//!
//! Map names are the names of the statics in md-ebpf (the ELF section names aya finds them by)
//! and the file names they are pinned under in `MD_BPF_PIN_DIR/maps/`.

/// Container interfaces by IPv4 address ([`crate::Endpoint`]).
pub const ENDPOINTS: &str = "ENDPOINTS";
pub const ENDPOINTS_MAX: usize = 65536;

/// The same container interfaces by host-side veth ifindex: who is behind a veth (for
/// flooded broadcast/multicast, checked where it leaves for each container).
pub const VETH_OWNERS: &str = "VETH_OWNERS";

/// Networks (bridges) by network id ([`crate::Network`]).
pub const NETWORKS: &str = "NETWORKS";
pub const NETWORKS_MAX: usize = 256;

/// The host namespace's own IPv4 addresses: published ports answer on these. The value holds
/// [`crate::HOST_ADDR_LOCAL`]/[`crate::HOST_ADDR_GATEWAY`] flags. md-user sizes the map from the
/// host when it loads the datapath (at least this many).
pub const HOST_ADDRS: &str = "HOST_ADDRS";
pub const HOST_ADDRS_MAX: usize = 1024;

/// Host-wide settings, one slot ([`crate::Config`]).
pub const CONFIG: &str = "CONFIG";

/// Published ports ([`crate::PortKey`] → [`crate::PortTarget`]).
pub const PORT_MAP: &str = "PORT_MAP";
pub const PORT_MAP_MAX: usize = 65536;

/// Connection tracker and NAT bindings, two entries per flow ([`crate::CtKey`] → [`crate::CtEntry`]):
/// flows that were answered (TCP: handshake complete; UDP/ICMP: a reply seen).
pub const CONNTRACK: &str = "CONNTRACK";
pub const CONNTRACK_MAX: usize = 131072;
/// Flows not answered yet, in an LRU of their own: a flood of them (spoofed SYNs) evicts only
/// its own kind, never an answered flow (Linux conntrack's early_drop of unassured entries).
pub const CONNTRACK_NEW: &str = "CONNTRACK_NEW";
pub const CONNTRACK_NEW_MAX: usize = 65536;
/// Both tracker maps.
pub const TRACKERS: &[&str] = &[CONNTRACK, CONNTRACK_NEW];

/// Later fragments of a translated datagram ([`crate::FragKey`] → [`crate::FragEntry`]).
pub const FRAGS: &str = "FRAGS";
pub const FRAGS_MAX: usize = 8192;

/// Subnets of md's networks (LPM trie, prefix → network id): no packet from the wire may claim
/// or reach an address in them except through a translation.
pub const MD_SUBNETS: &str = "MD_SUBNETS";

/// Inter-container policy rules by (source identity, destination identity).
pub const POLICY: &str = "POLICY";
pub const POLICY_MAX: usize = 65536;

/// Per-interface counters, per CPU ([`crate::IfStats`]); not preallocated, so a host with many
/// CPUs pays only for the interfaces md counts.
pub const IF_STATS: &str = "IF_STATS";
pub const IF_STATS_MAX: usize = 65536;

/// Socket-level reverse translation for host UDP sockets (recvmsg4).
pub const SOCK_REV: &str = "SOCK_REV";
pub const SOCK_REV_MAX: usize = 65536;

// IPv6: maps of their own beside the IPv4 ones, keyed by 16-byte addresses (the IPv4 maps
// keep their 4-byte keys, so bpftool dumps and everything reading them stay as they are).

/// Container interfaces by IPv6 address (the same [`crate::Endpoint`] values as ENDPOINTS).
pub const ENDPOINTS6: &str = "ENDPOINTS6";
/// The host namespace's own IPv6 addresses (no loopback, no link-local), flags as HOST_ADDRS.
pub const HOST_ADDRS6: &str = "HOST_ADDRS6";
/// Published ports over IPv6 ([`crate::PortKey6`] → [`crate::PortTarget6`]). On a routed
/// network the key is the container's own address and port (reachable directly, untranslated).
pub const PORT_MAP6: &str = "PORT_MAP6";
/// The IPv6 trackers ([`crate::CtKey6`] → [`crate::CtEntry6`]), as CONNTRACK/CONNTRACK_NEW.
pub const CONNTRACK6: &str = "CONNTRACK6";
pub const CONNTRACK6_MAX: usize = 65536;
pub const CONNTRACK6_NEW: &str = "CONNTRACK6_NEW";
pub const CONNTRACK6_NEW_MAX: usize = 32768;
/// Both IPv6 tracker maps.
pub const TRACKERS6: &[&str] = &[CONNTRACK6, CONNTRACK6_NEW];
/// Later fragments of a translated IPv6 datagram ([`crate::FragKey6`] → [`crate::FragEntry6`]).
pub const FRAGS6: &str = "FRAGS6";
/// Subnets of md's dual-stack networks (LPM trie over IPv6 prefixes → network id).
pub const MD_SUBNETS6: &str = "MD_SUBNETS6";
/// Socket-level reverse translation for host UDP sockets over IPv6 (recvmsg6).
pub const SOCK_REV6: &str = "SOCK_REV6";

/// Datapath events for `md-user monitor` ([`crate::Event`]).
pub const EVENTS: &str = "EVENTS";
pub const EVENTS_BYTES: usize = 1 << 20;

/// Containers on other hosts of md's overlay networks ([`crate::Remote`]), filled by the
/// watcher from the store (issue 17).
pub const REMOTE: &str = "REMOTE";
pub const REMOTE_MAX: usize = 65536;

/// This host's VXLAN device and underlay address, one slot ([`crate::Tunnel`]).
pub const TUNNEL: &str = "TUNNEL";

/// Every map md pins, in the order `down` removes them.
pub const ALL_MAPS: &[&str] = &[
    ENDPOINTS,
    VETH_OWNERS,
    NETWORKS,
    HOST_ADDRS,
    CONFIG,
    PORT_MAP,
    CONNTRACK,
    CONNTRACK_NEW,
    FRAGS,
    MD_SUBNETS,
    POLICY,
    IF_STATS,
    SOCK_REV,
    EVENTS,
    ENDPOINTS6,
    HOST_ADDRS6,
    PORT_MAP6,
    CONNTRACK6,
    CONNTRACK6_NEW,
    FRAGS6,
    MD_SUBNETS6,
    SOCK_REV6,
    REMOTE,
    TUNNEL,
];

/// TC programs: one per attach point.
pub const PROG_VETH_INGRESS: &str = "md_veth_ingress";
pub const PROG_VETH_EGRESS: &str = "md_veth_egress";
pub const PROG_UPLINK_INGRESS: &str = "md_uplink_ingress";
pub const PROG_UPLINK_EGRESS: &str = "md_uplink_egress";
/// The same for layer-3 devices (tun, WireGuard: no Ethernet header).
pub const PROG_L3_INGRESS: &str = "md_l3_ingress";
pub const PROG_L3_EGRESS: &str = "md_l3_egress";
/// Ingress of md's VXLAN device: packets from containers on other hosts (issue 17).
pub const PROG_TUNNEL_INGRESS: &str = "md_tunnel_ingress";
/// Socket programs at the cgroup-v2 root (host processes reaching published ports).
pub const PROG_SOCK_CONNECT4: &str = "md_sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "md_sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "md_sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "md_sock_getpeername4";
/// The same for IPv6 sockets.
pub const PROG_SOCK_CONNECT6: &str = "md_sock_connect6";
pub const PROG_SOCK_SENDMSG6: &str = "md_sock_sendmsg6";
pub const PROG_SOCK_RECVMSG6: &str = "md_sock_recvmsg6";
pub const PROG_SOCK_GETPEERNAME6: &str = "md_sock_getpeername6";
