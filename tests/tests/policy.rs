//! Inter-container policy (issue 6): `policy deny/allow/list/default`, with real traffic.
//!
//! Every container runs the same three servers: HTTP on 80 (`peer_http.py`), UDP on 5300
//! (`peer_udp.py`) and a line echo on 7000 (`tcp_echo.py`); each answers with the client address
//! it saw, so an answer also proves who talked to whom. A denied attempt must be *dropped*: curl
//! times out (exit 28), the UDP probe gets no answer, ping gets no reply. A refused connection
//! or an ICMP error is not a policy drop and fails the test.
//!
//! Anti-spoofing is checked with one-way UDP to a logger: a forged packet that got through
//! would be logged, so the check does not depend on replies finding their way back.

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use md_tests::helpers::{
    assert_no_netfilter, drops_of, fx, logged, logger, mac_of, run_d, session_line, RAW_UDP,
    UDP_PROBE, UDP_SEND,
};
use md_tests::process::{run_timeout, show_output};
use md_tests::{
    require_e2e, require_tools, stderr_str, stdout_str, wait_for, Lab, GATEWAY, HOST_UPLINK_IP,
    MD_TIMEOUT, OUTSIDE_IP,
};
use serde_json::Value;

const HTTP: u16 = 80;
const UDP: u16 = 5300;
const ECHO: u16 = 7000;
/// The x_tables lists [`assert_no_netfilter`] reads here: IPv4 and IPv6 (snat.rs also reads
/// the ARP one).
const POLICY_TABLES_NAMES: [&str; 2] = ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"];
/// Where the one-way UDP logger listens.
const LOG_PORT: u16 = 5400;

/// How many times [`UDP_PROBE`] sends before it gives up (1 s each): a dropped probe fails in
/// 2 s.
const UDP_PROBE_TRIES: &str = "2";

/// UDP broadcast: sends "probe" to BCAST PORT with SO_BROADCAST and prints every reply as
/// "REPLY FROM_IP" until none comes for 1.5 s.
const UDP_BROADCAST: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.settimeout(1.5)
s.sendto(b"probe", (sys.argv[1], int(sys.argv[2])))
try:
    while True:
        data, peer = s.recvfrom(2048)
        print("%s %s" % (data.decode(), peer[0]), flush=True)
except socket.timeout:
    pass
"#;

/// A forged ARP reply out of eth0: "SPA is at my MAC", to TARGET_MAC/TARGET_IP.
/// usage: SPA TARGET_MAC TARGET_IP
const ARP_CLAIM: &str = r#"
import socket, struct, sys
spa, tmac, tpa = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("eth0", 0x0806))
sha = s.getsockname()[4]
mac = lambda m: bytes(int(x, 16) for x in m.split(":"))
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, sha, socket.inet_aton(spa),
                  mac(tmac), socket.inet_aton(tpa))
for _ in range(3):
    s.send(mac(tmac) + sha + b"\x08\x06" + arp)
"#;

fn need_tools() {
    require_tools(&["python3", "curl", "ping", "ss", "bpftool"]);
}

/// `md-user run -d --name NAME [extra...] -- sh -c "<the three servers>"`; returns once they
/// listen.
#[track_caller]
fn serve(lab: &Lab, name: &str, extra: &[&str]) {
    let script = format!(
        "python3 {} {HTTP} & python3 {} {UDP} & python3 {} {ECHO} & wait",
        fx("peer_http.py"),
        fx("peer_udp.py"),
        fx("tcp_echo.py")
    );
    run_d(lab, name, extra, &["sh", "-c", &script]);
    lab.wait_listening_in(name, "tcp", HTTP);
    lab.wait_listening_in(name, "udp", UDP);
    lab.wait_listening_in(name, "tcp", ECHO);
}

/// a, b and c, each serving.
fn abc(lab: &Lab) -> (String, String, String) {
    abc_with(lab, &[])
}

/// [`abc`] where a keeps every capability, to change its own interface.
fn abc_with_privileged_a(lab: &Lab) -> (String, String, String) {
    abc_with(lab, &["--privileged"])
}

fn abc_with(lab: &Lab, a_opts: &[&str]) -> (String, String, String) {
    serve(lab, "a", a_opts);
    serve(lab, "b", &[]);
    serve(lab, "c", &[]);
    (lab.ip_of("a"), lab.ip_of("b"), lab.ip_of("c"))
}

// ---- probes -----------------------------------------------------------------------------

fn curl(lab: &Lab, from: &str, url: &str) -> Output {
    lab.exec(from, &["curl", "-sS", "--max-time", "2", url])
}

/// HTTP GET from container `from`: Ok(the client address the server saw) or Err(why not).
fn http(lab: &Lab, from: &str, ip: &str, port: u16) -> Result<String, Output> {
    let out = curl(lab, from, &format!("http://{ip}:{port}/"));
    if out.status.success() {
        Ok(stdout_str(&out))
    } else {
        Err(out)
    }
}

fn udp(lab: &Lab, from: &str, ip: &str, port: u16) -> Result<String, Output> {
    let out = lab.exec(
        from,
        &[
            "python3",
            "-c",
            UDP_PROBE,
            ip,
            &port.to_string(),
            UDP_PROBE_TRIES,
        ],
    );
    if out.status.success() {
        Ok(stdout_str(&out))
    } else {
        Err(out)
    }
}

fn ping(lab: &Lab, from: &str, ip: &str) -> Result<(), Output> {
    let out = lab.exec(from, &["ping", "-n", "-c", "1", "-W", "1", ip]);
    if out.status.success() {
        Ok(())
    } else {
        Err(out)
    }
}

#[track_caller]
fn assert_seen_as(seen: &str, from_ip: &str, what: &str) {
    assert!(
        seen.starts_with(&format!("{from_ip}:")),
        "{what}: the server saw {seen:?}, not {from_ip}"
    );
}

/// TCP from `from` to `ip`:80 works, and the server saw `from_ip`.
#[track_caller]
fn tcp_ok(lab: &Lab, from: &str, from_ip: &str, ip: &str, port: u16, what: &str) {
    match http(lab, from, ip, port) {
        Ok(seen) => assert_seen_as(&seen, from_ip, &format!("{what} (tcp)")),
        Err(out) => panic!(
            "{what}: TCP {from} -> {ip}:{port} failed\n{}",
            show_output(&out)
        ),
    }
}

/// TCP from `from` to `ip`:`port` is dropped: curl times out (exit 28).
#[track_caller]
fn tcp_dropped(lab: &Lab, from: &str, ip: &str, port: u16, what: &str) {
    match http(lab, from, ip, port) {
        Ok(seen) => panic!("{what}: TCP {from} -> {ip}:{port} must be dropped, but got {seen:?}"),
        Err(out) => assert_eq!(
            out.status.code(),
            Some(28),
            "{what}: TCP {from} -> {ip}:{port} must time out (dropped), not fail otherwise\n{}",
            show_output(&out)
        ),
    }
}

/// TCP, UDP and ICMP from `from` to `ip` all get through, seen with `from_ip`.
#[track_caller]
fn reaches(lab: &Lab, from: &str, from_ip: &str, ip: &str, what: &str) {
    tcp_ok(lab, from, from_ip, ip, HTTP, what);
    match udp(lab, from, ip, UDP) {
        Ok(seen) => assert_seen_as(&seen, from_ip, &format!("{what} (udp)")),
        Err(out) => panic!(
            "{what}: UDP {from} -> {ip}:{UDP} failed\n{}",
            show_output(&out)
        ),
    }
    if let Err(out) = ping(lab, from, ip) {
        panic!("{what}: ping {from} -> {ip} failed\n{}", show_output(&out));
    }
}

/// TCP, UDP and ICMP from `from` to `ip` are all dropped.
#[track_caller]
fn blocked(lab: &Lab, from: &str, ip: &str, what: &str) {
    tcp_dropped(lab, from, ip, HTTP, what);
    match udp(lab, from, ip, UDP) {
        Ok(seen) => panic!("{what}: UDP {from} -> {ip}:{UDP} must be dropped, got {seen:?}"),
        Err(out) => assert_eq!(
            out.status.code(),
            Some(3),
            "{what}: UDP {from} -> {ip}:{UDP} must go unanswered (dropped)\n{}",
            show_output(&out)
        ),
    }
    if ping(lab, from, ip).is_ok() {
        panic!("{what}: ping {from} -> {ip} must be dropped, but it was answered");
    }
}

// ---- policy and stats -------------------------------------------------------------------

/// `md-user policy ARGS...`, asserting success; returns the output.
#[track_caller]
fn policy(lab: &Lab, args: &[&str]) -> Output {
    let mut a = vec!["policy"];
    a.extend_from_slice(args);
    let out = lab.md(&a);
    assert!(
        out.status.success(),
        "md-user policy {}\n{}",
        args.join(" "),
        show_output(&out)
    );
    out
}

/// `policy list --json`, parsed.
#[track_caller]
fn policy_list(lab: &Lab) -> Value {
    let out = lab.md_ok(&["policy", "list", "--json"]);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("policy list --json is not JSON ({e}):\n{out}"));
    assert!(
        v["rules"].is_array() && v["default"].is_string(),
        "policy list --json lacks rules/default: {v}"
    );
    v
}

/// The rule from → to of a `policy list --json`, if listed.
fn rule<'a>(list: &'a Value, from: &str, to: &str) -> Option<&'a Value> {
    list["rules"]
        .as_array()?
        .iter()
        .find(|r| r["from"].as_str() == Some(from) && r["to"].as_str() == Some(to))
}

#[track_caller]
fn rule_drops(list: &Value, from: &str, to: &str) -> u64 {
    let r = rule(list, from, to).unwrap_or_else(|| panic!("no rule {from} -> {to} in {list}"));
    r["drops"]
        .as_u64()
        .unwrap_or_else(|| panic!("rule {from} -> {to} has no numeric drops: {r}"))
}

/// POLICY map entries as (verdict, drops) — the map is where the datapath reads rules.
fn policy_map(lab: &Lab) -> Vec<(u64, u64)> {
    lab.map_dump("POLICY")
        .iter()
        .map(|e| {
            let v = &e["formatted"]["value"];
            (
                v["verdict"].as_u64().unwrap_or(u64::MAX),
                v["drops"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Gives `container` a permanent neighbour entry `ip` → `mac` on eth0, so its sending never
/// depends on ARP (which md also polices). Set as the host's root, in the container's network
/// namespace: the container itself has no CAP_NET_ADMIN.
#[track_caller]
fn pin_neighbour(lab: &Lab, container: &str, ip: &str, mac: &str) {
    let pid = lab.ps_entry(container)["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid for {container}"));
    let mut c = std::process::Command::new("nsenter");
    c.arg(format!("--net=/proc/{pid}/ns/net")).args([
        "ip",
        "neigh",
        "replace",
        ip,
        "lladdr",
        mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    let out = run_timeout(&mut c, MD_TIMEOUT);
    assert!(
        out.status.success(),
        "pinning {ip} -> {mac} in {container}\n{}",
        show_output(&out)
    );
}

// ---- tests ------------------------------------------------------------------------------

#[test]
fn deny_stops_tcp_udp_and_icmp_from_a_to_c_and_nothing_else() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-deny");
    let (a, b, c) = abc(&lab);
    reaches(&lab, "a", &a, &c, "a -> c before any rule");

    let out = policy(&lab, &["deny", "a", "c"]);
    assert!(
        !stderr_str(&out).contains("warning"),
        "deny between running containers must not warn\n{}",
        show_output(&out)
    );
    blocked(&lab, "a", &c, "a -> c after deny a c");
    // Directional: c still opens connections to a, and a's answers flow back to c.
    reaches(&lab, "c", &c, &a, "c -> a while a -> c is denied");
    // Other pairs are untouched.
    reaches(&lab, "b", &b, &c, "b -> c while a -> c is denied");
    reaches(&lab, "a", &a, &b, "a -> b while a -> c is denied");
    reaches(&lab, "c", &c, &b, "c -> b while a -> c is denied");

    let list = policy_list(&lab);
    assert_eq!(list["default"], "allow", "{list}");
    let r = rule(&list, "a", "c").unwrap_or_else(|| panic!("no rule a -> c listed: {list}"));
    assert_eq!(r["verdict"], "deny", "{r}");
    assert!(
        rule_drops(&list, "a", "c") >= 3,
        "a -> c was dropped for tcp, udp and icmp: drops {r}"
    );
    assert!(
        rule(&list, "c", "a").is_none(),
        "deny a c must not create a rule c -> a: {list}"
    );

    // allow lifts the deny at once.
    policy(&lab, &["allow", "a", "c"]);
    reaches(&lab, "a", &a, &c, "a -> c after allow a c");
    let list = policy_list(&lab);
    assert!(
        rule(&list, "a", "c").is_none_or(|r| r["verdict"] == "allow"),
        "after allow a c no deny may remain: {list}"
    );
}

#[test]
fn deny_stops_existing_flows_and_spares_unrelated_ones() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-existing");
    serve(&lab, "a", &[]);
    serve(&lab, "b", &[]);
    serve(&lab, "c", &["-p", "7070:7000"]);
    let (a, b, c) = (lab.ip_of("a"), lab.ip_of("b"), lab.ip_of("c"));
    let go = lab.dir().join("go");
    let go_s = go.to_str().unwrap().to_string();
    let session = |from: &str, ip: &str, port: &str| {
        lab.spawn_exec(
            from,
            &["python3", &fx("tcp_session.py"), ip, port, "--go", &go_s],
        )
    };
    // Long-lived sessions, open before the rule: a -> c directly and through c's published
    // port (both to be denied), b -> c (unrelated) and c -> a (the allowed direction between
    // the same two containers).
    let mut ac = session("a", &c, "7000");
    let mut ap = session("a", HOST_UPLINK_IP, "7070");
    let mut bc = session("b", &c, "7000");
    let mut ca = session("c", &a, "7000");
    for (s, what, ip) in [
        (&mut ac, "a -> c session", &a),
        (&mut ap, "a -> 192.0.2.1:7070 (c) session", &a),
        (&mut bc, "b -> c session", &b),
        (&mut ca, "c -> a session", &c),
    ] {
        let peer = session_line(s, "peer ", what);
        assert_seen_as(&peer, ip, what);
        session_line(s, "echo one", what);
    }

    policy(&lab, &["deny", "a", "c"]);
    std::fs::write(&go, b"").unwrap();

    for (s, what) in [(&mut bc, "b -> c"), (&mut ca, "c -> a")] {
        let st = s.wait_timeout(Duration::from_secs(20));
        assert!(
            st.success() && s.stdout().contains("echo two"),
            "the {what} session, unrelated to the rule, broke after deny a c ({st})\n{}{}",
            s.stdout(),
            s.stderr()
        );
    }
    // a's established session to c stops: its next line is never echoed (the session gives
    // up after its 10 s socket timeout).
    for (s, what) in [(&mut ac, "a -> c"), (&mut ap, "a -> 192.0.2.1:7070 (c)")] {
        let st = s.wait_timeout(Duration::from_secs(30));
        let out = s.stdout();
        assert!(
            !st.success() && !out.contains("echo two") && out.contains("error"),
            "the {what} session, established before deny a c, kept working ({st})\n{out}{}",
            s.stderr()
        );
    }
    // New flows: a -> c stays blocked, b -> c works.
    tcp_dropped(&lab, "a", &c, ECHO, "a -> c:7000 after the deny");
    tcp_ok(&lab, "b", &b, &c, HTTP, "b -> c after the deny");
}

#[test]
fn rules_follow_names_across_restart_and_readdressing() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-names");
    let (a, b, c_old) = abc(&lab);
    policy(&lab, &["deny", "a", "c"]);
    tcp_dropped(&lab, "a", &c_old, HTTP, "a -> c");

    lab.md_ok(&["stop", "c"]);
    // Another container takes c's old address...
    serve(&lab, "filler", &["--ip", &c_old]);
    assert_eq!(
        lab.ip_of("filler"),
        c_old,
        "filler should hold c's old address"
    );
    // ...so c comes back elsewhere.
    serve(&lab, "c", &[]);
    let c_new = lab.ip_of("c");
    assert_ne!(c_new, c_old, "c should have a new address");

    blocked(&lab, "a", &c_new, "a -> c at its new address");
    reaches(&lab, "b", &b, &c_new, "b -> c at its new address");
    reaches(&lab, "c", &c_new, &a, "c (new address) -> a");
    // The rule did not stay with the old address.
    reaches(&lab, "a", &a, &c_old, "a -> filler (c's old address)");

    // The same when the denied side, a, restarts somewhere else.
    lab.md_ok(&["stop", "a"]);
    serve(&lab, "filler2", &["--ip", &a]);
    serve(&lab, "a", &[]);
    let a_new = lab.ip_of("a");
    assert_ne!(a_new, a, "a should have a new address");
    blocked(&lab, "a", &c_new, "a (new address) -> c (new address)");
    tcp_ok(
        &lab,
        "filler2",
        &a,
        &c_new,
        HTTP,
        "filler2 (a's old address) -> c",
    );
    tcp_ok(&lab, "c", &c_new, &a_new, HTTP, "c -> a (both readdressed)");
    let list = policy_list(&lab);
    assert_eq!(
        rule(&list, "a", "c").map(|r| r["verdict"].clone()),
        Some(Value::from("deny")),
        "{list}"
    );
}

#[test]
fn published_port_does_not_bypass_a_deny() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-port");
    serve(&lab, "a", &[]);
    serve(&lab, "b", &[]);
    serve(&lab, "c", &["-p", "8080:80", "-p", "5353:5300/udp"]);
    let (a, b) = (lab.ip_of("a"), lab.ip_of("b"));

    // Before the rule, a reaches c through the published port (the bypass would be real).
    tcp_ok(
        &lab,
        "a",
        &a,
        HOST_UPLINK_IP,
        8080,
        "a -> 192.0.2.1:8080 before deny",
    );
    policy(&lab, &["deny", "a", "c"]);
    let before = rule_drops(&policy_list(&lab), "a", "c");

    for addr in [HOST_UPLINK_IP, GATEWAY] {
        tcp_dropped(
            &lab,
            "a",
            addr,
            8080,
            &format!("a -> {addr}:8080 (c's port)"),
        );
        tcp_ok(&lab, "b", &b, addr, 8080, &format!("b -> {addr}:8080"));
    }
    match udp(&lab, "a", HOST_UPLINK_IP, 5353) {
        Ok(seen) => panic!("a -> 192.0.2.1:5353/udp (c's port) answered {seen:?} despite deny"),
        Err(out) => assert_eq!(out.status.code(), Some(3), "{}", show_output(&out)),
    }
    let seen = udp(&lab, "b", HOST_UPLINK_IP, 5353)
        .unwrap_or_else(|o| panic!("b -> 192.0.2.1:5353/udp\n{}", show_output(&o)));
    assert_seen_as(&seen, &b, "b -> 192.0.2.1:5353/udp");
    // Clients that are not containers are not subject to container policy.
    let out = lab.outside(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        &format!("http://{HOST_UPLINK_IP}:8080/"),
    ]);
    assert!(
        out.status.success(),
        "outside -> 8080\n{}",
        show_output(&out)
    );
    assert_seen_as(&stdout_str(&out), OUTSIDE_IP, "outside -> 8080");

    let after = rule_drops(&policy_list(&lab), "a", "c");
    assert!(
        after >= before + 3,
        "the port-path drops must count on the a -> c rule: {before} -> {after}"
    );
}

#[test]
fn forged_source_addresses_are_dropped() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-spoof-ip");
    let (a, b, c) = abc(&lab);
    let log = logger(&lab, "c", LOG_PORT);
    let log_port = LOG_PORT.to_string();
    policy(&lab, &["deny", "a", "c"]);
    let raw = |from: &str, src: &str, msg: &str| {
        lab.exec_ok(from, &["python3", "-c", RAW_UDP, src, &c, &log_port, msg]);
    };

    // The raw sender works: b's datagram with its own address arrives.
    raw("b", &b, "b-own");
    assert_eq!(logged(&log, "b-own"), format!("{b}:40000"));

    let spoof_before = drops_of(&lab, "a", "spoofed-source");
    // a forging the address of b (allowed to c), of an unassigned container address, of an
    // outside host and of the gateway (not a container: not subject to policy).
    let forged = [
        (b.as_str(), "a-as-b"),
        ("172.18.0.250", "a-as-unassigned"),
        (OUTSIDE_IP, "a-as-outside"),
        (GATEWAY, "a-as-gateway"),
    ];
    for (src, msg) in forged {
        raw("a", src, msg);
    }
    // a with its own address: dropped by the rule, not as spoofed.
    raw("a", &a, "a-own");
    // A marker sent after all of them: once it arrives, anything let through would have, too.
    raw("b", &b, "b-marker");
    logged(&log, "b-marker");
    let got = log.stdout();
    for (src, msg) in forged {
        assert!(
            !got.contains(msg),
            "a's datagram forged from {src} reached c:\n{got}"
        );
    }
    assert!(
        !got.contains("a-own"),
        "a -> c got through the deny:\n{got}"
    );
    let spoof_after = drops_of(&lab, "a", "spoofed-source");
    assert!(
        spoof_after >= spoof_before + forged.len() as u64,
        "stats drops.spoofed-source of a: {spoof_before} -> {spoof_after}, expected +{}",
        forged.len()
    );
}

#[test]
fn extra_address_inside_a_container_is_dropped() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-spoof-addr");
    // a may give itself addresses (--privileged keeps CAP_NET_ADMIN); the datapath must still
    // drop what it sends from them.
    let (a, b, _c) = abc_with_privileged_a(&lab);
    let log = logger(&lab, "b", LOG_PORT);
    let log_port = LOG_PORT.to_string();
    let b_mac = mac_of(&lab, "b");
    // a knows b's MAC for good, so a's sending never depends on ARP (which md also polices).
    pin_neighbour(&lab, "a", &b, &b_mac);
    let send = |bind: Option<&str>, msg: &str| {
        let mut args = vec!["python3", "-c", UDP_SEND, &b, &log_port, msg];
        args.extend(bind);
        lab.exec_ok("a", &args);
    };
    send(None, "a-own");
    assert_eq!(logged(&log, "a-own").split(':').next(), Some(a.as_str()));

    let before = drops_of(&lab, "a", "spoofed-source");
    lab.exec_ok(
        "a",
        &["ip", "addr", "add", "172.18.0.250/16", "dev", "eth0"],
    );
    send(Some("172.18.0.250"), "a-from-250");
    send(None, "a-own-again");
    logged(&log, "a-own-again");
    assert!(
        !log.stdout().contains("a-from-250"),
        "a's datagram from a second address it gave itself reached b:\n{}",
        log.stdout()
    );
    let after = drops_of(&lab, "a", "spoofed-source");
    assert!(
        after > before,
        "stats drops.spoofed-source of a did not grow: {before} -> {after}"
    );
}

#[test]
fn changed_mac_inside_a_container_is_dropped() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-spoof-mac");
    // a may change its MAC (--privileged keeps CAP_NET_ADMIN).
    let (a, b, c) = abc_with_privileged_a(&lab);
    let log = logger(&lab, "b", LOG_PORT);
    let log_port = LOG_PORT.to_string();
    let b_mac = mac_of(&lab, "b");
    let a_mac = mac_of(&lab, "a");
    pin_neighbour(&lab, "a", &b, &b_mac);
    let send = |msg: &str| {
        lab.exec_ok("a", &["python3", "-c", UDP_SEND, &b, &log_port, msg]);
    };
    send("mac-own");
    assert_eq!(logged(&log, "mac-own").split(':').next(), Some(a.as_str()));

    let before = drops_of(&lab, "a", "spoofed-source");
    let forged_mac = "02:42:ac:12:ee:ee";
    lab.exec_ok(
        "a",
        &["ip", "link", "set", "dev", "eth0", "address", forged_mac],
    );
    send("mac-forged");
    // c's marker: once it arrives, a's forged frame would have too.
    lab.exec_ok("c", &["python3", "-c", UDP_SEND, &b, &log_port, "c-marker"]);
    logged(&log, "c-marker");
    assert!(
        !log.stdout().contains("mac-forged"),
        "a's datagram sent with MAC {forged_mac} (not its own {a_mac}) reached b:\n{}",
        log.stdout()
    );
    let after = drops_of(&lab, "a", "spoofed-source");
    assert!(
        after > before,
        "stats drops.spoofed-source of a did not grow: {before} -> {after}"
    );
    tcp_dropped(&lab, "a", &c, HTTP, "a -> c with a forged MAC");

    // Its own MAC back: a talks again (the drop was about the MAC, nothing else).
    lab.exec_ok(
        "a",
        &["ip", "link", "set", "dev", "eth0", "address", &a_mac],
    );
    send("mac-restored");
    logged(&log, "mac-restored");
    tcp_ok(&lab, "a", &a, &c, HTTP, "a -> c with its own MAC again");
}

#[test]
fn forged_sources_are_dropped_on_every_container_port() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-spoof-nets");
    serve(&lab, "a", &[]);
    lab.md_ok(&["network", "create", "back", "--subnet", "10.9.0.0/24"]);
    run_d(&lab, "x", &["--network", "back"], &["sleep", "600"]);
    run_d(&lab, "y", &["--network", "back"], &["sleep", "600"]);
    lab.md_ok(&["network", "connect", "back", "a"]);
    let log = logger(&lab, "y", LOG_PORT);
    let log_port = LOG_PORT.to_string();
    let a0 = lab.ip_of("a");
    let a1 = wait_for("a has an address on back", Duration::from_secs(10), || {
        let out = lab.exec_ok("a", &["ip", "-o", "-4", "addr", "show"]);
        out.split_whitespace()
            .filter_map(|w| w.strip_suffix("/24"))
            .find(|ip| ip.starts_with("10.9.0."))
            .map(str::to_string)
    });
    let x = address_on(&lab, "x");
    let y = address_on(&lab, "y");
    let raw = |from: &str, src: &str, msg: &str| {
        lab.exec_ok(from, &["python3", "-c", RAW_UDP, src, &y, &log_port, msg]);
    };
    raw("a", &a1, "a-back-own");
    assert_eq!(logged(&log, "a-back-own"), format!("{a1}:40000"));
    let before = drops_of(&lab, "a", "spoofed-source");
    // a's own bridge address, sent out of its other interface: an address of a, not of
    // that port.
    raw("a", &a0, "a-back-as-bridge-addr");
    // x forging a's address on the same network.
    raw("x", &a1, "x-as-a");
    raw("x", &x, "x-marker");
    logged(&log, "x-marker");
    let got = log.stdout();
    assert!(
        !got.contains("a-back-as-bridge-addr") && !got.contains("x-as-a"),
        "forged datagrams reached y:\n{got}"
    );
    assert!(
        drops_of(&lab, "a", "spoofed-source") > before,
        "a's spoofed datagram was not counted"
    );
    assert!(
        drops_of(&lab, "x", "spoofed-source") > 0,
        "x's spoofed datagram was not counted"
    );

    // A rule names the container: it holds on its second interface too.
    policy(&lab, &["deny", "a", "y"]);
    raw("a", &a1, "a-after-deny");
    raw("x", &x, "x-marker-2");
    logged(&log, "x-marker-2");
    assert!(
        !log.stdout().contains("a-after-deny"),
        "a reached y on its second network despite deny a y:\n{}",
        log.stdout()
    );
}

/// The IPv4 address of `container`'s eth0.
#[track_caller]
fn address_on(lab: &Lab, container: &str) -> String {
    let out = lab.exec_ok(
        container,
        &["ip", "-o", "-4", "addr", "show", "dev", "eth0"],
    );
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no IPv4 address on {container}'s eth0: {out}"))
        .to_string()
}

#[test]
fn arp_claiming_another_containers_address_is_dropped() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-spoof-arp");
    let (_a, b, c) = abc(&lab);
    let c_mac = mac_of(&lab, "c");
    let b_mac = mac_of(&lab, "b");
    // b knows c (a live neighbour entry, which an unsolicited ARP reply would overwrite).
    tcp_ok(&lab, "b", &b, &c, HTTP, "b -> c");
    let neigh = |lab: &Lab| lab.exec_ok("b", &["ip", "neigh", "show", &c]);
    assert!(
        neigh(&lab).contains(&c_mac),
        "b's entry for c: {}",
        neigh(&lab)
    );

    // Linux ignores ARP updates of an entry changed less than locktime (1 s) ago: wait until
    // b's entry is older, so that a forged reply getting through would take effect.
    wait_for(
        "b's entry for c is 2 s old",
        Duration::from_secs(15),
        || {
            let out = lab.exec_ok("b", &["ip", "-s", "neigh", "show", &c]);
            let updated = out
                .split("used ")
                .nth(1)?
                .split('/')
                .nth(2)?
                .trim_start_matches(|ch: char| !ch.is_ascii_digit())
                .split(|ch: char| !ch.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()?;
            (updated >= 2).then_some(())
        },
    );
    let before = drops_of(&lab, "a", "spoofed-source");
    lab.exec_ok("a", &["python3", "-c", ARP_CLAIM, &c, &b_mac, &b]);
    let after = drops_of(&lab, "a", "spoofed-source");
    assert!(
        after >= before + 3,
        "a's 3 ARP replies claiming c's address: drops.spoofed-source {before} -> {after}"
    );
    let n = neigh(&lab);
    assert!(
        n.contains(&c_mac),
        "a's forged ARP (\"{c} is at a's MAC\") changed b's entry for c: {n}"
    );
    tcp_ok(&lab, "b", &b, &c, HTTP, "b -> c after a's forged ARP");
}

#[test]
fn deny_is_not_bypassed_by_broadcast() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-broadcast");
    let (_a, b, c) = abc(&lab);
    policy(&lab, &["deny", "a", "c"]);
    // udp/5300 of c is closed to a; a broadcast datagram must not open it either. b answering
    // shows the broadcast itself went out.
    for bcast in ["172.18.255.255", "255.255.255.255"] {
        let out = lab.exec_ok(
            "a",
            &["python3", "-c", UDP_BROADCAST, bcast, &UDP.to_string()],
        );
        let from: BTreeSet<&str> = out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        assert!(
            from.contains(b.as_str()),
            "a's broadcast to {bcast}:{UDP} got no answer from b (the control):\n{out}"
        );
        assert!(
            !from.contains(c.as_str()),
            "deny a c bypassed: a's UDP broadcast to {bcast}:{UDP} reached c, and c's answer \
             reached a:\n{out}"
        );
    }
}

#[test]
fn default_deny_with_allow_grants_only_that_pair() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-default");
    let (a, b, c) = abc(&lab);
    policy(&lab, &["default", "deny"]);
    assert_eq!(policy_list(&lab)["default"], "deny");
    blocked(&lab, "a", &c, "a -> c under default deny");
    tcp_dropped(&lab, "b", &c, HTTP, "b -> c under default deny");
    tcp_dropped(&lab, "a", &b, HTTP, "a -> b under default deny");
    tcp_dropped(&lab, "c", &a, HTTP, "c -> a under default deny");

    policy(&lab, &["allow", "a", "c"]);
    reaches(&lab, "a", &a, &c, "a -> c granted by allow a c");
    tcp_dropped(&lab, "c", &a, HTTP, "c -> a (only a -> c was granted)");
    tcp_dropped(&lab, "b", &c, HTTP, "b -> c (only a -> c was granted)");
    tcp_dropped(&lab, "a", &b, HTTP, "a -> b (only a -> c was granted)");
    let list = policy_list(&lab);
    assert_eq!(
        rule(&list, "a", "c").map(|r| &r["verdict"]),
        Some(&Value::from("allow"))
    );

    // A deny for the granted pair takes it back; default allow opens the rest.
    policy(&lab, &["deny", "a", "c"]);
    tcp_dropped(&lab, "a", &c, HTTP, "a -> c after deny a c");
    policy(&lab, &["default", "allow"]);
    assert_eq!(policy_list(&lab)["default"], "allow");
    tcp_ok(&lab, "b", &b, &c, HTTP, "b -> c under default allow");
    tcp_ok(&lab, "c", &c, &a, HTTP, "c -> a under default allow");
    tcp_dropped(&lab, "a", &c, HTTP, "a -> c: its deny outlives the default");
}

#[test]
fn both_denies_both_directions() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-both");
    let (a, b, c) = abc(&lab);
    policy(&lab, &["deny", "a", "c", "--both"]);
    blocked(&lab, "a", &c, "a -> c after deny a c --both");
    blocked(&lab, "c", &a, "c -> a after deny a c --both");
    reaches(&lab, "b", &b, &a, "b -> a");
    reaches(&lab, "b", &b, &c, "b -> c");
    let list = policy_list(&lab);
    for (f, t) in [("a", "c"), ("c", "a")] {
        assert_eq!(
            rule(&list, f, t).map(|r| &r["verdict"]),
            Some(&Value::from("deny")),
            "rule {f} -> {t}: {list}"
        );
    }
    policy(&lab, &["allow", "a", "c", "--both"]);
    tcp_ok(&lab, "a", &a, &c, HTTP, "a -> c after allow --both");
    tcp_ok(&lab, "c", &c, &a, HTTP, "c -> a after allow --both");
}

#[test]
fn rule_naming_a_container_not_running_warns_and_applies_once_it_runs() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-ghost");
    serve(&lab, "a", &[]);
    let a = lab.ip_of("a");
    let out = policy(&lab, &["deny", "a", "ghost"]);
    let err = stderr_str(&out);
    assert!(
        err.contains("warning: no container named ghost is running; the rule applies once it runs"),
        "expected a warning naming ghost on stderr\n{}",
        show_output(&out)
    );
    assert!(
        !err.contains("named a "),
        "a is running: only ghost deserves a warning\n{err}"
    );
    assert_eq!(
        rule(&policy_list(&lab), "a", "ghost").map(|r| &r["verdict"]),
        Some(&Value::from("deny"))
    );
    serve(&lab, "ghost", &[]);
    let g = lab.ip_of("ghost");
    blocked(&lab, "a", &g, "a -> ghost, denied before ghost ran");
    reaches(&lab, "ghost", &g, &a, "ghost -> a");
}

#[test]
fn policy_list_counts_drops_per_rule_exactly() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-list");
    let (_a, b, c) = abc(&lab);
    policy(&lab, &["deny", "a", "c"]);
    policy(&lab, &["deny", "b", "a"]);
    let list = policy_list(&lab);
    assert_eq!(list["rules"].as_array().map(Vec::len), Some(2), "{list}");
    assert_eq!(rule_drops(&list, "a", "c"), 0, "{list}");
    assert_eq!(rule_drops(&list, "b", "a"), 0, "{list}");
    let stats_before = drops_of(&lab, "a", "policy");

    // Exactly three echo requests a -> c, each dropped once by the rule.
    let out = lab.exec("a", &["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", &c]);
    assert!(
        !out.status.success(),
        "a -> c pings were answered\n{}",
        show_output(&out)
    );
    let list = policy_list(&lab);
    assert_eq!(rule_drops(&list, "a", "c"), 3, "3 pings a -> c: {list}");
    assert_eq!(
        rule_drops(&list, "b", "a"),
        0,
        "b -> a saw no traffic: {list}"
    );
    assert_eq!(
        drops_of(&lab, "a", "policy"),
        stats_before + 3,
        "stats drops.policy of a after 3 denied pings"
    );
    // Allowed traffic does not count.
    tcp_ok(&lab, "b", &b, &c, HTTP, "b -> c");
    assert_eq!(rule_drops(&policy_list(&lab), "a", "c"), 3);

    // The human-readable list shows both rules.
    let text = lab.md_ok(&["policy", "list"]);
    for want in ["deny", "a", "c", "b"] {
        assert!(text.contains(want), "policy list lacks {want:?}:\n{text}");
    }
}

#[test]
fn policy_lives_in_bpf_maps_without_netfilter() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-maps");
    let (a, _b, c) = abc(&lab);
    assert!(
        policy_map(&lab).is_empty(),
        "POLICY before any rule: {:?}",
        policy_map(&lab)
    );
    policy(&lab, &["deny", "a", "c"]);
    tcp_dropped(&lab, "a", &c, HTTP, "a -> c");
    let entries = policy_map(&lab);
    assert!(
        entries.len() == 1 && entries[0].0 == u64::from(md_common::POLICY_DENY) && entries[0].1 > 0,
        "POLICY should hold one deny entry that counted a's drops: {entries:?}"
    );
    assert_no_netfilter(&lab, &POLICY_TABLES_NAMES);
    policy(&lab, &["allow", "a", "c"]);
    tcp_ok(&lab, "a", &a, &c, HTTP, "a -> c after allow");
    assert!(
        policy_map(&lab)
            .iter()
            .all(|(v, _)| *v != u64::from(md_common::POLICY_DENY)),
        "POLICY still holds a deny after allow: {:?}",
        policy_map(&lab)
    );
    policy(&lab, &["default", "deny"]);
    tcp_dropped(&lab, "c", &a, HTTP, "c -> a under default deny");
    assert_no_netfilter(&lab, &POLICY_TABLES_NAMES);
}

#[test]
fn an_import_that_fills_the_map_midway_changes_nothing() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("policy-import-full");
    run_d(&lab, "cli", &[], &["sleep", "600"]);
    policy(&lab, &["deny", "cli", "other"]);
    let list_before = policy_list(&lab);
    let map_before = policy_map(&lab);
    assert_eq!(map_before, [(2, 0)], "one deny rule in POLICY");

    // It flips the existing rule, adds cli -> p0 (p0 gets the next identity), then more rules
    // than POLICY holds, among 257 names.
    let max = md_common::maps::POLICY_MAX;
    let n = (2..).find(|n| n * (n - 1) > max).expect("some n");
    let mut text = String::from("allow cli other\ndeny cli p0\n");
    for i in 0..n {
        for j in (0..n).filter(|&j| j != i) {
            text.push_str(&format!("deny q{i} q{j}\n"));
        }
    }
    let file = lab.dir().join("too-many-rules");
    std::fs::write(&file, text).unwrap();
    let out = lab.md_timeout(
        &["policy", "import", file.to_str().unwrap()],
        Duration::from_secs(180),
    );
    let err = md_tests::helpers::assert_one_line_error(&out, "an import larger than POLICY");

    assert_eq!(
        policy_list(&lab),
        list_before,
        "rules after the failed import"
    );
    assert_eq!(
        policy_map(&lab),
        map_before,
        "POLICY after the failed import"
    );
    assert!(
        err.contains("full"),
        "the error should say POLICY is full: {err}"
    );
    // The next container gets the identity p0 would have had: no rule may come with it.
    serve(&lab, "srv", &[]);
    let (cli, srv) = (lab.ip_of("cli"), lab.ip_of("srv"));
    tcp_ok(
        &lab,
        "cli",
        &cli,
        &srv,
        HTTP,
        "cli -> srv after the failed import",
    );
    assert_eq!(policy_map(&lab), map_before, "POLICY after srv started");
}
