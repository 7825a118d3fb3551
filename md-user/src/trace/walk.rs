//! The hop engine: runs a frame through whatever md program is attached where it is, reads the
//! verdict, and works out where the frame goes next the way the host would: a bridge switches
//! by destination MAC, the host's IP stack delivers locally or routes, a redirect goes where
//! the rewritten headers and md's maps say. Nothing here knows what md's programs do; it
//! reads what they did.

use std::net::Ipv4Addr;

use anyhow::Result;
use md_common::{
    drop_reason_name, maps as m, CtKey, PolicyKey, DROP_FORWARD, DROP_ISOLATION, DROP_NAT_PORTS,
    DROP_NO_SOURCE, DROP_POLICY, DROP_SPOOF, DROP_UNSOLICITED, DROP_UNSUPPORTED, POLICY_DENY,
};
use serde::Serialize;

use super::{
    lookups::{self, Counter, Lookup, Snapshot},
    packet::{self, mac_str, Headers, Mac},
    sandbox::Sandbox,
    topo::{Dir, Topo},
};
use crate::{datapath::monotonic_ns, netlink::Netlink};

/// TC return codes as TCX reports them.
pub const TCX_NEXT: i32 = -1;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_STOLEN: i32 = 4;
pub const TC_ACT_REDIRECT: i32 = 7;

/// More steps than any path through a host takes: a loop.
const MAX_STEPS: usize = 24;

/// Where a frame is between programs.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// At one end of an interface, where md's programs (if any) run.
    Program { ifindex: u32, dir: Dir },
    /// Entering a bridge from port `from`.
    Bridge { net_id: u32, from: u32 },
    /// Received by the host's IP stack from interface `from`, or sent by a host process (None).
    Stack { from: Option<u32> },
}

enum Next {
    Go(Step),
    End(Box<End>),
}

/// A frame's headers for display.
#[derive(Debug, Clone, Serialize)]
pub struct PacketView {
    pub eth_src: String,
    pub eth_dst: String,
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub what: String,
    pub ttl: u8,
    pub checksums_ok: bool,
    #[serde(skip)]
    pub headers: Option<Headers>,
}

impl PacketView {
    pub fn of(frame: &[u8]) -> PacketView {
        match packet::parse(frame) {
            Some(h) => PacketView {
                eth_src: mac_str(&h.eth_src),
                eth_dst: mac_str(&h.eth_dst),
                src: h.src(),
                dst: h.dst(),
                proto: crate::metrics::proto_name(h.l4.proto()),
                what: h.what(),
                ttl: h.ttl,
                checksums_ok: packet::checksums_ok(frame),
                headers: Some(h),
            },
            None => PacketView {
                eth_src: String::new(),
                eth_dst: String::new(),
                src: String::new(),
                dst: String::new(),
                proto: String::new(),
                what: format!("not an IPv4 frame ({} bytes)", frame.len()),
                ttl: 0,
                checksums_ok: false,
                headers: None,
            },
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{} > {}  {} > {}  {} ttl {}",
            self.eth_src, self.eth_dst, self.src, self.dst, self.what, self.ttl
        )
    }
}

/// One program run.
#[derive(Debug, Clone, Serialize)]
pub struct Hop {
    pub n: usize,
    pub program: String,
    /// The program run in its place (a layer-3 program runs as its Ethernet twin: see
    /// [`ethernet_twin`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ran_as: Option<String>,
    pub interface: String,
    pub ifindex: u32,
    pub hook: Dir,
    /// What the hook sees, for people.
    pub role: String,
    pub packet_in: PacketView,
    pub lookups: Vec<Lookup>,
    pub return_code: i32,
    /// pass, ok, drop, redirect, stolen, or the code.
    pub verdict: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    pub counters: Vec<Counter>,
    pub changes: Vec<String>,
    /// What `monitor` would have shown for it.
    pub events: Vec<String>,
    pub rewritten: Vec<String>,
    pub packet_out: PacketView,
    /// What happens between this program and the next (bridge, routing, redirect).
    pub then: Vec<String>,
}

/// Who received a delivered frame.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Receiver {
    Container {
        name: String,
        ifindex: u32,
        ip: Ipv4Addr,
    },
    Host,
    /// Sent out of a host interface towards the network beyond.
    Outside {
        interface: String,
        ifindex: u32,
    },
}

/// How a leg ends.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum End {
    Delivered {
        to: String,
        receiver: Receiver,
        packet: PacketView,
    },
    Dropped {
        /// drop_reason_name of the counter that moved.
        reason: String,
        at: String,
        program: String,
        interface: String,
        ifindex: u32,
        /// The IF_STATS drop counter that moved (and on which interface).
        #[serde(skip_serializing_if = "Option::is_none")]
        counter: Option<Counter>,
        hop: usize,
        detail: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<Rule>,
    },
    Lost {
        why: String,
    },
}

/// A policy rule by container names.
#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    pub from: String,
    pub to: String,
    /// "deny", or "default deny" when no rule matched.
    pub verdict: String,
}

/// One direction of a trace.
#[derive(Debug, Clone, Serialize)]
pub struct Leg {
    /// What happens before the first program (a host process's socket, routing).
    pub before: Vec<String>,
    pub hops: Vec<Hop>,
    pub end: End,
    #[serde(skip)]
    pub frame: Vec<u8>,
}

/// A layer-3 device's program runs as its Ethernet twin: BPF_PROG_TEST_RUN frames every
/// packet as Ethernet (it parses an Ethernet header before the program runs), and md's twins
/// are the same code with the IP header 14 bytes in.
pub fn ethernet_twin(prog: &str) -> Option<&'static str> {
    match prog {
        m::PROG_L3_INGRESS => Some(m::PROG_UPLINK_INGRESS),
        m::PROG_L3_EGRESS => Some(m::PROG_UPLINK_EGRESS),
        _ => None,
    }
}

pub fn verdict_name(code: i32) -> String {
    match code {
        TCX_NEXT => "pass".into(),
        TC_ACT_OK => "ok".into(),
        TC_ACT_SHOT => "drop".into(),
        TC_ACT_STOLEN => "stolen".into(),
        TC_ACT_REDIRECT => "redirect".into(),
        c => format!("code {c}"),
    }
}

/// A MAC address for a neighbour the host's table does not know (locally administered).
pub const UNKNOWN_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];

pub struct Walker<'a> {
    pub sb: &'a mut Sandbox,
    pub topo: &'a Topo,
    pub nl: &'a Netlink,
    /// Hops numbered across both legs.
    pub count: usize,
    /// Where the trace may differ from the real packet.
    pub warnings: Vec<String>,
    /// The skb mark of the frame in flight: the veth sets `MARK_TRANSLATED` on what it
    /// translated for the uplink, whose egress program clears it.
    pub mark: u32,
}

fn ip_forwarding() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|s| s.trim() == "1")
}

impl Walker<'_> {
    /// Follows a frame from `step` until it is delivered, dropped or lost.
    pub async fn walk(&mut self, mut step: Step, mut frame: Vec<u8>) -> Result<Leg> {
        // A leg starts in a namespace of its own (a container, the outside): no mark crosses.
        self.mark = 0;
        let mut leg = Leg {
            before: Vec::new(),
            hops: Vec::new(),
            end: End::Lost { why: String::new() },
            frame: Vec::new(),
        };
        for _ in 0..MAX_STEPS {
            let (next, text) = match step {
                Step::Program { ifindex, dir } => {
                    self.programs(&mut leg, ifindex, dir, &mut frame).await?
                }
                Step::Bridge { net_id, from } => self.bridge(net_id, from, &frame),
                Step::Stack { from } => self.stack(from, &mut frame).await?,
            };
            if !text.is_empty() {
                leg.note(text);
            }
            match next {
                Next::Go(s) => step = s,
                Next::End(end) => {
                    let mut end = *end;
                    if let End::Delivered {
                        packet,
                        receiver,
                        to,
                    } = &mut end
                    {
                        *packet = PacketView::of(&frame);
                        if let (Receiver::Outside { interface, .. }, Some(h)) =
                            (receiver, &packet.headers)
                        {
                            *to = format!("{} (out of {interface})", h.daddr);
                        }
                    }
                    leg.end = end;
                    leg.frame = frame;
                    return Ok(leg);
                }
            }
        }
        leg.end = End::Lost {
            why: format!("more than {MAX_STEPS} steps: the packet loops"),
        };
        leg.frame = frame;
        Ok(leg)
    }

    /// Runs the programs at one end of an interface, in order, until one decides.
    async fn programs(
        &mut self,
        leg: &mut Leg,
        ifindex: u32,
        dir: Dir,
        frame: &mut Vec<u8>,
    ) -> Result<(Next, String)> {
        let progs = self.topo.programs(ifindex, dir);
        if progs.is_empty() {
            leg.note(format!(
                "no md program at {} {}",
                self.topo.describe_if(ifindex),
                dir.name()
            ));
        }
        for prog in progs {
            let (hop, code, out) = self.run(&prog, ifindex, dir, frame)?;
            *frame = out;
            let n = hop.n;
            let reason = hop.drop_reason_code;
            let at = format!("{} on {}", prog, self.topo.describe_if(ifindex));
            let in_headers = hop.hop.packet_in.headers;
            let rules = hop.rules.clone();
            let twin = hop.hop.ran_as.clone();
            let counter = hop
                .hop
                .counters
                .iter()
                .find(|c| c.counter.starts_with("drops."))
                .cloned();
            leg.hops.push(hop.hop);
            match code {
                TCX_NEXT => continue,
                TC_ACT_OK => break,
                TC_ACT_REDIRECT if twin.is_some() => {
                    // The Ethernet twin may redirect where the layer-3 program cannot (it has
                    // no Ethernet header to rewrite): say so, and follow the twin.
                    self.warnings.push(format!(
                        "{prog} on {} ran as {} and redirected; the layer-3 program itself may leave the packet to the host stack there (same destination, another way)",
                        self.topo.if_name(ifindex),
                        twin.unwrap_or_default()
                    ));
                    let counted = &leg
                        .hops
                        .last()
                        .map(|h| h.counters.clone())
                        .unwrap_or_default();
                    return self.redirected(frame, dir, counted).await;
                }
                TC_ACT_REDIRECT => {
                    let counted = &leg
                        .hops
                        .last()
                        .map(|h| h.counters.clone())
                        .unwrap_or_default();
                    return self.redirected(frame, dir, counted).await;
                }
                TC_ACT_SHOT => {
                    let mut end = self.dropped(reason, at, n, in_headers, &rules);
                    if let End::Dropped {
                        program,
                        interface,
                        ifindex: i,
                        counter: c,
                        ..
                    } = &mut end
                    {
                        *program = prog.clone();
                        *interface = self.topo.if_name(ifindex);
                        *i = ifindex;
                        *c = counter;
                    }
                    return Ok((Next::End(Box::new(end)), "dropped".into()));
                }
                c => {
                    let why = format!(
                        "{prog} returned {} (neither pass, drop nor redirect)",
                        verdict_name(c)
                    );
                    return Ok((Next::End(Box::new(End::Lost { why })), String::new()));
                }
            }
        }
        Ok(self.passed(ifindex, dir))
    }

    /// Runs one program on a frame and records what it saw, did and decided.
    fn run(
        &mut self,
        prog: &str,
        ifindex: u32,
        dir: Dir,
        frame: &[u8],
    ) -> Result<(Ran, i32, Vec<u8>)> {
        self.count += 1;
        let ran_as = ethernet_twin(prog).filter(|t| self.sb.has_program(t));
        let runs = ran_as.unwrap_or(prog);
        let packet_in = PacketView::of(frame);
        let in_h = packet_in.headers;
        // The tracker entries this packet can touch: its own tuple both ways and, for a tracked
        // flow, what it becomes both ways. A new flow's entries are keyed by the packet as it
        // arrives and as it leaves (reversed), and cannot have existed before (the tracker
        // refuses a clash), so whatever the rewritten packet's keys find afterwards is new.
        let mut keys: Vec<CtKey> = Vec::new();
        if let Some(k) = in_h.as_ref().and_then(lookups::ct_key) {
            keys.push(k);
            keys.push(k.reversed());
            if let Some((_, e)) = lookups::ct_find(self.sb, &k) {
                let t = e.nat_tuple(k.proto);
                if t != k {
                    keys.push(t);
                    keys.push(t.reversed());
                }
            }
        }
        let now = monotonic_ns();
        let lookups = in_h
            .as_ref()
            .map(|h| lookups::lookups(self.sb, self.topo, h, now))
            .unwrap_or_default();
        let mut before = Snapshot::take(self.sb, &keys);
        let (code, out, mark) = self.sb.run(runs, ifindex, self.mark, frame)?;
        self.mark = mark;
        let packet_out = PacketView::of(&out);
        if let Some(k) = packet_out.headers.as_ref().and_then(lookups::ct_key) {
            for k in [k, k.reversed()] {
                if !keys.contains(&k) {
                    keys.push(k);
                    before.add_missing(k);
                }
            }
        }
        let after = Snapshot::take(self.sb, &keys);
        let changed = lookups::diff(self.topo, &before, &after, monotonic_ns());
        let events = self
            .sb
            .drain_events()
            .iter()
            .map(|e| lookups::fmt_event(self.topo, e))
            .collect();
        let drop_reason_code = (code == TC_ACT_SHOT)
            .then(|| changed.drop.map(|d| d.0))
            .flatten();
        let hop = Hop {
            n: self.count,
            program: prog.to_string(),
            ran_as: ran_as.map(str::to_string),
            interface: self.topo.if_name(ifindex),
            ifindex,
            hook: dir,
            role: self.role(ifindex, dir),
            rewritten: rewritten(in_h.as_ref(), packet_out.headers.as_ref()),
            packet_in,
            lookups,
            return_code: code,
            verdict: verdict_name(code),
            drop_reason: drop_reason_code.map(|r| drop_reason_name(r).to_string()),
            counters: changed.counters,
            changes: changed.changes,
            events,
            packet_out,
            then: Vec::new(),
        };
        Ok((
            Ran {
                hop,
                n: self.count,
                drop_reason_code,
                rules: changed.rules,
            },
            code,
            out,
        ))
    }

    fn role(&self, ifindex: u32, dir: Dir) -> String {
        let what = self.topo.describe_if(ifindex);
        match (self.topo.port_by_ifindex(ifindex), dir) {
            (Some(p), Dir::Ingress) => format!(
                "{what} ingress: what {} sends",
                p.container.as_deref().unwrap_or("the container")
            ),
            (Some(p), Dir::Egress) => format!(
                "{what} egress: what {} receives",
                p.container.as_deref().unwrap_or("the container")
            ),
            (None, Dir::Ingress) => format!("{what} ingress: what arrives from the network"),
            (None, Dir::Egress) => format!("{what} egress: what leaves the host"),
        }
    }

    /// Where a frame goes after the programs at one end of an interface let it pass.
    fn passed(&self, ifindex: u32, dir: Dir) -> (Next, String) {
        match (self.topo.port_by_ifindex(ifindex), dir) {
            (Some(p), Dir::Ingress) => {
                let bridge = self
                    .topo
                    .network(p.ep.net_id)
                    .map(|n| self.topo.if_name(n.bridge_ifindex))
                    .unwrap_or_else(|| "the bridge".into());
                (
                    Next::Go(Step::Bridge {
                        net_id: p.ep.net_id,
                        from: ifindex,
                    }),
                    format!("passed: bridge {bridge} switches it by destination MAC"),
                )
            }
            (Some(p), Dir::Egress) => {
                let name = p
                    .container
                    .clone()
                    .unwrap_or_else(|| Ipv4Addr::from(p.ep.ip).to_string());
                (
                    Next::End(Box::new(End::Delivered {
                        to: name.clone(),
                        receiver: Receiver::Container {
                            name,
                            ifindex,
                            ip: Ipv4Addr::from(p.ep.ip),
                        },
                        packet: PacketView::of(&[]),
                    })),
                    format!("passed: delivered into the container ({})", p.inside),
                )
            }
            (None, Dir::Ingress) => (
                Next::Go(Step::Stack {
                    from: Some(ifindex),
                }),
                "passed: up the host's IP stack".into(),
            ),
            (None, Dir::Egress) => {
                let interface = self.topo.if_name(ifindex);
                (
                    Next::End(Box::new(End::Delivered {
                        to: "outside".into(),
                        receiver: Receiver::Outside {
                            interface: interface.clone(),
                            ifindex,
                        },
                        packet: PacketView::of(&[]),
                    })),
                    format!("passed: sent out of {interface}"),
                )
            }
        }
    }

    /// A bridge switching a frame that entered from port `from`.
    fn bridge(&self, net_id: u32, from: u32, frame: &[u8]) -> (Next, String) {
        let Some(h) = packet::parse(frame) else {
            return lost("not an IPv4 frame".into());
        };
        let Some(net) = self.topo.network(net_id) else {
            return lost(format!("md network {net_id} is not in NETWORKS"));
        };
        let bridge = self.topo.if_name(net.bridge_ifindex);
        if h.eth_dst == net.gateway_mac || Some(h.eth_dst) == self.topo.if_mac(net.bridge_ifindex) {
            return (
                Next::Go(Step::Stack {
                    from: Some(net.bridge_ifindex),
                }),
                format!("{bridge}: addressed to the bridge itself (the gateway): up the host's IP stack"),
            );
        }
        if let Some(p) = self.topo.port_by_mac(net_id, h.eth_dst) {
            if p.ep.ifindex == from {
                return lost(format!(
                    "{bridge} does not send a frame back out of the port it came in"
                ));
            }
            return (
                Next::Go(Step::Program {
                    ifindex: p.ep.ifindex,
                    dir: Dir::Egress,
                }),
                format!(
                    "{bridge}: {} is {} → out of its port",
                    mac_str(&h.eth_dst),
                    self.topo.describe_if(p.ep.ifindex)
                ),
            );
        }
        if h.eth_dst[0] & 1 != 0 {
            return lost(format!(
                "{bridge} floods broadcast and multicast to every port (not traced)"
            ));
        }
        lost(format!(
            "no port of {bridge} has MAC {}: the bridge floods it (unknown unicast, not traced)",
            mac_str(&h.eth_dst)
        ))
    }

    /// The host's IP stack: delivers locally or routes (forwarding when the frame arrived on
    /// an interface, sending when a host process made it).
    async fn stack(&self, from: Option<u32>, frame: &mut [u8]) -> Result<(Next, String)> {
        let Some(h) = packet::parse(frame) else {
            return Ok(lost("not an IPv4 frame".into()));
        };
        let Some(r) = self.nl.route_to(h.daddr).await? else {
            return Ok(lost(format!("the host has no route to {}", h.daddr)));
        };
        if r.local {
            return Ok((
                Next::End(Box::new(End::Delivered {
                    to: "host".into(),
                    receiver: Receiver::Host,
                    packet: PacketView::of(&[]),
                })),
                format!(
                    "{} is the host's own address: delivered to the host",
                    h.daddr
                ),
            ));
        }
        let Some(oif) = r.oif.filter(|_| r.unicast) else {
            return Ok(lost(format!(
                "the host's route to {} sends it nowhere",
                h.daddr
            )));
        };
        if from.is_some() && !ip_forwarding() {
            return Ok(lost(
                "the host does not forward (net.ipv4.ip_forward = 0)".into(),
            ));
        }
        let routed = from.is_some();
        let how = if routed { "routed" } else { "sent" };
        if let Some(net_id) = self.topo.bridge_net(oif) {
            let Some(p) = self
                .topo
                .port_by_ip(h.daddr)
                .filter(|p| p.ep.net_id == net_id)
            else {
                return Ok(lost(format!(
                    "no container has {} on {}: the host's ARP goes unanswered",
                    h.daddr,
                    self.topo.if_name(oif)
                )));
            };
            let src = self.topo.if_mac(oif).unwrap_or(h.eth_src);
            packet::relink(frame, src, p.ep.mac, routed);
            return Ok((
                Next::Go(Step::Program {
                    ifindex: p.ep.ifindex,
                    dir: Dir::Egress,
                }),
                format!(
                    "{how} by the host out of {} to {}",
                    self.topo.if_name(oif),
                    self.topo.describe_if(p.ep.ifindex)
                ),
            ));
        }
        let hop = r.gateway.unwrap_or(h.daddr);
        let known = self
            .nl
            .neighbour_mac(oif, hop)
            .await
            .ok()
            .flatten()
            .and_then(|m| <Mac>::try_from(m.as_slice()).ok());
        let src = self.topo.if_mac(oif).unwrap_or([0; 6]);
        packet::relink(frame, src, known.unwrap_or(UNKNOWN_MAC), routed);
        let neigh = match known {
            Some(m) => format!("next hop {hop} ({})", mac_str(&m)),
            None => format!("next hop {hop} (not in the neighbour table: MAC made up)"),
        };
        Ok((
            Next::Go(Step::Program {
                ifindex: oif,
                dir: Dir::Egress,
            }),
            format!(
                "{how} by the host out of {}, {neigh}",
                self.topo.if_name(oif)
            ),
        ))
    }

    /// Where a redirected frame goes: to the container its destination now is, or out of the
    /// interface the host routes the destination through (its egress program runs there).
    /// The return code does not say which helper redirected (bpf_redirect to the container's
    /// veth, whose egress program then runs, or bpf_redirect_peer from an ingress hook straight
    /// into the container's namespace, which skips it); a program that delivers into a
    /// container itself counts the packet as that container's received one, so a redirect
    /// from an ingress hook that moved the target's `ingress_packets` went straight in.
    async fn redirected(
        &self,
        frame: &[u8],
        dir: Dir,
        counted: &[Counter],
    ) -> Result<(Next, String)> {
        let Some(h) = packet::parse(frame) else {
            return Ok(lost("redirected, but not an IPv4 frame".into()));
        };
        if let Some(p) = self.topo.port_by_ip(h.daddr) {
            let straight_in = dir == Dir::Ingress
                && counted
                    .iter()
                    .any(|c| c.ifindex == p.ep.ifindex && c.counter == "ingress_packets");
            if straight_in {
                let name = p
                    .container
                    .clone()
                    .unwrap_or_else(|| Ipv4Addr::from(p.ep.ip).to_string());
                return Ok((
                    Next::End(Box::new(End::Delivered {
                        to: name.clone(),
                        receiver: Receiver::Container {
                            name: name.clone(),
                            ifindex: p.ep.ifindex,
                            ip: Ipv4Addr::from(p.ep.ip),
                        },
                        packet: PacketView::of(&[]),
                    })),
                    format!(
                        "redirected straight into {name} ({}): the program counted it as received there, as bpf_redirect_peer delivers, past the bridge, the host stack and {}'s egress program",
                        p.inside,
                        self.topo.if_name(p.ep.ifindex)
                    ),
                ));
            }
            let mut text = format!(
                "redirected to {} (its egress)",
                self.topo.describe_if(p.ep.ifindex)
            );
            if h.eth_dst != p.ep.mac {
                text.push_str(&format!(
                    "; the frame's destination MAC {} is not the container's {}",
                    mac_str(&h.eth_dst),
                    mac_str(&p.ep.mac)
                ));
            }
            return Ok((
                Next::Go(Step::Program {
                    ifindex: p.ep.ifindex,
                    dir: Dir::Egress,
                }),
                text,
            ));
        }
        let Some(oif) = self.nl.route_to(h.daddr).await?.and_then(|r| r.oif) else {
            return Ok(lost(format!(
                "redirected, but the host has no route to {}",
                h.daddr
            )));
        };
        Ok((
            Next::Go(Step::Program {
                ifindex: oif,
                dir: Dir::Egress,
            }),
            format!(
                "redirected out of {} (its egress)",
                self.topo.describe_if(oif)
            ),
        ))
    }

    /// The end of a dropped leg: the reason whose counter moved, explained.
    fn dropped(
        &self,
        reason: Option<u8>,
        at: String,
        hop: usize,
        h: Option<Headers>,
        rules: &[PolicyKey],
    ) -> End {
        let Some(reason) = reason else {
            return End::Dropped {
                reason: "unknown".into(),
                at,
                program: String::new(),
                interface: String::new(),
                ifindex: 0,
                counter: None,
                hop,
                detail: "the program dropped it without moving a drop counter".into(),
                rule: None,
            };
        };
        let (detail, rule) = match h {
            Some(h) => self.explain(reason, &h, rules),
            None => (String::new(), None),
        };
        End::Dropped {
            reason: drop_reason_name(reason).to_string(),
            at,
            program: String::new(),
            interface: String::new(),
            ifindex: 0,
            counter: None,
            hop,
            detail,
            rule,
        }
    }

    /// Why a drop reason applies to this packet, in the maps' words.
    fn explain(&self, reason: u8, h: &Headers, rules: &[PolicyKey]) -> (String, Option<Rule>) {
        let t = self.topo;
        let name = |ip: Ipv4Addr| t.who(ip);
        match reason {
            DROP_POLICY => {
                if let Some(k) = rules.first() {
                    let rule = Rule {
                        from: t.identity_name(k.src_identity),
                        to: t.identity_name(k.dst_identity),
                        verdict: "deny".into(),
                    };
                    let d = format!("rule deny {} → {}", rule.from, rule.to);
                    return (d, Some(rule));
                }
                let src = t.port_by_ip(h.saddr).map(|p| p.ep.identity);
                let dst = lookups::port_entry(self.sb, t, h)
                    .map(|(_, p)| p.identity)
                    .or_else(|| t.port_by_ip(h.daddr).map(|p| p.ep.identity))
                    .or_else(|| {
                        lookups::ct_key(h)
                            .and_then(|k| lookups::ct_find(self.sb, &k))
                            .map(|(_, e)| e.identity)
                    });
                let deny = self
                    .sb
                    .config()
                    .is_ok_and(|c| c.policy_default == POLICY_DENY);
                let (from, to) = (
                    src.map(|i| t.identity_name(i)).unwrap_or_else(|| name(h.saddr)),
                    dst.map(|i| t.identity_name(i)).unwrap_or_else(|| name(h.daddr)),
                );
                let d = if deny {
                    format!("no rule from {from} to {to}, and the policy default is deny")
                } else {
                    format!("policy between {from} and {to}")
                };
                let rule = Rule {
                    from,
                    to,
                    verdict: if deny { "default deny" } else { "deny" }.into(),
                };
                (d, Some(rule))
            }
            DROP_ISOLATION => {
                let net = |ip: Ipv4Addr| {
                    t.port_by_ip(ip)
                        .map(|p| t.network_name(p.ep.net_id))
                        .unwrap_or_else(|| "?".into())
                };
                (
                    format!(
                        "{} is on network {}, {} on network {}: networks are isolated from each other",
                        name(h.saddr),
                        net(h.saddr),
                        name(h.daddr),
                        net(h.daddr)
                    ),
                    None,
                )
            }
            DROP_SPOOF => {
                let d = match t.port_by_ip(h.saddr) {
                    None if t.port_by_mac_any(h.eth_src).is_some() => format!(
                        "source {} is not the address md gave the sender ({} belongs to {})",
                        h.saddr,
                        mac_str(&h.eth_src),
                        t.port_by_mac_any(h.eth_src).map(|p| p.veth.clone()).unwrap_or_default()
                    ),
                    None => format!(
                        "source {} is in md's networks but no container's: nothing from the wire (or a container) may claim it",
                        h.saddr
                    ),
                    Some(p) if p.ep.mac != h.eth_src => format!(
                        "source {} is {}'s, whose MAC is {}, but the frame comes from {}",
                        h.saddr,
                        name(h.saddr),
                        mac_str(&p.ep.mac),
                        mac_str(&h.eth_src)
                    ),
                    Some(_) => format!(
                        "source {} belongs to {}, which sends through another veth (or the packet came from the wire)",
                        h.saddr,
                        name(h.saddr)
                    ),
                };
                (d, None)
            }
            DROP_UNSOLICITED => (
                format!(
                    "{} is {}'s address: the outside reaches containers only through published ports",
                    h.daddr,
                    name(h.daddr)
                ),
                None,
            ),
            DROP_NAT_PORTS => {
                let range = self
                    .sb
                    .config()
                    .map(|c| format!("{}-{}", c.nat_port_min, c.nat_port_max))
                    .unwrap_or_default();
                (
                    format!(
                        "no free translated port for this flow: every port md tried in its NAT range {range} is taken by a live flow to {}",
                        h.dst()
                    ),
                    None,
                )
            }
            DROP_FORWARD => (
                format!(
                    "the host would route {} → {} on: it forwards only md's containers' traffic",
                    h.saddr, h.daddr
                ),
                None,
            ),
            DROP_NO_SOURCE => (
                "the interface the host routes it through has no IPv4 address to masquerade behind".into(),
                None,
            ),
            DROP_UNSUPPORTED => (
                "md translates TCP, UDP and ICMP echo (and errors about them) only".into(),
                None,
            ),
            _ => (String::new(), None),
        }
    }
}

/// A program run and what the engine needs from it besides the record.
struct Ran {
    hop: Hop,
    n: usize,
    drop_reason_code: Option<u8>,
    rules: Vec<PolicyKey>,
}

fn lost(why: String) -> (Next, String) {
    (Next::End(Box::new(End::Lost { why })), String::new())
}

impl Leg {
    fn note(&mut self, s: String) {
        match self.hops.last_mut() {
            Some(h) => h.then.push(s),
            None => self.before.push(s),
        }
    }
}

/// What a program changed in the headers, field by field.
fn rewritten(a: Option<&Headers>, b: Option<&Headers>) -> Vec<String> {
    let (Some(a), Some(b)) = (a, b) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if a.src() != b.src() {
        out.push(format!("source {} → {}", a.src(), b.src()));
    }
    if a.dst() != b.dst() {
        out.push(format!("destination {} → {}", a.dst(), b.dst()));
    }
    if let (packet::L4::Icmp { id: x, .. }, packet::L4::Icmp { id: y, .. }) = (a.l4, b.l4) {
        if x != y {
            out.push(format!("icmp id {x} → {y}"));
        }
    }
    if a.eth_src != b.eth_src {
        out.push(format!(
            "source MAC {} → {}",
            mac_str(&a.eth_src),
            mac_str(&b.eth_src)
        ));
    }
    if a.eth_dst != b.eth_dst {
        out.push(format!(
            "destination MAC {} → {}",
            mac_str(&a.eth_dst),
            mac_str(&b.eth_dst)
        ));
    }
    if a.ttl != b.ttl {
        out.push(format!("ttl {} → {}", a.ttl, b.ttl));
    }
    out
}
