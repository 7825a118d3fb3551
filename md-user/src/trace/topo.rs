//! What `trace` knows about the host around the programs: interfaces and which md program runs
//! on each, containers and their networks (from the copied maps, named through md's state),
//! and policy identities. Read once, before the first packet.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use anyhow::Result;
use md_common::{maps as m, Endpoint, Ip4, Network, HOST_ADDR_GATEWAY};
use serde::Serialize;

use super::{packet::Mac, sandbox::Sandbox};
use crate::{
    datapath::Datapath,
    netlink::{Layer, Link, Netlink},
    state::State,
};

/// Which end of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    Ingress,
    Egress,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Dir::Ingress => "ingress",
            Dir::Egress => "egress",
        }
    }
}

/// A container interface md knows, with the names md's state gives it.
#[derive(Debug, Clone)]
pub struct Port {
    pub ep: Endpoint,
    pub container: Option<String>,
    /// Host-side veth name.
    pub veth: String,
    /// Name inside the container (eth0...).
    pub inside: String,
}

pub struct Topo {
    pub state: State,
    pub links: BTreeMap<u32, Link>,
    /// Programs md attached, by interface and end, by name.
    pub attached: BTreeMap<(u32, Dir), Vec<String>>,
    /// Whether `attached` comes from the kernel (TCX links and filters; false: guessed from roles).
    pub attached_from_links: bool,
    pub ports: Vec<Port>,
    pub networks: BTreeMap<u32, (Network, String)>,
    pub host_addrs: BTreeMap<Ipv4Addr, u32>,
    identities: HashMap<u32, String>,
}

fn ip4(a: Ip4) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

impl Topo {
    pub async fn read(dp: &Datapath, sb: &Sandbox, state: State, nl: &Netlink) -> Result<Topo> {
        let links: BTreeMap<u32, Link> = nl
            .links()
            .await?
            .into_iter()
            .map(|l| (l.index, l))
            .collect();
        // Program ids of md's pinned programs, to name what each link runs.
        let mut by_id = HashMap::new();
        if let Ok(dir) = std::fs::read_dir(dp.pin_dir.join("progs")) {
            for e in dir.flatten() {
                if let Some(id) = super::sandbox::pinned_program_id(&e.path()) {
                    by_id.insert(id, e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        let mut attached: BTreeMap<(u32, Dir), Vec<String>> = BTreeMap::new();
        for l in dp.tc_links() {
            let dir = if l.ingress { Dir::Ingress } else { Dir::Egress };
            let name = by_id
                .get(&l.prog_id)
                .cloned()
                .unwrap_or_else(|| format!("program id {}", l.prog_id));
            attached.entry((l.ifindex, dir)).or_default().push(name);
        }
        let mut ports = Vec::new();
        for (_, ep) in sb.entries::<Ip4, Endpoint>(m::ENDPOINTS)? {
            let ip = ip4(ep.ip);
            let found = state.containers.values().find_map(|c| {
                c.interfaces
                    .iter()
                    .find(|i| i.ip == ip && i.ifindex == ep.ifindex)
                    .map(|i| (c.name.clone(), i.veth.clone(), i.name.clone()))
            });
            let (container, veth, inside) = match found {
                Some((c, v, i)) => (Some(c), v, i),
                None => (
                    None,
                    links
                        .get(&ep.ifindex)
                        .map(|l| l.name.clone())
                        .unwrap_or_else(|| format!("if{}", ep.ifindex)),
                    "eth0".into(),
                ),
            };
            ports.push(Port {
                ep,
                container,
                veth,
                inside,
            });
        }
        // Containers' host veths carry clsact filters, not TCX links.
        for p in &ports {
            for (ingress, dir) in [(true, Dir::Ingress), (false, Dir::Egress)] {
                for id in nl
                    .tc_filter_programs(p.ep.ifindex, ingress)
                    .await
                    .unwrap_or_default()
                {
                    let name = by_id
                        .get(&id)
                        .cloned()
                        .unwrap_or_else(|| format!("program id {id}"));
                    let at = attached.entry((p.ep.ifindex, dir)).or_default();
                    if !at.contains(&name) {
                        at.push(name);
                    }
                }
            }
        }
        let attached_from_links = !attached.is_empty();
        let mut networks = BTreeMap::new();
        for (id, net) in sb.entries::<u32, Network>(m::NETWORKS)? {
            let name = state
                .networks
                .iter()
                .find(|(_, n)| n.id == id)
                .map(|(name, _)| name.clone())
                .unwrap_or_else(|| format!("network {id}"));
            networks.insert(id, (net, name));
        }
        let host_addrs = sb
            .entries::<Ip4, u32>(m::HOST_ADDRS)?
            .into_iter()
            .map(|(k, v)| (ip4(k), v))
            .collect();
        let identities = state
            .identities()?
            .iter()
            .map(|(n, id)| (*id, n.clone()))
            .collect();
        Ok(Topo {
            state,
            links,
            attached,
            attached_from_links,
            ports,
            networks,
            host_addrs,
            identities,
        })
    }

    pub fn port_by_ip(&self, ip: Ipv4Addr) -> Option<&Port> {
        self.ports.iter().find(|p| ip4(p.ep.ip) == ip)
    }

    pub fn port_by_ifindex(&self, ifindex: u32) -> Option<&Port> {
        self.ports.iter().find(|p| p.ep.ifindex == ifindex)
    }

    pub fn port_by_mac(&self, net_id: u32, mac: Mac) -> Option<&Port> {
        self.ports
            .iter()
            .find(|p| p.ep.net_id == net_id && p.ep.mac == mac)
    }

    pub fn port_by_mac_any(&self, mac: Mac) -> Option<&Port> {
        self.ports.iter().find(|p| p.ep.mac == mac)
    }

    /// The md network whose bridge is `ifindex`.
    pub fn bridge_net(&self, ifindex: u32) -> Option<u32> {
        self.networks
            .iter()
            .find(|(_, (n, _))| n.bridge_ifindex == ifindex)
            .map(|(id, _)| *id)
    }

    pub fn network(&self, id: u32) -> Option<&Network> {
        self.networks.get(&id).map(|(n, _)| n)
    }

    pub fn network_name(&self, id: u32) -> String {
        self.networks
            .get(&id)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| format!("network {id}"))
    }

    /// The md network `ip` is the gateway of.
    pub fn gateway_of(&self, ip: Ipv4Addr) -> Option<u32> {
        self.networks
            .iter()
            .find(|(_, (n, _))| ip4(n.gateway) == ip)
            .map(|(id, _)| *id)
    }

    pub fn is_host_addr(&self, ip: Ipv4Addr) -> bool {
        self.host_addrs.contains_key(&ip)
    }

    pub fn is_gateway_addr(&self, ip: Ipv4Addr) -> bool {
        self.host_addrs
            .get(&ip)
            .is_some_and(|f| f & HOST_ADDR_GATEWAY != 0)
    }

    pub fn identity_name(&self, id: u32) -> String {
        match id {
            0 => "no container".into(),
            id => self
                .identities
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("identity {id}")),
        }
    }

    pub fn if_name(&self, ifindex: u32) -> String {
        self.links
            .get(&ifindex)
            .map(|l| l.name.clone())
            .unwrap_or_else(|| format!("if{ifindex}"))
    }

    pub fn if_mac(&self, ifindex: u32) -> Option<Mac> {
        self.links
            .get(&ifindex)
            .and_then(|l| l.mac.as_slice().try_into().ok())
    }

    pub fn is_layer3(&self, ifindex: u32) -> bool {
        self.links
            .get(&ifindex)
            .is_some_and(|l| l.layer == Layer::Ip)
    }

    /// The programs that run at one end of an interface, as the kernel lists them (or, when
    /// it listed none, inferred from the interface's role).
    pub fn programs(&self, ifindex: u32, dir: Dir) -> Vec<String> {
        if self.attached_from_links {
            return self
                .attached
                .get(&(ifindex, dir))
                .cloned()
                .unwrap_or_default();
        }
        let veth = self.port_by_ifindex(ifindex).is_some();
        let name = match (veth, self.is_layer3(ifindex), dir) {
            (true, _, Dir::Ingress) => m::PROG_VETH_INGRESS,
            (true, _, Dir::Egress) => m::PROG_VETH_EGRESS,
            (false, true, Dir::Ingress) => m::PROG_L3_INGRESS,
            (false, true, Dir::Egress) => m::PROG_L3_EGRESS,
            (false, false, Dir::Ingress) => m::PROG_UPLINK_INGRESS,
            (false, false, Dir::Egress) => m::PROG_UPLINK_EGRESS,
        };
        if self.bridge_net(ifindex).is_some() {
            return Vec::new();
        }
        vec![name.to_string()]
    }

    /// What an interface is, for people: `mdab12cd34 (a's veth)`, `up0 (uplink)`.
    pub fn describe_if(&self, ifindex: u32) -> String {
        let name = self.if_name(ifindex);
        if let Some(p) = self.port_by_ifindex(ifindex) {
            return match &p.container {
                Some(c) => format!("{name} ({c}'s veth)"),
                None => format!("{name} (veth of {})", ip4(p.ep.ip)),
            };
        }
        if let Some(net) = self.bridge_net(ifindex) {
            return format!("{name} (bridge of network {})", self.network_name(net));
        }
        format!("{name} (uplink)")
    }

    /// Who has address `ip`: a container, the host, or nobody md knows.
    pub fn who(&self, ip: Ipv4Addr) -> String {
        if let Some(p) = self.port_by_ip(ip) {
            return p
                .container
                .clone()
                .unwrap_or_else(|| format!("container {ip}"));
        }
        if let Some(net) = self.gateway_of(ip) {
            return format!("host (gateway of {})", self.network_name(net));
        }
        if self.is_host_addr(ip) || ip.is_loopback() {
            return "host".into();
        }
        "outside".into()
    }
}
