//! `md-user trace FROM TO[:PORT][/PROTO]`: crafts the packet FROM would send, runs it hop by
//! hop through md's programs (a private copy of them: see [`sandbox`]), then the answer TO
//! would give, back through the reverse hops, and says what decided at every step.
//!
//! - [`spec`]: the arguments (no privileges needed).
//! - [`packet`]: building, parsing and answering frames.
//! - [`sandbox`]: the private copy of the datapath and BPF_PROG_TEST_RUN.
//! - [`topo`]: the host around the programs (interfaces, attachments, names).
//! - [`walk`]: the hop engine (verdicts, bridge, routing, redirects).
//! - [`lookups`]: the map entries a packet meets and what a program changed.
//! - [`report`]: text and JSON.

mod lookups;
pub mod packet;
pub mod report;
mod sandbox;
pub mod spec;
mod topo;
mod walk;

use std::{net::Ipv4Addr, path::Path};

use anyhow::{bail, Context, Result};
use md_common::{maps as m, PortKey, PortTarget, IPPROTO_TCP, IPPROTO_UDP};
use serde::Serialize;

use self::{
    packet::{Headers, Mac, L4},
    sandbox::{Copied, Loaded, Sandbox},
    spec::{Dest, Peer, Proto},
    topo::{Dir, Topo},
    walk::{End, Leg, PacketView, Receiver, Step, Walker, UNKNOWN_MAC},
};
use crate::{
    datapath::Datapath,
    netlink::{Netlink, RouteTo},
    netns::Netns,
    state::{Container, State},
};

/// Everything a trace found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub from: String,
    pub to: String,
    pub sandbox: SandboxInfo,
    /// Who sends the request, and from where.
    pub sender: String,
    pub request: Leg,
    /// Who answers and how (None when the request did not arrive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub responder: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<Leg>,
    pub verdict: Verdict,
}

/// How the trace ran: on a private copy, and how faithful it is.
#[derive(Debug, Serialize)]
pub struct SandboxInfo {
    pub private_copy: bool,
    pub programs: Vec<Loaded>,
    pub maps: Vec<Copied>,
    pub note: String,
}

/// The answer to "does FROM reach TO, and if not, why".
#[derive(Debug, Serialize)]
pub struct Verdict {
    /// delivered, refused, dropped, answer-dropped, lost.
    pub result: String,
    /// A drop reason name (drop_reason_name), no-published-port, no-listener, or none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<walk::Rule>,
    pub summary: String,
    pub warnings: Vec<String>,
}

/// Where a leg starts.
struct Start {
    step: Step,
    frame: Vec<u8>,
    before: Vec<String>,
    /// The leg ends before any program (a packet a process sends itself over lo).
    end: Option<End>,
}

/// FROM after looking it up.
#[derive(Debug, Clone)]
enum Origin {
    Container(String),
    Host,
    Outside(Ipv4Addr),
}

/// First source port (or echo identifier) a trace tries: in Linux's ephemeral range.
const FIRST_PORT: u16 = 40000;

pub async fn trace(
    dp: &Datapath,
    state: State,
    nl: &Netlink,
    from: &Peer,
    to: &Dest,
) -> Result<Report> {
    let mut sb = Sandbox::load(dp)?;
    let cfg = sb.config()?;
    let cookie = crate::netns::current_netns_cookie()?;
    if cfg.host_netns_cookie != 0 && cfg.host_netns_cookie != cookie {
        bail!("run md-user trace in md's host network namespace (where its containers were started): route and socket lookups must see that host");
    }
    let topo = Topo::read(dp, &sb, state, nl).await?;
    let origin = resolve_from(&topo, &sb, from, to)?;
    let dst = resolve_to(&topo, nl, &origin, to).await?;
    let sender = describe_origin(&origin);
    let mut t = Tracer {
        walker: Walker {
            sb: &mut sb,
            topo: &topo,
            nl,
            count: 0,
            warnings: Vec::new(),
            mark: 0,
        },
    };
    let start = t.request(&origin, dst, to).await?;
    let request = t.leg(start).await?;
    let mut responder = None;
    let mut answer = None;
    let mut refused = None;
    // A request that never met an md program (over lo) is answered the same way.
    let touched = !request.hops.is_empty();
    if let (End::Delivered { receiver, .. }, true) = (&request.end, touched) {
        if let Some((who, start, why)) = t.answer(receiver, &request.frame).await? {
            responder = Some(who);
            refused = why;
            answer = Some(t.leg(start).await?);
        }
    }
    let mut warnings = std::mem::take(&mut t.walker.warnings);
    drop(t);
    let verdict = summarize(&topo, &request, answer.as_ref(), refused, to);
    warnings.extend(verdict.warnings.iter().cloned());
    warnings.extend(tracker_warnings(&sb.copied));
    for p in &sb.programs {
        if !p.same_as_live {
            warnings.push(format!(
                "{} of this md-user (tag {}) is not the program loaded in {}: the trace may differ from live traffic",
                p.program,
                p.tag,
                dp.pin_dir.display()
            ));
        }
    }
    let note = "a private copy: md's eBPF object loaded again with maps of its own, filled from the live pinned maps; packets run through it with BPF_PROG_TEST_RUN in md's host network namespace. Live maps, counters, tracker and events are not touched.".to_string();
    Ok(Report {
        from: from.to_string(),
        to: to.to_string(),
        sandbox: SandboxInfo {
            private_copy: true,
            programs: sb.programs.clone(),
            maps: sb.copied.clone(),
            note,
        },
        sender,
        request,
        responder,
        answer,
        verdict: Verdict {
            warnings,
            ..verdict
        },
    })
}

fn describe_origin(o: &Origin) -> String {
    match o {
        Origin::Container(n) => format!("container {n}"),
        Origin::Host => "a process of the host".into(),
        Origin::Outside(ip) => format!("{ip}, outside the host"),
    }
}

/// The container that publishes `ip:port` (as the datapath looks it up).
fn publisher(topo: &Topo, sb: &Sandbox, ip: Ipv4Addr, port: u16, proto: u8) -> Option<PortTarget> {
    let get = |k: PortKey| sb.get::<PortKey, PortTarget>(m::PORT_MAP, &k);
    get(PortKey::new(ip.octets(), port, proto)).or_else(|| {
        (topo.is_host_addr(ip) || ip.is_loopback())
            .then(|| get(PortKey::new([0; 4], port, proto)))
            .flatten()
    })
}

fn container<'a>(topo: &'a Topo, name: &str) -> Result<&'a Container> {
    topo.state
        .containers
        .get(name)
        .with_context(|| format!("no such container: {name}"))
}

fn resolve_from(topo: &Topo, sb: &Sandbox, from: &Peer, to: &Dest) -> Result<Origin> {
    Ok(match from {
        Peer::Container(n) => {
            let c = container(topo, n)?;
            if c.interfaces.is_empty() {
                bail!(
                    "container {n} has no interface on an md network (network mode {})",
                    c.mode
                );
            }
            Origin::Container(n.clone())
        }
        Peer::Host => Origin::Host,
        Peer::Outside(ip) => Origin::Outside(*ip),
        Peer::Addr(ip) => match topo.port_by_ip(*ip).and_then(|p| p.container.clone()) {
            Some(n) => Origin::Container(n),
            None if topo.is_host_addr(*ip) || ip.is_loopback() => Origin::Host,
            None => Origin::Outside(*ip),
        },
        Peer::Published(ip, port) => {
            let proto = match to.proto {
                Proto::Udp => IPPROTO_UDP,
                _ => IPPROTO_TCP,
            };
            let t = publisher(topo, sb, *ip, *port, proto).with_context(|| {
                format!(
                    "no port published on {ip}:{port}/{}",
                    crate::metrics::proto_name(proto)
                )
            })?;
            let p = topo
                .port_by_ip(Ipv4Addr::from(t.ip))
                .and_then(|p| p.container.clone())
                .with_context(|| {
                    format!(
                        "{ip}:{port} leads to {}, no container md knows",
                        Ipv4Addr::from(t.ip)
                    )
                })?;
            Origin::Container(p)
        }
    })
}

/// TO's address, as FROM would address it.
async fn resolve_to(topo: &Topo, nl: &Netlink, origin: &Origin, to: &Dest) -> Result<Ipv4Addr> {
    Ok(match &to.peer {
        Peer::Container(n) => {
            let c = container(topo, n)?;
            // The address on a network FROM shares with it, else its first.
            let shared = match origin {
                Origin::Container(f) => {
                    let f = container(topo, f)?;
                    c.interfaces
                        .iter()
                        .find(|i| f.on_network(&i.network))
                        .map(|i| i.ip)
                }
                _ => None,
            };
            shared
                .or_else(|| c.primary_ip())
                .with_context(|| format!("container {n} has no interface on an md network"))?
        }
        Peer::Outside(ip) | Peer::Addr(ip) | Peer::Published(ip, _) => *ip,
        Peer::Host => match origin {
            Origin::Container(f) => {
                let c = container(topo, f)?;
                let net = c
                    .interfaces
                    .first()
                    .and_then(|i| topo.state.networks.get(&i.network))
                    .with_context(|| format!("container {f}'s network is gone"))?;
                net.subnet.gateway()
            }
            Origin::Outside(ip) => nl
                .route_to(*ip)
                .await?
                .and_then(|r| r.source)
                .with_context(|| format!("the host has no route back to {ip}"))?,
            Origin::Host => Ipv4Addr::LOCALHOST,
        },
    })
}

/// A container's view of sending to one address: the route in its own namespace and the
/// interface (name and MAC) it takes.
struct Inside {
    route: Option<RouteTo>,
    ifname: Option<String>,
    mac: Option<Mac>,
}

fn inside(c: &Container, dst: Ipv4Addr) -> Result<Inside> {
    if c.pid == 0 || !crate::proc::alive(c.pid, c.pid_start) {
        bail!("container {} is not running", c.name);
    }
    let ns = Netns::of_pid(c.pid)?;
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let nl = Netlink::connect()?;
            let route = nl.route_to(dst).await?;
            let link = match route.as_ref().and_then(|r| r.oif) {
                Some(i) => nl.link_by_index(i).await?,
                None => None,
            };
            Ok(Inside {
                route,
                ifname: link.as_ref().map(|l| l.name.clone()),
                mac: link.and_then(|l| l.mac.as_slice().try_into().ok()),
            })
        })
    })
}

/// Whether a socket listens for `h` in the network namespace whose `/proc/.../net` is
/// `net_dir`: TCP listeners, bound UDP sockets (IPv4, and IPv6 ones that take IPv4). None when
/// the question does not apply (ICMP) or the tables cannot be read.
fn listens(net_dir: &Path, h: &Headers) -> Option<bool> {
    let (proto, port) = match h.l4 {
        L4::Tcp { dport, .. } => ("tcp", dport),
        L4::Udp { dport, .. } => ("udp", dport),
        _ => return None,
    };
    let mut readable = false;
    for file in [proto.to_string(), format!("{proto}6")] {
        let Ok(text) = std::fs::read_to_string(net_dir.join(&file)) else {
            continue;
        };
        readable = true;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let want_state = if proto == "tcp" { "0A" } else { "07" };
            if f[3] != want_state {
                continue;
            }
            let Some((addr, p)) = f[1].split_once(':') else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() != Some(port) {
                continue;
            }
            if proc_addr_matches(addr, h.daddr) {
                return Some(true);
            }
        }
    }
    readable.then_some(false)
}

/// Whether a /proc/net address (hex words in host order) is `ip` or a wildcard taking it.
fn proc_addr_matches(hex: &str, ip: Ipv4Addr) -> bool {
    let words: Option<Vec<[u8; 4]>> = (0..hex.len() / 8)
        .map(|i| {
            u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16)
                .ok()
                .map(u32::to_ne_bytes)
        })
        .collect();
    let Some(words) = words else {
        return false;
    };
    match words.as_slice() {
        [a] => *a == [0; 4] || *a == ip.octets(),
        [w0, w1, w2, w3] => {
            let mut b = [0u8; 16];
            for (i, w) in [w0, w1, w2, w3].iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(*w);
            }
            let v6 = std::net::Ipv6Addr::from(b);
            v6.is_unspecified() || v6.to_ipv4_mapped() == Some(ip)
        }
        _ => false,
    }
}

/// The source port (or echo identifier) for a new flow: the first from [`FIRST_PORT`] with no
/// tracked flow on the same tuple, so the trace shows a new flow, not some live one.
fn free_port(sb: &Sandbox, src: Ipv4Addr, dst: Ipv4Addr, dport: u16, proto: Proto) -> u16 {
    (FIRST_PORT..=60999)
        .find(|p| {
            let h = Headers {
                eth_src: [0; 6],
                eth_dst: [0; 6],
                saddr: src,
                daddr: dst,
                ttl: 64,
                l4: l4_for(proto, *p, dport),
            };
            lookups::ct_key(&h).is_none_or(|k| lookups::ct_find(sb, &k).is_none())
        })
        .unwrap_or(FIRST_PORT)
}

fn l4_for(proto: Proto, sport: u16, dport: u16) -> L4 {
    match proto {
        Proto::Tcp => L4::Tcp {
            sport,
            dport,
            seq: 1000,
            ack: 0,
            flags: packet::TCP_SYN,
        },
        Proto::Udp => L4::Udp { sport, dport },
        Proto::Icmp => L4::Icmp {
            typ: packet::ICMP_ECHO,
            code: 0,
            id: sport,
            seq: 1,
        },
    }
}

struct Tracer<'a> {
    walker: Walker<'a>,
}

impl Tracer<'_> {
    async fn leg(&mut self, start: Start) -> Result<Leg> {
        let mut leg = match start.end {
            Some(mut end) => {
                if let End::Delivered { packet, .. } = &mut end {
                    *packet = PacketView::of(&start.frame);
                }
                Leg {
                    before: Vec::new(),
                    hops: Vec::new(),
                    end,
                    frame: start.frame.clone(),
                }
            }
            None => self.walker.walk(start.step, start.frame).await?,
        };
        let mut before = start.before;
        before.append(&mut leg.before);
        leg.before = before;
        Ok(leg)
    }

    /// The request FROM sends to `dst`.
    async fn request(&mut self, origin: &Origin, dst: Ipv4Addr, to: &Dest) -> Result<Start> {
        let dport = to.port.unwrap_or(0);
        match origin {
            Origin::Container(name) => {
                let topo = self.walker.topo;
                let c = container(topo, name)?;
                let sb = &*self.walker.sb;
                self.container_sends(
                    c,
                    None,
                    dst,
                    |src| l4_for(to.proto, free_port(sb, src, dst, dport, to.proto), dport),
                    &[],
                )
            }
            Origin::Host => self.host_sends(None, dst, to.proto, dport, true).await,
            Origin::Outside(ip) => {
                let sport = free_port(self.walker.sb, *ip, dst, dport, to.proto);
                let l4 = l4_for(to.proto, sport, dport);
                self.outside_sends(*ip, dst, l4).await
            }
        }
    }

    /// A frame container `c` sends to `dst`: out of the interface its own routing picks, from
    /// that interface's MAC and (unless `src` is given) the address routing picks, to the MAC
    /// the next hop has on md's bridge.
    fn container_sends(
        &self,
        c: &Container,
        src: Option<Ipv4Addr>,
        dst: Ipv4Addr,
        l4: impl FnOnce(Ipv4Addr) -> L4,
        payload: &[u8],
    ) -> Result<Start> {
        let topo = self.walker.topo;
        let mut before = Vec::new();
        let view = match inside(c, dst) {
            Ok(v) => Some(v),
            Err(e) => {
                before.push(format!(
                    "could not look inside {} ({}): using md's records of it",
                    c.name,
                    crate::error::one_line(&e)
                ));
                None
            }
        };
        let route = view.as_ref().and_then(|v| v.route.clone());
        if let (Some(_), None) = (&view, &route) {
            return Ok(ended(before, format!("{} has no route to {dst}", c.name)));
        }
        if route.as_ref().is_some_and(|r| r.local) {
            let ip = route.as_ref().and_then(|r| r.source).unwrap_or(dst);
            let h = Headers {
                eth_src: [0; 6],
                eth_dst: [0; 6],
                saddr: ip,
                daddr: dst,
                ttl: 64,
                l4: l4(ip),
            };
            before.push(format!(
                "{dst} is {}'s own address: the packet stays on its lo, where no md program runs",
                c.name
            ));
            return Ok(Start {
                step: Step::Stack { from: None },
                frame: packet::build(&h),
                before,
                end: Some(End::Delivered {
                    to: c.name.clone(),
                    receiver: Receiver::Container {
                        name: c.name.clone(),
                        ifindex: 0,
                        ip: dst,
                    },
                    packet: PacketView::of(&[]),
                }),
            });
        }
        let ifname = view.as_ref().and_then(|v| v.ifname.clone());
        let iface = match &ifname {
            Some(n) => c.interfaces.iter().find(|i| &i.name == n),
            None => c.interfaces.first(),
        };
        let Some(iface) = iface else {
            return Ok(ended(
                before,
                format!(
                    "{} routes {dst} through {}, which is not an md interface",
                    c.name,
                    ifname.unwrap_or_default()
                ),
            ));
        };
        let mac = view.as_ref().and_then(|v| v.mac).unwrap_or(iface.mac);
        let saddr = src
            .or_else(|| route.as_ref().and_then(|r| r.source))
            .unwrap_or(iface.ip);
        let hop = route.as_ref().and_then(|r| r.gateway).unwrap_or(dst);
        let net_id = topo.state.networks.get(&iface.network).map(|n| n.id);
        let hop_mac = topo
            .port_by_ip(hop)
            .filter(|p| Some(p.ep.net_id) == net_id)
            .map(|p| p.ep.mac)
            .or_else(|| {
                topo.gateway_of(hop)
                    .and_then(|id| topo.network(id))
                    .map(|n| n.gateway_mac)
            });
        let eth_dst = match hop_mac {
            Some(m) => m,
            None => {
                return Ok(ended(
                    before,
                    format!(
                        "{} sends to {dst} through {hop} on its {}, but nothing on that network has {hop}: ARP goes unanswered",
                        c.name, iface.name
                    ),
                ))
            }
        };
        let h = Headers {
            eth_src: mac,
            eth_dst,
            saddr,
            daddr: dst,
            ttl: 64,
            l4: l4(saddr),
        };
        before.push(format!(
            "{} sends from {} ({}, {}) to {} via {hop} ({})",
            c.name,
            iface.name,
            saddr,
            packet::mac_str(&mac),
            dst,
            packet::mac_str(&eth_dst)
        ));
        Ok(Start {
            step: Step::Program {
                ifindex: iface.ifindex,
                dir: Dir::Ingress,
            },
            frame: if payload.is_empty() {
                packet::build(&h)
            } else {
                packet::build_with(&h, payload)
            },
            before,
            end: None,
        })
    }

    /// A packet a host process sends. With `sockets`, md's socket programs (connect4,
    /// sendmsg4) apply first: they cannot run under BPF_PROG_TEST_RUN, so their rule is
    /// applied here to the private maps, and said so.
    async fn host_sends(
        &self,
        src: Option<Ipv4Addr>,
        dst: Ipv4Addr,
        proto: Proto,
        dport: u16,
        sockets: bool,
    ) -> Result<Start> {
        let topo = self.walker.topo;
        let sb = &*self.walker.sb;
        let mut before = Vec::new();
        let (mut dst, mut dport) = (dst, dport);
        if sockets && proto != Proto::Icmp {
            let probe = Headers {
                eth_src: [0; 6],
                eth_dst: [0; 6],
                saddr: Ipv4Addr::UNSPECIFIED,
                daddr: dst,
                ttl: 64,
                l4: l4_for(proto, 0, dport),
            };
            if let Some((k, t)) = lookups::port_entry(sb, topo, &probe) {
                let prog = if proto == Proto::Tcp {
                    m::PROG_SOCK_CONNECT4
                } else {
                    m::PROG_SOCK_SENDMSG4
                };
                if listens(Path::new("/proc/self/net"), &probe) == Some(true) {
                    before.push(format!(
                        "{prog} (modelled): {dst}:{dport} is published, but a host socket listens there: the host's socket wins, no translation"
                    ));
                } else {
                    let (ip, port) = (Ipv4Addr::from(t.ip), t.port);
                    before.push(format!(
                        "{prog} (modelled: cgroup socket programs cannot run under BPF_PROG_TEST_RUN; its rule applied to the copied maps): PORT_MAP {}:{}/{} → {ip}:{port} ({}): the socket connects to {ip}:{port}",
                        if k.ip == [0; 4] { "*".to_string() } else { Ipv4Addr::from(k.ip).to_string() },
                        k.port,
                        proto,
                        topo.identity_name(t.identity)
                    ));
                    dst = ip;
                    dport = port;
                }
            }
        }
        let Some(r) = self.walker.nl.route_to(dst).await? else {
            return Ok(ended(before, format!("the host has no route to {dst}")));
        };
        let saddr = src.or(r.source).unwrap_or(Ipv4Addr::LOCALHOST);
        let sport = match src {
            Some(_) => 0,
            None => free_port(sb, saddr, dst, dport, proto),
        };
        let l4 = l4_for(proto, sport, dport);
        let h = Headers {
            eth_src: [0; 6],
            eth_dst: [0; 6],
            saddr,
            daddr: dst,
            ttl: 64,
            l4,
        };
        if r.local {
            before.push(format!(
                "{dst} is the host's own address: the packet stays on lo, where no md program runs"
            ));
            return Ok(Start {
                step: Step::Stack { from: None },
                frame: packet::build(&h),
                before,
                end: Some(End::Delivered {
                    to: "host".into(),
                    receiver: Receiver::Host,
                    packet: PacketView::of(&packet::build(&h)),
                }),
            });
        }
        before.push(format!("a host process sends {} > {}", h.src(), h.dst()));
        Ok(Start {
            step: Step::Stack { from: None },
            frame: packet::build(&h),
            before,
            end: None,
        })
    }

    /// A packet from `ip` beyond the host: it arrives on the interface the host routes `ip`
    /// through (the default uplink for an address md's bridges claim: a forged one).
    async fn outside_sends(&self, ip: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Result<Start> {
        let topo = self.walker.topo;
        let r = self.walker.nl.route_to(ip).await?;
        let uplink = topo.state.datapath.as_ref().map(|d| d.uplink_ifindex);
        let oif = r
            .as_ref()
            .and_then(|r| r.oif)
            .filter(|i| topo.bridge_net(*i).is_none() && !r.as_ref().is_some_and(|r| r.local))
            .or(uplink)
            .context("no interface for the outside: md's datapath has no uplink")?;
        let hop = r.as_ref().and_then(|r| r.gateway).unwrap_or(ip);
        let neigh = self
            .walker
            .nl
            .neighbour_mac(oif, hop)
            .await
            .ok()
            .flatten()
            .and_then(|m| <Mac>::try_from(m.as_slice()).ok());
        let h = Headers {
            eth_src: neigh.unwrap_or(UNKNOWN_MAC),
            eth_dst: topo.if_mac(oif).unwrap_or([0; 6]),
            saddr: ip,
            daddr: dst,
            ttl: 64,
            l4,
        };
        let mut before = vec![format!(
            "{} arrives on {} from {hop} ({})",
            h.src(),
            topo.if_name(oif),
            match neigh {
                Some(m) => packet::mac_str(&m),
                None => "not in the neighbour table: MAC made up".into(),
            }
        )];
        if topo.is_layer3(oif) {
            before.push(format!(
                "{} is a layer-3 device: the frame's MACs mean nothing there",
                topo.if_name(oif)
            ));
        }
        Ok(Start {
            step: Step::Program {
                ifindex: oif,
                dir: Dir::Ingress,
            },
            frame: packet::build(&h),
            before,
            end: None,
        })
    }

    /// The answer to a delivered request: who gives it, where it starts, and whether it is a
    /// refusal (nothing listens) and why.
    async fn answer(
        &mut self,
        receiver: &Receiver,
        frame: &[u8],
    ) -> Result<Option<(String, Start, Option<String>)>> {
        let Some(got) = packet::parse(frame) else {
            return Ok(None);
        };
        let topo = self.walker.topo;
        let (listening, who) = match receiver {
            Receiver::Container { name, .. } => {
                let c = container(topo, name)?;
                (
                    listens(Path::new(&format!("/proc/{}/net", c.pid)), &got),
                    name.clone(),
                )
            }
            Receiver::Host => (
                listens(Path::new("/proc/self/net"), &got),
                "the host".into(),
            ),
            Receiver::Outside { .. } => (None, got.daddr.to_string()),
        };
        let port = got.l4.ports().map(|(_, d)| d).unwrap_or(0);
        let proto = crate::metrics::proto_name(got.l4.proto());
        let (h, payload, text, refused) = if listening == Some(false) {
            let Some((h, payload)) = packet::refusal(frame) else {
                return Ok(None);
            };
            let how = if matches!(got.l4, L4::Tcp { .. }) {
                "a RST"
            } else {
                "an ICMP port unreachable"
            };
            (
                h,
                payload,
                format!("nothing listens on {port}/{proto} at {who}: {who} answers with {how}"),
                Some(format!("nothing listens on {}:{port}/{proto}", got.daddr)),
            )
        } else {
            let Some(h) = packet::answer(&got) else {
                return Ok(None);
            };
            let text = match (listening, receiver) {
                (Some(true), _) => format!("{who} listens on {port}/{proto} and answers"),
                (_, Receiver::Outside { .. }) => {
                    format!("assuming {who} answers (it is outside: trace cannot look)")
                }
                _ => format!("{who} answers"),
            };
            (h, Vec::new(), text, None)
        };
        let start = match receiver {
            Receiver::Container { name, .. } => {
                let c = container(topo, name)?;
                let l4 = h.l4;
                let mut s = self.container_sends(c, Some(h.saddr), h.daddr, |_| l4, &payload)?;
                s.before.insert(0, text.clone());
                s
            }
            Receiver::Host => {
                let mut s = self.host_answers(h, &payload).await?;
                s.before.insert(0, text.clone());
                s
            }
            Receiver::Outside { ifindex, .. } => Start {
                step: Step::Program {
                    ifindex: *ifindex,
                    dir: Dir::Ingress,
                },
                frame: packet::build_with(&h, &payload),
                before: vec![text.clone()],
                end: None,
            },
        };
        Ok(Some((text, start, refused)))
    }

    /// The host's answer (from the address the request reached), routed like any packet the
    /// host sends; socket programs do not touch answers.
    async fn host_answers(&self, h: Headers, payload: &[u8]) -> Result<Start> {
        let frame = packet::build_with(&h, payload);
        match self.walker.nl.route_to(h.daddr).await? {
            Some(r) if r.local => Ok(Start {
                step: Step::Stack { from: None },
                frame: frame.clone(),
                before: vec!["the answer stays on lo".into()],
                end: Some(End::Delivered {
                    to: "host".into(),
                    receiver: Receiver::Host,
                    packet: PacketView::of(&frame),
                }),
            }),
            Some(_) => Ok(Start {
                step: Step::Stack { from: None },
                frame,
                before: Vec::new(),
                end: None,
            }),
            None => Ok(ended(
                Vec::new(),
                format!("the host has no route to {}", h.daddr),
            )),
        }
    }
}

fn ended(before: Vec<String>, why: String) -> Start {
    Start {
        step: Step::Stack { from: None },
        frame: Vec::new(),
        before,
        end: Some(End::Lost { why }),
    }
}

/// Trackers at 95 % or more: LRU eviction starts around there.
fn tracker_warnings(copied: &[Copied]) -> Vec<String> {
    copied
        .iter()
        .filter(|c| m::TRACKERS.contains(&c.map.as_str()))
        .filter(|c| c.entries as u64 * 100 >= c.capacity as u64 * 95)
        .map(|c| {
            format!(
                "tracker-full: {} holds {} of {} entries; a new flow evicts the least recently used ones, and an answer whose entries were evicted is dropped as unsolicited",
                c.map, c.entries, c.capacity
            )
        })
        .collect()
}

fn summarize(
    topo: &Topo,
    request: &Leg,
    answer: Option<&Leg>,
    refused: Option<String>,
    to: &Dest,
) -> Verdict {
    let v = |result: &str, reason: Option<String>, rule, summary: String| Verdict {
        result: result.into(),
        reason,
        rule,
        summary,
        warnings: Vec::new(),
    };
    match &request.end {
        End::Dropped {
            reason,
            at,
            detail,
            rule,
            ..
        } => v(
            "dropped",
            Some(reason.clone()),
            rule.clone(),
            format!("dropped by {at}: {reason}: {detail}"),
        ),
        End::Lost { why } => v("lost", None, None, why.clone()),
        End::Delivered {
            to: who,
            packet,
            receiver,
        } => {
            let arrived = format!("delivered to {who} as {} > {}", packet.src, packet.dst);
            if let Some(why) = refused {
                let published = matches!(receiver, Receiver::Host)
                    && packet
                        .headers
                        .is_some_and(|h| topo.is_host_addr(h.daddr) || h.daddr.is_loopback());
                let reason = if published && to.port.is_some() {
                    "no-published-port"
                } else {
                    "no-listener"
                };
                let summary = if reason == "no-published-port" {
                    format!("{arrived}, but no port is published there and {why}: refused")
                } else {
                    format!("{arrived}, but {why}: refused")
                };
                return v("refused", Some(reason.into()), None, summary);
            }
            match answer.map(|a| &a.end) {
                Some(End::Dropped {
                    reason,
                    at,
                    detail,
                    rule,
                    ..
                }) => v(
                    "answer-dropped",
                    Some(reason.clone()),
                    rule.clone(),
                    format!("{arrived}, but the answer is dropped by {at}: {reason}: {detail}"),
                ),
                Some(End::Lost { why }) => v(
                    "answer-lost",
                    None,
                    None,
                    format!("{arrived}, but the answer is lost: {why}"),
                ),
                Some(End::Delivered { to, packet, .. }) => v(
                    "delivered",
                    None,
                    None,
                    format!(
                        "{arrived}; the answer reaches {to} as {} > {}",
                        packet.src, packet.dst
                    ),
                ),
                None => v("delivered", None, None, arrived),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_trackers_are_named() {
        let c = |map: &str, entries, capacity| Copied {
            map: map.into(),
            entries,
            capacity,
        };
        let w = tracker_warnings(&[
            c(m::CONNTRACK, 10, 131072),
            c(m::CONNTRACK_NEW, 65536, 65536),
            c(m::PORT_MAP, 65536, 65536),
        ]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("tracker-full: CONNTRACK_NEW holds 65536 of 65536"),
            "{w:?}"
        );
        assert!(tracker_warnings(&[c(m::CONNTRACK, 124518, 131072)]).is_empty());
        assert_eq!(
            tracker_warnings(&[c(m::CONNTRACK, 124519, 131072)]).len(),
            1
        );
    }

    #[test]
    fn proc_net_addresses() {
        let ip = Ipv4Addr::new(127, 0, 0, 1);
        // 127.0.0.1 as /proc/net/tcp prints it on a little-endian host.
        let lo = u32::from_ne_bytes(ip.octets());
        assert!(proc_addr_matches(&format!("{lo:08X}"), ip));
        assert!(proc_addr_matches("00000000", ip));
        assert!(!proc_addr_matches(
            &format!("{lo:08X}"),
            Ipv4Addr::new(10, 0, 0, 1)
        ));
        assert!(proc_addr_matches(&"0".repeat(32), ip));
        let mapped: String = [0u32, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), lo]
            .iter()
            .map(|w| format!("{w:08X}"))
            .collect();
        assert!(proc_addr_matches(&mapped, ip));
        assert!(!proc_addr_matches(&mapped, Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn listeners_are_read_from_proc_net_tables() {
        let dir = std::env::temp_dir().join(format!("md-trace-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lo = u32::from_ne_bytes([127, 0, 0, 1]);
        std::fs::write(
            dir.join("tcp"),
            format!(
                "  sl  local_address rem_address   st\n   0: 00000000:0050 00000000:0000 0A\n   1: {lo:08X}:1F90 00000000:0000 0A\n   2: 00000000:0016 0100000A:A000 01\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("udp"), "  sl  local_address rem_address   st\n").unwrap();
        let h = |ip: [u8; 4], port: u16, udp: bool| Headers {
            eth_src: [0; 6],
            eth_dst: [0; 6],
            saddr: Ipv4Addr::UNSPECIFIED,
            daddr: Ipv4Addr::from(ip),
            ttl: 64,
            l4: if udp {
                L4::Udp {
                    sport: 1,
                    dport: port,
                }
            } else {
                l4_for(Proto::Tcp, 1, port)
            },
        };
        assert_eq!(listens(&dir, &h([172, 18, 0, 2], 80, false)), Some(true));
        assert_eq!(listens(&dir, &h([127, 0, 0, 1], 8080, false)), Some(true));
        assert_eq!(listens(&dir, &h([192, 0, 2, 1], 8080, false)), Some(false));
        // Port 22 is a connection, not a listener.
        assert_eq!(listens(&dir, &h([10, 0, 0, 1], 22, false)), Some(false));
        assert_eq!(listens(&dir, &h([10, 0, 0, 1], 53, true)), Some(false));
        let echo = Headers {
            l4: l4_for(Proto::Icmp, 1, 0),
            ..h([10, 0, 0, 1], 0, false)
        };
        assert_eq!(listens(&dir, &echo), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
