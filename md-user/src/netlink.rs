//! Links, addresses and routes over rtnetlink: one connection per namespace per command.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage},
        route::{RouteAttribute, RouteMessage},
        AddressFamily,
    },
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder,
};

pub struct Netlink {
    handle: Handle,
}

/// The routing protocol number md's routes carry (overlay blocks of other hosts, and the
/// unreachable rest of an overlay's subnet), so they are told from everyone else's.
pub const MD_ROUTE_PROTO: u8 = 0x4d;

#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub kind: Option<String>,
    pub controller: Option<u32>,
    /// IFF_UP is set.
    pub up: bool,
    pub layer: Layer,
    pub mtu: Option<u32>,
}

/// The kernel's route for one destination (see [`Netlink::route_to`]).
#[derive(Debug, Clone)]
pub struct RouteTo {
    /// Delivered to this host (a local or broadcast address).
    pub local: bool,
    /// Sent on through `oif`.
    pub unicast: bool,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
    /// The source address the host would pick.
    pub source: Option<Ipv4Addr>,
}

/// What a device's packets start with, as TC programs see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Ethernet,
    /// The IP header (tun, WireGuard, IP tunnels, PPP).
    Ip,
    Loopback,
    /// Anything md does not parse (InfiniBand, CAN, ...).
    Other,
}

impl From<LinkLayerType> for Layer {
    fn from(t: LinkLayerType) -> Layer {
        use LinkLayerType as T;
        match t {
            T::Ether => Layer::Ethernet,
            T::None
            | T::Rawip
            | T::Tunnel
            | T::Tunnel6
            | T::Ipgre
            | T::Ip6gre
            | T::Sit
            | T::Ppp => Layer::Ip,
            T::Loopback => Layer::Loopback,
            _ => Layer::Other,
        }
    }
}

/// errno of a netlink error, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn parse_link(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: Vec::new(),
        kind: None,
        controller: None,
        up: msg
            .header
            .flags
            .contains(rtnetlink::packet_route::link::LinkFlags::Up),
        layer: msg.header.link_layer_type.into(),
        mtu: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(a) => link.mac = a,
            LinkAttribute::Controller(c) => link.controller = Some(c),
            LinkAttribute::Mtu(m) => link.mtu = Some(m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

impl Netlink {
    /// Opens a route netlink socket in the calling thread's network namespace; its connection
    /// task runs on the current tokio runtime.
    pub fn connect() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(Some(msg)) => Ok(Some(parse_link(msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(Some(msg)) => Ok(Some(parse_link(msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {index}")),
        }
    }

    /// Every link in this namespace.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let mut out = Vec::new();
        let mut s = self.handle.link().get().execute();
        while let Some(msg) = s.try_next().await.context("listing links")? {
            out.push(parse_link(msg));
        }
        Ok(out)
    }

    /// Creates the bridge if missing, with a fixed MAC (a bridge otherwise takes its lowest
    /// port's MAC, and md's redirects need the gateway MAC to stay put), the gateway address
    /// (none for an isolated network), the MTU (set explicitly, so the bridge keeps it
    /// whatever its ports have), and up. Returns it.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        address: Option<(Ipv4Addr, u8)>,
        mac: [u8; 6],
        mtu: Option<u32>,
    ) -> Result<Link> {
        if self.link_by_name(name).await?.is_none() {
            let msg = LinkBridge::new(name).address(mac.to_vec()).up().build();
            match self.handle.link().add(msg).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(e).with_context(|| format!("creating bridge {name}")),
            }
        }
        let link = self
            .link_by_name(name)
            .await?
            .with_context(|| format!("bridge {name} vanished"))?;
        if link.kind.as_deref() != Some("bridge") {
            anyhow::bail!("{name} exists and is not a bridge");
        }
        if let Some(mtu) = mtu.filter(|m| Some(*m) != link.mtu) {
            self.set_mtu(link.index, mtu)
                .await
                .with_context(|| format!("setting the MTU of {name} to {mtu}"))?;
        }
        self.set_up(link.index).await?;
        if let Some((gateway, prefix_len)) = address {
            self.ensure_address(link.index, gateway, prefix_len)
                .await
                .with_context(|| format!("adding {gateway}/{prefix_len} to {name}"))?;
        }
        Ok(link)
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .with_context(|| format!("setting the MTU of link {index}"))
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("setting link {index} up"))
    }

    pub async fn ensure_address(&self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix_len)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a veth pair: `host` attached to `bridge` and up, its peer created directly in
    /// the container's namespace (`netns_fd`; None: this one) as `peer` with `peer_mac` (no
    /// rename or move afterwards). Returns the host side.
    /// `mtu`: both ends' MTU (an overlay's, or the network's), else the kernel's default.
    pub async fn create_veth(
        &self,
        host: &str,
        bridge: u32,
        peer: &str,
        peer_mac: [u8; 6],
        netns_fd: Option<i32>,
        mtu: Option<u32>,
    ) -> Result<Link> {
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .address(peer_mac.to_vec());
        if let Some(fd) = netns_fd {
            peer_msg = peer_msg.setns_by_fd(fd);
        }
        let mut host_msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_string())
            .controller(bridge)
            .up();
        // Both ends with the network's MTU (the container's interface is the peer).
        if let Some(mtu) = mtu {
            peer_msg = peer_msg.mtu(mtu);
            host_msg = host_msg.mtu(mtu);
        }
        let msg = host_msg
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("creating veth {host}"))?;
        self.link_by_name(host)
            .await?
            .with_context(|| format!("veth {host} vanished"))
    }

    /// Creates md's VXLAN device if missing (issue 17): collect-metadata ("external"), so one
    /// device serves every remote host and VNI, its tunnel key set per packet by md's programs;
    /// no learning (md knows where every container is). Returns it, up, with `mtu`.
    pub async fn ensure_vxlan(&self, name: &str, port: u16, mtu: u32) -> Result<Link> {
        if self.link_by_name(name).await?.is_none() {
            let msg = rtnetlink::LinkVxlan::new(name, 0)
                .port(port)
                .collect_metadata(true)
                .learning(false)
                .mtu(mtu)
                .up()
                .build();
            match self.handle.link().add(msg).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(e).with_context(|| format!("creating VXLAN device {name}")),
            }
        }
        let link = self
            .link_by_name(name)
            .await?
            .with_context(|| format!("VXLAN device {name} vanished"))?;
        if link.kind.as_deref() != Some("vxlan") {
            anyhow::bail!("{name} exists and is not a VXLAN device");
        }
        if link.mtu != Some(mtu) {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(link.index).mtu(mtu).build())
                .execute()
                .await
                .with_context(|| format!("setting the MTU of {name}"))?;
        }
        self.set_up(link.index).await?;
        Ok(link)
    }

    /// md's routes (protocol [`MD_ROUTE_PROTO`]) in the main table: (destination, prefix,
    /// gateway; None for an unreachable route).
    pub async fn md_routes(&self) -> Result<Vec<(Ipv4Addr, u8, Option<Ipv4Addr>)>> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteProtocol};
        let mut out = Vec::new();
        for r in self.ipv4_routes().await? {
            if r.header.protocol != RouteProtocol::Other(MD_ROUTE_PROTO) {
                continue;
            }
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut gw = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    _ => {}
                }
            }
            out.push((dst, r.header.destination_prefix_length, gw));
        }
        Ok(out)
    }

    fn md_route(dst: Ipv4Addr, prefix: u8, via: Option<Ipv4Addr>) -> RouteMessage {
        use rtnetlink::packet_route::route::{RouteProtocol, RouteType};
        let b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .protocol(RouteProtocol::Other(MD_ROUTE_PROTO));
        match via {
            Some(gw) => b.gateway(gw).build(),
            None => b.kind(RouteType::Unreachable).build(),
        }
    }

    /// Adds (or replaces) one of md's routes: via a gateway, or unreachable.
    pub async fn set_md_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        via: Option<Ipv4Addr>,
    ) -> Result<()> {
        self.handle
            .route()
            .add(Self::md_route(dst, prefix, via))
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding the route to {dst}/{prefix}"))
    }

    pub async fn del_md_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        via: Option<Ipv4Addr>,
    ) -> Result<()> {
        match self
            .handle
            .route()
            .del(Self::md_route(dst, prefix, via))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing the route to {dst}/{prefix}")),
        }
    }

    /// The ids of the BPF programs in the clsact filters at one end of a link (what
    /// [`crate::datapath::Datapath::attach_owned`] puts there).
    pub async fn tc_filter_programs(&self, index: u32, ingress: bool) -> Result<Vec<u32>> {
        use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};
        let req = self.handle.traffic_filter(index as i32).get();
        let req = if ingress { req.ingress() } else { req.egress() };
        let mut s = req.execute();
        let mut out = Vec::new();
        loop {
            let msg = match s.try_next().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                // No clsact qdisc (or no such link): nothing attached.
                Err(e) if matches!(errno(&e), Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)) => {
                    break
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("listing the filters of link {index}"))
                }
            };
            for a in &msg.attributes {
                if let TcAttribute::Options(opts) = a {
                    out.extend(opts.iter().filter_map(|o| match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => Some(*id),
                        _ => None,
                    }));
                }
            }
        }
        Ok(out)
    }

    /// Deletes a link; a link that is already gone is not an error.
    pub async fn delete_link(&self, index: u32) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting link {index}")),
        }
    }

    /// Adds an IPv6 address without duplicate address detection (md's addresses are md's to
    /// hand out; a tentative address would not answer for a second or two).
    pub async fn ensure_address6(&self, index: u32, ip: Ipv6Addr, prefix_len: u8) -> Result<()> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
        let mut req = self.handle.address().add(index, IpAddr::V6(ip), prefix_len);
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every global IPv6 address in this namespace with its link index (no loopback, no
    /// link-local: neither is an address outside clients reach published ports on).
    pub async fn ipv6_addresses(&self) -> Result<Vec<(u32, Ipv6Addr, u8)>> {
        let mut out = Vec::new();
        let mut req = self.handle.address().get();
        // One family: an unspecified one dumps both (with a thousand veths, a thousand
        // link-local IPv6 addresses in every IPv4 listing).
        req.message_mut().header.family = AddressFamily::Inet6;
        let mut s = req.execute();
        while let Some(msg) = s.try_next().await.context("listing addresses")? {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V6(ip)) = attr {
                    let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
                    if !ip.is_loopback() && !link_local && !ip.is_multicast() {
                        out.push((msg.header.index, *ip, msg.header.prefix_len));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every IPv4 address in this namespace with its link index.
    pub async fn ipv4_addresses(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>> {
        let mut out = Vec::new();
        let mut req = self.handle.address().get();
        req.message_mut().header.family = AddressFamily::Inet;
        let mut s = req.execute();
        while let Some(msg) = s.try_next().await.context("listing addresses")? {
            for attr in &msg.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip)) = attr {
                    out.push((msg.header.index, *ip, msg.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    async fn ipv4_routes(&self) -> Result<Vec<RouteMessage>> {
        let mut out = Vec::new();
        let mut s = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(msg) = s.try_next().await.context("listing routes")? {
            out.push(msg);
        }
        Ok(out)
    }

    /// The interface of the IPv4 default route in the main table.
    pub async fn default_route_link(&self) -> Result<Option<u32>> {
        for r in self.ipv4_routes().await? {
            let main = r.header.table == 254
                || r.attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Table(254)));
            if r.header.destination_prefix_length != 0 || !main {
                continue;
            }
            if let Some(oif) = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            }) {
                return Ok(Some(oif));
            }
        }
        Ok(None)
    }

    /// What the kernel's routing says about a packet to `dst` sent from this namespace (`ip
    /// route get DST`): None when there is no route.
    pub async fn route_to(&self, dst: Ipv4Addr) -> Result<Option<RouteTo>> {
        use rtnetlink::packet_route::{route::RouteAddress, AddressFamily};
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 32;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        let mut s = self.handle.route().get(msg).execute();
        let r = match s.try_next().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e)
                if matches!(
                    errno(&e),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL)
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e).with_context(|| format!("looking up the route to {dst}")),
        };
        let v4 = |a: &RouteAddress| match a {
            RouteAddress::Inet(ip) => Some(*ip),
            _ => None,
        };
        let mut out = RouteTo {
            local: matches!(
                r.header.kind,
                rtnetlink::packet_route::route::RouteType::Local
                    | rtnetlink::packet_route::route::RouteType::Broadcast
            ),
            unicast: r.header.kind == rtnetlink::packet_route::route::RouteType::Unicast,
            oif: None,
            gateway: None,
            source: None,
        };
        for a in &r.attributes {
            match a {
                RouteAttribute::Oif(i) => out.oif = Some(*i),
                RouteAttribute::Gateway(g) => out.gateway = v4(g),
                RouteAttribute::PrefSource(p) => out.source = v4(p),
                _ => {}
            }
        }
        Ok(Some(out))
    }

    /// The link-layer address of neighbour `ip` on link `ifindex`, if the neighbour table
    /// knows it.
    pub async fn neighbour_mac(&self, ifindex: u32, ip: Ipv4Addr) -> Result<Option<Vec<u8>>> {
        use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
        let mut s = self.handle.neighbours().get().execute();
        while let Some(msg) = s.try_next().await.context("listing neighbours")? {
            if msg.header.ifindex != ifindex {
                continue;
            }
            let mut dst = None;
            let mut lladdr = None;
            for a in msg.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => dst = Some(d),
                    NeighbourAttribute::LinkLayerAddress(l) => lladdr = Some(l),
                    _ => {}
                }
            }
            if dst == Some(ip) && lladdr.as_ref().is_some_and(|l| l.len() == 6) {
                return Ok(lladdr);
            }
        }
        Ok(None)
    }

    pub async fn add_default_route6(&self, gateway: Ipv6Addr) -> Result<()> {
        self.handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(gateway)
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("adding IPv6 default route via {gateway}"))
    }

    /// The gateway of the IPv4 default route in the main table, if it has one.
    pub async fn default_gateway(&self) -> Result<Option<Ipv4Addr>> {
        for r in self.ipv4_routes().await? {
            if r.header.destination_prefix_length != 0 {
                continue;
            }
            if let Some(gw) = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(rtnetlink::packet_route::route::RouteAddress::Inet(ip)) => {
                    Some(*ip)
                }
                _ => None,
            }) {
                return Ok(Some(gw));
            }
        }
        Ok(None)
    }

    pub async fn add_default_route(&self, gateway: Ipv4Addr) -> Result<()> {
        self.handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("adding default route via {gateway}"))
    }
}

/// A container interface to configure (see [`configure_container_side`]).
pub struct ContainerIface {
    pub name: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// On a dual-stack network: the IPv6 address and prefix length.
    pub ip6: Option<(Ipv6Addr, u8)>,
}

/// The default routes of a container's primary interface.
pub struct Gateways {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// Configures the container side from inside its namespace: lo up, then (with an interface)
/// the interface up with its addresses and, for the primary one, the default routes via the
/// gateway. IPv6 stays off in the namespace unless the interface is on a dual-stack network:
/// then without duplicate address detection (md hands out the addresses), without router
/// advertisements (the routes are md's), with the EUI-64 link-local address md's NDP checks
/// expect.
pub fn configure_container_side(
    netns: &crate::netns::Netns,
    iface: Option<ContainerIface>,
    gateway: Option<Gateways>,
) -> Result<()> {
    netns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let ipv6 = iface.as_ref().is_some_and(|i| i.ip6.is_some());
            let conf = "/proc/sys/net/ipv6/conf";
            if ipv6 {
                for dev in ["all", "default"] {
                    crate::netns::write_sysctl(&format!("{conf}/{dev}/accept_dad"), "0").ok();
                    crate::netns::write_sysctl(&format!("{conf}/{dev}/accept_ra"), "0").ok();
                    crate::netns::write_sysctl(&format!("{conf}/{dev}/disable_ipv6"), "0")?;
                }
            } else if iface.is_none() || gateway.is_some() {
                // A namespace md made (its first, primary interface, or none): IPv6 off
                // unless a dual-stack interface turns it on.
                crate::netns::write_sysctl(&format!("{conf}/all/disable_ipv6"), "1").ok();
                crate::netns::write_sysctl(&format!("{conf}/default/disable_ipv6"), "1").ok();
            }
            let nl = Netlink::connect()?;
            let lo = nl.link_by_name("lo").await?.context("no lo")?;
            nl.set_up(lo.index).await?;
            let Some(ContainerIface {
                name,
                ip,
                prefix_len,
                ip6,
            }) = iface
            else {
                return Ok(());
            };
            let link = nl
                .link_by_name(&name)
                .await?
                .with_context(|| format!("no {name} in the container"))?;
            let dev = format!("{conf}/{name}");
            if let Some((ip6, len6)) = ip6 {
                crate::netns::write_sysctl(&format!("{dev}/accept_dad"), "0")?;
                crate::netns::write_sysctl(&format!("{dev}/accept_ra"), "0")?;
                crate::netns::write_sysctl(&format!("{dev}/addr_gen_mode"), "0")?;
                crate::netns::write_sysctl(&format!("{dev}/disable_ipv6"), "0")?;
                nl.ensure_address6(link.index, ip6, len6)
                    .await
                    .with_context(|| format!("adding {ip6}/{len6} to {name}"))?;
            } else {
                crate::netns::write_sysctl(&format!("{dev}/disable_ipv6"), "1").ok();
            }
            nl.ensure_address(link.index, ip, prefix_len)
                .await
                .with_context(|| format!("adding {ip}/{prefix_len} to {name}"))?;
            nl.set_up(link.index).await?;
            if let Some(gw) = gateway {
                if let Some(gw4) = gw.v4 {
                    nl.add_default_route(gw4).await?;
                }
                if let (Some(gw6), true) = (gw.v6, ipv6) {
                    nl.add_default_route6(gw6).await?;
                }
            }
            Ok(())
        })
    })
}

/// What a container's interface looks like from inside its namespace (for CHECK).
#[derive(Debug, Clone)]
pub struct ContainerSide {
    pub mac: Vec<u8>,
    pub up: bool,
    pub addresses: Vec<(Ipv4Addr, u8)>,
    pub default_gateway: Option<Ipv4Addr>,
}

/// Reads interface `name` inside `netns`; None when it is not there.
pub fn inspect_container_side(
    netns: &crate::netns::Netns,
    name: &str,
) -> Result<Option<ContainerSide>> {
    let name = name.to_string();
    netns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let nl = Netlink::connect()?;
            let Some(link) = nl.link_by_name(&name).await? else {
                return Ok(None);
            };
            let addresses = nl
                .ipv4_addresses()
                .await?
                .into_iter()
                .filter(|(i, _, _)| *i == link.index)
                .map(|(_, ip, len)| (ip, len))
                .collect();
            Ok(Some(ContainerSide {
                mac: link.mac.clone(),
                up: link.up,
                addresses,
                default_gateway: nl.default_gateway().await?,
            }))
        })
    })
}
