//! The hardening after review (commit 8071171), with real traffic in the lab.
//!
//! - Containers are reached from outside only through published ports: with a route to
//!   172.18.0.0/16 via the host, the outside still cannot talk to a container address directly
//!   (dropped at the uplink, counted as `unsolicited`), nor use md's resolver on the gateway as
//!   an open forwarder.
//! - A UDP datagram to a broadcast address in an Ethernet frame unicast to a container's MAC
//!   is subject to policy at the receiver (before, only group-addressed frames were checked).
//! - A half-closed TCP connection keeps its translation while the other side still talks,
//!   also after longer than the closing lifetime (10 s).
//!
//! One-way UDP to a logger proves delivery (or its absence) without depending on replies.

use std::process::Output;
use std::time::Duration;

use md_tests::helpers::{
    counter, drops_of, fx, logged, logger, mac_of, md_resolv, run_d, upstream_resolver, UDP_SEND,
};
use md_tests::process::show_output;
use md_tests::{
    require_e2e, require_tools, stdout_str, wait_for, Lab, GATEWAY, HOST_UPLINK_IP, OUTSIDE_IP,
};

/// md's container subnet (default network).
const SUBNET: &str = "172.18.0.0/16";
const SUBNET_BCAST: &str = "172.18.255.255";
const UDP_PORT: u16 = 5300;
const LOG_PORT: u16 = 5400;
/// md's default `ct_tcp_closing_secs` is 10 s: the server waits longer than that.
const HALF_CLOSE_WAIT_SECS: u32 = 12;

/// UDP probe: sends "probe" to HOST PORT, prints the reply and whom it came from. Exit 0 with
/// a reply (from any address: the socket is not connected), 3 when none came (two tries, 1 s
/// each).
const UDP_PROBE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
for _ in range(2):
    s.sendto(b"probe", (sys.argv[1], int(sys.argv[2])))
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        continue
    print("%s from %s:%d" % (data.decode(errors="replace"), peer[0], peer[1]))
    sys.exit(0)
sys.exit(3)
"#;

/// A hand-made Ethernet + IPv4 + UDP frame out of eth0 (AF_PACKET, so the sender's routing and
/// neighbour table play no part): DST_MAC SRC_IP DST_IP DST_PORT MESSAGE. Source port 40000,
/// source MAC eth0's own, IP and UDP checksums computed.
const RAW_FRAME: &str = r#"
import socket, struct, sys
dst_mac, src_ip, dst_ip, dport, msg = sys.argv[1:6]
dport, msg = int(dport), msg.encode()
def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
src, dst = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
udp = struct.pack("!HHHH", 40000, dport, 8 + len(msg), 0) + msg
c = csum(src + dst + struct.pack("!BBH", 0, 17, len(udp)) + udp) or 0xffff
udp = udp[:6] + struct.pack("!H", c) + udp[8:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, dst)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
mac = bytes(int(x, 16) for x in dst_mac.split(":"))
s.send(mac + s.getsockname()[4] + b"\x08\x00" + ip + udp)
"#;

/// TCP server for the half-close test: on HOST PORT, for each connection reads until the
/// client's FIN (the request is "wait SECONDS"), prints "eof after REQUEST from IP:PORT",
/// waits that long, sends "late answer" and closes. Prints "sent" once the answer went out.
const HALF_CLOSE_SERVER: &str = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((host, port))
l.listen(4)
while True:
    c, peer = l.accept()
    req = b""
    while True:
        d = c.recv(4096)
        if not d:
            break
        req += d
    print("eof after %r from %s:%d" % (req.decode(errors="replace"), peer[0], peer[1]), flush=True)
    time.sleep(float(req.split()[-1]))
    try:
        c.sendall(b"late answer\n")
        print("sent", flush=True)
    except OSError as e:
        print("send error: %s" % e, flush=True)
    c.close()
"#;

/// TCP client for the half-close test: connects to HOST PORT, sends "wait SECONDS", shuts its
/// sending side (SHUT_WR), then reads until the server closes (25 s at most) and prints what
/// it got. Exit 0 when the answer arrived, 1 otherwise ("error ..." printed).
const HALF_CLOSE_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"wait " + sys.argv[3].encode())
s.shutdown(socket.SHUT_WR)
s.settimeout(25)
t0 = time.time()
got = b""
try:
    while True:
        d = s.recv(4096)
        if not d:
            break
        got += d
except OSError as e:
    print("error after %.1f s: %s (got %r)" % (time.time() - t0, e, got), flush=True)
    sys.exit(1)
print("got %r after %.1f s" % (got, time.time() - t0), flush=True)
sys.exit(0 if b"late answer" in got else 1)
"#;

fn outside_curl(lab: &Lab, url: &str) -> Output {
    lab.outside(&["curl", "-sS", "--max-time", "2", url])
}

/// The outside namespace gets a route to the containers' subnet through the host: what a
/// router next to the host could do. md's datapath must still keep containers unreachable.
#[track_caller]
fn route_to_containers(lab: &Lab) {
    lab.outside_ok(&["ip", "route", "add", SUBNET, "via", HOST_UPLINK_IP]);
}

#[test]
fn outside_reaches_containers_only_through_published_ports() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "curl", "ss"]);
    let lab = Lab::new("hard-unsolicited");
    route_to_containers(&lab);
    let servers = format!(
        "python3 {} 80 & python3 {} {UDP_PORT} & wait",
        fx("peer_http.py"),
        fx("peer_udp.py")
    );
    run_d(&lab, "web", &[], &["sh", "-c", &servers]);
    run_d(&lab, "pub", &["-p", "8080:80"], &["sh", "-c", &servers]);
    lab.wait_listening_in("web", "tcp", 80);
    lab.wait_listening_in("web", "udp", UDP_PORT);
    lab.wait_listening_in("pub", "tcp", 80);
    let log = logger(&lab, "web", LOG_PORT);
    let (web, pub_ip) = (lab.ip_of("web"), lab.ip_of("pub"));

    // The route is real: the host (where md runs) forwards to the containers' subnet, so
    // without md's check these would arrive.
    let stats_before = lab.stats();

    // TCP straight to a container address: dropped (curl times out, exit 28).
    for ip in [&web, &pub_ip] {
        let out = outside_curl(&lab, &format!("http://{ip}/"));
        assert!(
            !out.status.success() && out.status.code() == Some(28),
            "outside -> http://{ip}/ (a container address, port 80 not published) must be \
             dropped (curl timeout)\n{}",
            show_output(&out)
        );
    }
    // UDP to a container port: no answer, from any address.
    let out = lab.outside(&["python3", "-c", UDP_PROBE, &web, &UDP_PORT.to_string()]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "outside -> udp {web}:{UDP_PORT} (not published) must go unanswered\n{}",
        show_output(&out)
    );
    // One-way UDP: never delivered. The host's own datagram to the same logger, sent after it,
    // arrives (so the outside one would have too).
    lab.outside_ok(&[
        "python3",
        "-c",
        UDP_SEND,
        &web,
        &LOG_PORT.to_string(),
        "from-outside",
    ]);
    lab.host_ok(&[
        "python3",
        "-c",
        UDP_SEND,
        &web,
        &LOG_PORT.to_string(),
        "host-marker",
    ]);
    logged(&log, "host-marker");
    assert!(
        !log.stdout().contains("from-outside"),
        "a datagram from the outside straight to {web}:{LOG_PORT} reached the container:\n{}",
        log.stdout()
    );

    // The published port still answers, from the outside's own address.
    let out = outside_curl(&lab, &format!("http://{HOST_UPLINK_IP}:8080/"));
    assert!(
        out.status.success() && stdout_str(&out).starts_with(&format!("{OUTSIDE_IP}:")),
        "outside -> {HOST_UPLINK_IP}:8080 (published to pub:80) must work and be seen from \
         {OUTSIDE_IP}\n{}",
        show_output(&out)
    );

    let before = counter(&stats_before["uplink"], "drops.unsolicited");
    let after = counter(&lab.stats()["uplink"], "drops.unsolicited");
    assert!(
        after >= before + 4,
        "stats uplink.drops.unsolicited: {before} -> {after}, expected at least 4 more \
         (2 TCP connection attempts, 2 UDP probes, 1 datagram)"
    );
}

/// `dig` result: status (NOERROR, REFUSED, ...) and the A records of the answer section.
#[derive(Debug)]
struct Dig {
    status: String,
    a: Vec<String>,
}

/// `dig +time=2 +tries=1 @SERVER NAME A` run by `ns` ("outside" or a container): None when no
/// answer came at all.
#[track_caller]
fn dig(lab: &Lab, from: &str, server: &str, name: &str) -> Option<Dig> {
    let at = format!("@{server}");
    let args = [
        "dig",
        "+noall",
        "+comments",
        "+answer",
        "+time=2",
        "+tries=1",
        &at,
        name,
        "A",
    ];
    let out = if from == "outside" {
        lab.outside(&args)
    } else {
        lab.exec(from, &args)
    };
    let text = stdout_str(&out);
    if out.status.code() == Some(9) || text.contains("no servers could be reached") {
        return None;
    }
    assert!(
        out.status.success(),
        "[{from}] dig {at} {name}\n{}",
        show_output(&out)
    );
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("[{from}] dig {at} {name}: no status in\n{text}"))
        .to_string();
    let a = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5 && f[3] == "A").then(|| f[4].to_string())
        })
        .collect();
    Some(Dig { status, a })
}

#[test]
fn resolver_on_the_gateway_is_not_an_open_forwarder() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "dig", "dnsmasq", "ss"]);
    let lab = Lab::new("hard-dns");
    // An upstream resolver outside that knows one name, outside.test; md-user forwards to it.
    let (_upstream, resolv) = upstream_resolver(&lab);
    let out = md_resolv(
        &lab,
        &resolv,
        &["run", "-d", "--name", "asker", "--", "sleep", "600"],
    );
    assert!(out.status.success(), "md-user run\n{}", show_output(&out));
    lab.wait_listening_host("udp", 53);
    route_to_containers(&lab);

    // A container's own DNS keeps working: forwarded names and container names.
    let d = dig(&lab, "asker", GATEWAY, "outside.test")
        .unwrap_or_else(|| panic!("the container got no answer from {GATEWAY}"));
    assert_eq!(
        d.a,
        [OUTSIDE_IP],
        "the container asking {GATEWAY} for outside.test: {d:?}"
    );
    let asker = lab.ip_of("asker");
    let d = dig(&lab, "asker", GATEWAY, "asker")
        .unwrap_or_else(|| panic!("the container got no answer from {GATEWAY}"));
    assert_eq!(
        d.a,
        [asker.as_str()],
        "the container asking for its own name: {d:?}"
    );

    // The outside, with a route to the gateway address, gets nothing forwarded (no answer, or
    // REFUSED) and no container name.
    for name in ["outside.test", "asker"] {
        match dig(&lab, "outside", GATEWAY, name) {
            None => {}
            Some(d) => assert!(
                d.a.is_empty() && d.status != "NOERROR",
                "the outside asking {GATEWAY} for {name} got an answer: {d:?} (md's resolver \
                 must answer only containers)"
            ),
        }
    }
    // And the container still can.
    let d = dig(&lab, "asker", GATEWAY, "outside.test")
        .unwrap_or_else(|| panic!("the container got no answer from {GATEWAY}"));
    assert_eq!(d.a, [OUTSIDE_IP], "{d:?}");
}

#[test]
fn deny_is_not_bypassed_by_broadcast_in_a_unicast_frame() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "ss"]);
    let lab = Lab::new("hard-bcast-unicast");
    for n in ["a", "b", "c"] {
        run_d(&lab, n, &[], &["sleep", "600"]);
    }
    let log = logger(&lab, "c", UDP_PORT);
    let (a, c) = (lab.ip_of("a"), lab.ip_of("c"));
    let c_mac = mac_of(&lab, "c");
    let port = UDP_PORT.to_string();
    let frame = |dst: &str, msg: &str| {
        lab.exec_ok(
            "a",
            &["python3", "-c", RAW_FRAME, &c_mac, &a, dst, &port, msg],
        );
    };
    let marker = |msg: &str| {
        lab.exec_ok("b", &["python3", "-c", UDP_SEND, &c, &port, msg]);
        logged(&log, msg);
    };

    // No rule: a's datagrams to the broadcast addresses, in frames to c's MAC, reach c.
    frame(SUBNET_BCAST, "subnet-bcast-allowed");
    frame("255.255.255.255", "limited-bcast-allowed");
    assert_eq!(
        logged(&log, "subnet-bcast-allowed"),
        format!("{a}:40000"),
        "control: a's datagram to {SUBNET_BCAST} in a frame to c's MAC"
    );
    assert_eq!(
        logged(&log, "limited-bcast-allowed"),
        format!("{a}:40000"),
        "control: a's datagram to 255.255.255.255 in a frame to c's MAC"
    );

    lab.md_ok(&["policy", "deny", "a", "c"]);
    let before = drops_of(&lab, "a", "policy");
    frame(SUBNET_BCAST, "subnet-bcast-denied");
    frame("255.255.255.255", "limited-bcast-denied");
    frame(&c, "unicast-denied");
    // b -> c is allowed: once b's datagram is in, a's would have been too.
    marker("b-marker");
    let got = log.stdout();
    for msg in [
        "subnet-bcast-denied",
        "limited-bcast-denied",
        "unicast-denied",
    ] {
        assert!(
            !got.contains(msg),
            "deny a c bypassed: a's {msg} datagram (frame to c's MAC) reached c:\n{got}"
        );
    }
    let after = drops_of(&lab, "a", "policy");
    assert!(
        after >= before + 3,
        "stats drops.policy of a: {before} -> {after}, expected 3 more"
    );
}

#[test]
fn half_closed_connection_survives_longer_than_the_closing_lifetime() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "ss"]);
    let lab = Lab::new("hard-half-close");
    let server = lab.spawn_outside(&["python3", "-u", "-c", HALF_CLOSE_SERVER, OUTSIDE_IP, "9100"]);
    lab.wait_listening_outside("tcp", 9100);
    run_d(&lab, "c", &[], &["sleep", "600"]);
    // The client shuts its sending side at once; the server answers WAIT seconds later.
    let half_close = |wait: u32| {
        let n = server.stdout().matches("sent").count();
        let out = lab.exec(
            "c",
            &[
                "python3",
                "-c",
                HALF_CLOSE_CLIENT,
                OUTSIDE_IP,
                "9100",
                &wait.to_string(),
            ],
        );
        let srv = wait_for("the server is done", Duration::from_secs(10), || {
            let s = server.stdout();
            (s.matches("sent").count() > n || s.contains("error")).then_some(s)
        });
        assert!(
            srv.contains(&format!("from {HOST_UPLINK_IP}:")),
            "masqueraded: {srv}"
        );
        (out, srv)
    };
    // Control: an answer 2 s after the FIN arrives.
    let (out, srv) = half_close(2);
    assert!(
        out.status.success(),
        "control: the answer sent 2 s after the container's FIN was lost\n{}\nserver: {srv}",
        show_output(&out)
    );
    let (out, srv) = half_close(HALF_CLOSE_WAIT_SECS);
    assert!(
        out.status.success(),
        "the container's half-closed connection lost the answer sent {HALF_CLOSE_WAIT_SECS} s \
         after its FIN (longer than the 10 s closing lifetime)\n{}\nserver: {srv}",
        show_output(&out)
    );
}
