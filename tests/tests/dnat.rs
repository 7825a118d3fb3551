//! Published ports (`-p`, DNAT): Docker's spec forms, reachability from every path with replies
//! translated back, address binding, refusal of bad input without leftovers, unpublishing on
//! stop, and no hijacking of traffic to other servers that use the same port.
//!
//! The servers (`where_http.py`, `where_udp.py`) answer with "PEER LOCAL": the client as they
//! saw it and the address:port that really served the request, so each check proves which
//! container (and which container port) answered, not just that something did.

use std::collections::BTreeSet;
use std::process::Output;
use std::sync::OnceLock;

use md_tests::helpers::{self, assert_one_line_error, fx};
use md_tests::process::show_output;
use md_tests::{require_e2e, require_tools, stdout_str, Lab, GATEWAY, HOST_UPLINK_IP, OUTSIDE_IP};
use serde_json::Value;

fn need_tools() {
    require_tools(&["python3", "curl", "ss", "bpftool"]);
}

/// `md-user run -d --name NAME [-p SPEC]... -- CMD...`, asserting success.
#[track_caller]
fn run_d(lab: &Lab, name: &str, ports: &[&str], cmd: &[&str]) {
    helpers::run_d(lab, name, &publish(ports), cmd);
}

/// The arguments of `md-user run -d --name NAME [-p SPEC]... -- CMD...`.
fn run_args<'a>(name: &'a str, ports: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
    helpers::run_args(name, &publish(ports), cmd)
}

/// `-p SPEC` for each of `ports`.
fn publish<'a>(ports: &[&'a str]) -> Vec<&'a str> {
    ports.iter().flat_map(|&p| ["-p", p]).collect()
}

/// A container serving HTTP (where_http.py) on `tcp` ports and UDP (where_udp.py) on `udp`
/// ports, published with `ports`; returns once every server listens.
#[track_caller]
fn serve(lab: &Lab, name: &str, ports: &[&str], tcp: &[u16], udp: &[u16]) {
    let list = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(" ");
    let mut parts = Vec::new();
    if !tcp.is_empty() {
        parts.push(format!("python3 {} {} &", fx("where_http.py"), list(tcp)));
    }
    if !udp.is_empty() {
        parts.push(format!("python3 {} {} &", fx("where_udp.py"), list(udp)));
    }
    parts.push("wait".into());
    let script = parts.join(" ");
    run_d(lab, name, ports, &["sh", "-c", &script]);
    for &p in tcp {
        lab.wait_listening_in(name, "tcp", p);
    }
    for &p in udp {
        lab.wait_listening_in(name, "udp", p);
    }
}

/// "PEER LOCAL" from where_http.py / where_udp.py.
#[derive(Debug)]
struct Where {
    peer_ip: String,
    local: String,
}

#[track_caller]
fn parse_where(s: &str, what: &str) -> Where {
    let mut it = s.split_whitespace();
    let (Some(peer), Some(local), None) = (it.next(), it.next(), it.next()) else {
        panic!("{what}: expected \"PEER LOCAL\", got {s:?}");
    };
    let (peer_ip, _) = peer
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{what}: peer {peer:?} is not ip:port"));
    Where {
        peer_ip: peer_ip.to_string(),
        local: local.to_string(),
    }
}

fn curl_args(url: &str) -> [&str; 5] {
    ["curl", "-sS", "--max-time", "5", url]
}

/// Where a GET of `url` was served, or the failed output.
#[track_caller]
fn get_ok(out: Output, what: &str) -> Where {
    assert!(out.status.success(), "{what}\n{}", show_output(&out));
    parse_where(&stdout_str(&out), what)
}

#[track_caller]
fn get_fails(out: Output, what: &str) {
    assert!(
        !out.status.success(),
        "{what} must not be reachable, but it answered: {}",
        stdout_str(&out)
    );
}

fn from_outside(lab: &Lab, url: &str) -> Output {
    lab.outside(&curl_args(url))
}

fn from_host(lab: &Lab, url: &str) -> Output {
    lab.host(&curl_args(url))
}

fn from_container(lab: &Lab, c: &str, url: &str) -> Output {
    lab.exec(c, &curl_args(url))
}

/// udp_from.py's "FROM REPLY" where REPLY is where_udp.py's "PEER LOCAL".
#[derive(Debug)]
struct UdpReply {
    from: String,
    seen: Where,
}

#[track_caller]
fn udp_ok(out: Output, what: &str) -> UdpReply {
    assert!(
        out.status.success(),
        "{what}: no UDP reply\n{}",
        show_output(&out)
    );
    let s = stdout_str(&out);
    let (from, rest) = s
        .split_once(' ')
        .unwrap_or_else(|| panic!("{what}: udp_from said {s:?}"));
    UdpReply {
        from: from.to_string(),
        seen: parse_where(rest, what),
    }
}

static UDP_FROM: OnceLock<String> = OnceLock::new();

/// `python3 udp_from.py HOST PORT EXTRA...`.
fn udp_args<'a>(host: &'a str, port: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "python3",
        UDP_FROM.get_or_init(|| fx("udp_from.py")),
        host,
        port,
    ];
    a.extend_from_slice(extra);
    a
}

/// PORT_MAP's entries, rendered and sorted (empty when the map is not pinned).
fn port_map(lab: &Lab) -> Vec<String> {
    let mut v: Vec<String> = lab
        .map_dump("PORT_MAP")
        .iter()
        .map(Value::to_string)
        .collect();
    v.sort();
    v
}

/// The ports `ps` shows for `name`.
#[track_caller]
fn ps_ports(lab: &Lab, name: &str) -> BTreeSet<String> {
    let c = lab.ps_entry(name);
    c["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("ps entry of {name} has no ports array: {c}"))
        .iter()
        .map(|p| {
            p.as_str()
                .unwrap_or_else(|| panic!("port entry {p} of {name} is not a string"))
                .to_string()
        })
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn published_tcp_port_from_outside_and_from_the_host() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("dnat-tcp");
    serve(&lab, "web", &["8080:80"], &[80], &[]);
    let web = format!("{}:80", lab.ip_of("web"));

    let w = get_ok(
        from_outside(&lab, &format!("http://{HOST_UPLINK_IP}:8080/")),
        "outside -> 192.0.2.1:8080",
    );
    assert_eq!(w.local, web, "outside -> uplink:8080 served by {w:?}");
    assert_eq!(
        w.peer_ip, OUTSIDE_IP,
        "an outside client must be seen with its own address"
    );

    // Not published: refused, not sent to the container.
    get_fails(
        from_outside(&lab, &format!("http://{HOST_UPLINK_IP}:8089/")),
        "outside -> 192.0.2.1:8089 (unpublished)",
    );

    // The host's own addresses; the bridge address last: it only exists since this first run
    // created the bridge.
    for url in [
        "http://127.0.0.1:8080/",
        "http://localhost:8080/",
        &format!("http://{HOST_UPLINK_IP}:8080/"),
        &format!("http://{GATEWAY}:8080/"),
    ] {
        let w = get_ok(from_host(&lab, url), &format!("host -> {url}"));
        assert_eq!(w.local, web, "host -> {url} served by {w:?}");
    }
}

#[test]
fn published_tcp_port_hairpin_from_containers() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("dnat-hairpin");
    serve(&lab, "web", &["8080:80"], &[80], &[]);
    run_d(&lab, "cli", &[], &["sleep", "300"]);
    let web_ip = lab.ip_of("web");
    let web = format!("{web_ip}:80");
    let cli_ip = lab.ip_of("cli");

    for addr in [HOST_UPLINK_IP, GATEWAY] {
        let url = format!("http://{addr}:8080/");
        let w = get_ok(from_container(&lab, "cli", &url), &format!("cli -> {url}"));
        assert_eq!(w.local, web, "cli -> {url} served by {w:?}");
        if addr == HOST_UPLINK_IP {
            assert_eq!(
                w.peer_ip, cli_ip,
                "hairpin via the host address: web should see cli's own address"
            );
        }
        // The publishing container reaching itself through its published port.
        let w = get_ok(from_container(&lab, "web", &url), &format!("web -> {url}"));
        assert_eq!(w.local, web, "web -> {url} (itself) served by {w:?}");
    }
}

#[test]
fn published_udp_port_from_every_path_with_replies_translated() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("dnat-udp");
    serve(&lab, "dns", &["5353:53/udp"], &[], &[53]);
    run_d(&lab, "cli", &[], &["sleep", "300"]);
    let dns = format!("{}:53", lab.ip_of("dns"));
    let cli_ip = lab.ip_of("cli");
    let uplink_5353 = format!("{HOST_UPLINK_IP}:5353");

    // Unconnected sockets accept replies from anywhere: the source they report must be the
    // address the client asked, or the client could not match the reply to its request.
    let r = udp_ok(
        lab.outside(&udp_args(HOST_UPLINK_IP, "5353", &[])),
        "outside -> 192.0.2.1:5353/udp",
    );
    assert_eq!(r.from, uplink_5353, "reply source seen outside: {r:?}");
    assert_eq!(r.seen.local, dns, "served by: {r:?}");
    assert_eq!(r.seen.peer_ip, OUTSIDE_IP, "client as seen by dns: {r:?}");

    for (addr, extra) in [
        ("127.0.0.1", &[][..]),
        ("127.0.0.1", &["--connect"][..]),
        (HOST_UPLINK_IP, &[][..]),
    ] {
        let what = format!("host -> {addr}:5353/udp {extra:?}");
        let r = udp_ok(lab.host(&udp_args(addr, "5353", extra)), &what);
        assert_eq!(r.from, format!("{addr}:5353"), "{what}: reply source {r:?}");
        assert_eq!(r.seen.local, dns, "{what}: served by {r:?}");
    }

    let r = udp_ok(
        lab.exec("cli", &udp_args(HOST_UPLINK_IP, "5353", &[])),
        "cli -> 192.0.2.1:5353/udp",
    );
    assert_eq!(r.from, uplink_5353, "cli: reply source {r:?}");
    assert_eq!(r.seen.local, dns, "cli: served by {r:?}");
    assert_eq!(r.seen.peer_ip, cli_ip, "cli: client as seen by dns {r:?}");

    let r = udp_ok(
        lab.exec("dns", &udp_args(HOST_UPLINK_IP, "5353", &[])),
        "dns -> 192.0.2.1:5353/udp (itself)",
    );
    assert_eq!(r.from, uplink_5353, "dns itself: reply source {r:?}");
    assert_eq!(r.seen.local, dns, "dns itself: served by {r:?}");

    // Published for UDP only: TCP to the same port is not forwarded.
    get_fails(
        from_outside(&lab, &format!("http://{HOST_UPLINK_IP}:5353/")),
        "outside -> 192.0.2.1:5353/tcp (only udp is published)",
    );
}

#[test]
fn port_range_maps_each_host_port_to_its_container_port() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("dnat-range");
    serve(
        &lab,
        "rng",
        &["9000-9002:7000-7002"],
        &[7000, 7001, 7002],
        &[],
    );
    let ip = lab.ip_of("rng");
    for i in 0..3u16 {
        let url = format!("http://{HOST_UPLINK_IP}:{}/", 9000 + i);
        let w = get_ok(from_outside(&lab, &url), &format!("outside -> {url}"));
        assert_eq!(
            w.local,
            format!("{ip}:{}", 7000 + i),
            "{url} served by {w:?}"
        );
        let url = format!("http://127.0.0.1:{}/", 9000 + i);
        let w = get_ok(from_host(&lab, &url), &format!("host -> {url}"));
        assert_eq!(
            w.local,
            format!("{ip}:{}", 7000 + i),
            "{url} served by {w:?}"
        );
    }
    get_fails(
        from_outside(&lab, &format!("http://{HOST_UPLINK_IP}:9003/")),
        "outside -> 9003 (just past the range)",
    );
    assert_eq!(
        ps_ports(&lab, "rng"),
        set(&["9000:7000/tcp", "9001:7001/tcp", "9002:7002/tcp"])
    );
}

#[test]
fn ip_bound_ports_are_reachable_only_on_that_address() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("dnat-bind");
    serve(
        &lab,
        "web",
        &["127.0.0.1:8081:80", "192.0.2.1:8082:80"],
        &[80],
        &[],
    );
    run_d(&lab, "cli", &[], &["sleep", "300"]);
    let web = format!("{}:80", lab.ip_of("web"));
    let up = HOST_UPLINK_IP;

    let w = get_ok(
        from_outside(&lab, &format!("http://{up}:8082/")),
        "outside -> 192.0.2.1:8082",
    );
    assert_eq!(w.local, web);
    get_fails(
        from_outside(&lab, &format!("http://{up}:8081/")),
        "outside -> 192.0.2.1:8081 (bound to 127.0.0.1)",
    );

    let w = get_ok(
        from_host(&lab, "http://127.0.0.1:8081/"),
        "host -> 127.0.0.1:8081",
    );
    assert_eq!(w.local, web);
    let w = get_ok(
        from_host(&lab, &format!("http://{up}:8082/")),
        "host -> 192.0.2.1:8082",
    );
    assert_eq!(w.local, web);
    get_fails(
        from_host(&lab, &format!("http://{up}:8081/")),
        "host -> 192.0.2.1:8081 (bound to 127.0.0.1 only)",
    );
    get_fails(
        from_host(&lab, "http://127.0.0.1:8082/"),
        "host -> 127.0.0.1:8082 (bound to 192.0.2.1 only)",
    );

    let w = get_ok(
        from_container(&lab, "cli", &format!("http://{up}:8082/")),
        "cli -> 192.0.2.1:8082",
    );
    assert_eq!(w.local, web);
    get_fails(
        from_container(&lab, "cli", &format!("http://{up}:8081/")),
        "cli -> 192.0.2.1:8081 (bound to 127.0.0.1)",
    );

    // moby#45610: a SYN arriving on the uplink addressed to 127.0.0.1:8081 (TC runs before the
    // kernel's martian checks) must not reach the container. Sent as a raw frame to up0's MAC,
    // which the outside's own routing would never do. The same probe to 192.0.2.1:8082 is the
    // control: it must get a SYN-ACK.
    let up_mac = lab.host_ok(&["cat", "/sys/class/net/up0/address"]);
    let up_mac = up_mac.trim();
    let probe = |dst: &str, port: &str| {
        lab.outside_ok(&[
            "python3",
            &fx("raw_syn.py"),
            "eth0",
            up_mac,
            OUTSIDE_IP,
            dst,
            port,
        ])
        .trim()
        .to_string()
    };
    let control = probe(up, "8082");
    assert!(
        control.starts_with(&format!("reply SA from {up}:8082")),
        "raw SYN probe to {up}:8082 (published there) should get a SYN-ACK: {control}"
    );
    let leak = probe("127.0.0.1", "8081");
    let syn_recv = lab.exec_ok("web", &["ss", "-Htn", "state", "syn-recv"]);
    assert!(
        leak == "none" && syn_recv.trim().is_empty(),
        "a SYN from the uplink to 127.0.0.1:8081 reached the container: probe said {leak:?}, \
         web's half-open connections: {syn_recv:?}"
    );
}

/// What must not change when md-user refuses a run.
#[derive(Debug, PartialEq)]
struct Snapshot {
    links: Vec<String>,
    ps: Vec<String>,
    state: Vec<String>,
    pins: Vec<String>,
    port_map: Vec<String>,
}

fn snapshot(lab: &Lab) -> Snapshot {
    let mut ps: Vec<String> = lab
        .ps()
        .iter()
        .map(|c| format!("{} {} {} {}", c["name"], c["ip"], c["pid"], c["ports"]))
        .collect();
    ps.sort();
    let mut state = lab.state_entries();
    state.sort();
    let mut pins = lab.pin_entries();
    pins.sort();
    Snapshot {
        links: lab.links(),
        ps,
        state,
        pins,
        port_map: port_map(lab),
    }
}

const BAD_SPECS: &[&str] = &[
    "0:80",
    "80:0",
    "65536:80",
    "99999:80",
    "8090:70000",
    "8090:80/sctp",
    "8090:80/",
    "8090:80/tcp/udp",
    "a:80",
    "8090:b",
    "",
    ":80",
    "8090:",
    "1.2.3:8090:80",
    "999.1.1.1:8090:80",
    "1:2:3:4",
    "9000-9002:7000-7001",
    "9000-9001:7000-7002",
    "9002-9000:7002-7000",
    "9000-:7000-",
    "65535-65536:80-81",
];

#[test]
fn bad_specs_are_refused_before_anything_is_created() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("dnat-bad-fresh");
    // On a fresh host nothing exists yet: a refused run must not even create the bridge.
    let before = snapshot(&lab);
    for spec in ["0:80", "8080:80/sctp", "9000-9002:7000-7001"] {
        let out = lab.md(&run_args("bad", &[spec], &["sleep", "300"]));
        assert_one_line_error(&out, &format!("run -p {spec:?} on a fresh host"));
        assert_eq!(
            snapshot(&lab),
            before,
            "state changed after refusing -p {spec:?}"
        );
        assert!(!lab.has_bridge(), "bridge created for a refused run");
    }
}

#[test]
fn bad_specs_and_conflicts_are_refused_leaving_no_state() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("dnat-bad");
    serve(&lab, "web", &["8080:80", "5353:53/udp"], &[80], &[53]);
    let before = snapshot(&lab);
    assert!(
        !before.port_map.is_empty(),
        "PORT_MAP is empty while web publishes ports"
    );

    for spec in BAD_SPECS {
        let out = lab.md(&run_args("bad", &[spec], &["sleep", "300"]));
        assert_one_line_error(&out, &format!("run -p {spec:?}"));
        assert_eq!(
            snapshot(&lab),
            before,
            "something was left after refusing -p {spec:?}"
        );
    }
    // One good spec with a bad one: nothing of the good one is published either.
    let out = lab.md(&run_args("bad", &["8090:80", "0:81"], &["sleep", "300"]));
    assert_one_line_error(&out, "run -p 8090:80 -p 0:81");
    assert_eq!(snapshot(&lab), before, "after -p 8090:80 -p 0:81");
    // The same host port twice in one run.
    let out = lab.md(&run_args("bad", &["8090:80", "8090:81"], &["sleep", "300"]));
    assert_one_line_error(&out, "run -p 8090:80 -p 8090:81");
    assert_eq!(snapshot(&lab), before, "after -p 8090:80 -p 8090:81");

    // Host ports web already holds, in several spellings: refused, naming web.
    for spec in [
        "8080:80",
        "8080:81/tcp",
        "0.0.0.0:8080:80",
        "192.0.2.1:8080:80",
        "127.0.0.1:8080:80",
        "8079-8081:79-81",
        "5353:53/udp",
    ] {
        let out = lab.md(&run_args("other", &[spec], &["sleep", "300"]));
        let err = assert_one_line_error(&out, &format!("run -p {spec} while web publishes it"));
        assert!(
            err.contains("web"),
            "the conflict message for -p {spec} should name the container holding the port: {err}"
        );
        assert_eq!(snapshot(&lab), before, "after the conflicting -p {spec}");
    }
    // web itself still answers.
    let w = get_ok(
        from_outside(&lab, &format!("http://{HOST_UPLINK_IP}:8080/")),
        "outside -> web after the refusals",
    );
    assert_eq!(w.local, format!("{}:80", lab.ip_of("web")));

    // The same port number with the other protocol is a different socket: allowed.
    run_d(&lab, "udp8080", &["8080:80/udp"], &["sleep", "300"]);
    assert_eq!(ps_ports(&lab, "udp8080"), set(&["8080:80/udp"]));
}

#[test]
fn stop_unpublishes_at_once_and_the_port_can_be_reused() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("dnat-reuse");
    let empty_map = port_map(&lab);
    serve(&lab, "web1", &["8080:80", "5353:53/udp"], &[80], &[53]);
    let ip1 = lab.ip_of("web1");
    let url = format!("http://{HOST_UPLINK_IP}:8080/");
    let w = get_ok(from_outside(&lab, &url), "outside -> web1");
    assert_eq!(w.local, format!("{ip1}:80"));
    // A UDP flow from a fixed source port: its tracker entry outlives web1 (60 s).
    let udp = udp_args(HOST_UPLINK_IP, "5353", &["--bind-port", "45454"]);
    let r = udp_ok(lab.outside(&udp), "outside -> web1 udp");
    assert_eq!(r.seen.local, format!("{ip1}:53"));

    lab.md_ok(&["stop", "web1"]);
    assert_eq!(
        port_map(&lab),
        empty_map,
        "PORT_MAP still holds web1's ports right after stop"
    );
    get_fails(from_outside(&lab, &url), "outside -> 8080 right after stop");

    // web2 publishes the same host ports at once, on other container ports.
    serve(&lab, "web2", &["8080:81", "5353:54/udp"], &[81], &[54]);
    let ip2 = lab.ip_of("web2");
    let w = get_ok(
        from_outside(&lab, &url),
        "outside -> 8080 after web2 took it",
    );
    assert_eq!(
        w.local,
        format!("{ip2}:81"),
        "8080 served by {w:?}, not web2"
    );
    let r = udp_ok(
        lab.outside(&udp),
        "outside -> 5353/udp after web2 took it (same client source port as before)",
    );
    assert_eq!(
        r.seen.local,
        format!("{ip2}:54"),
        "a stale UDP tracker entry kept sending to web1: {r:?}"
    );
    assert_eq!(r.from, format!("{HOST_UPLINK_IP}:5353"));
    assert_eq!(lab.ps_names(), ["web2"]);
    assert_eq!(ps_ports(&lab, "web2"), set(&["8080:81/tcp", "5353:54/udp"]));
}

#[test]
fn ps_shows_published_ports() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("dnat-ps");
    let empty_map = port_map(&lab);
    run_d(
        &lab,
        "web",
        &[
            "8080:80",
            "5353:53/udp",
            "127.0.0.1:8081:80/tcp",
            "9000-9001:7000-7001/udp",
            "0.0.0.0:8083:83",
        ],
        &["sleep", "300"],
    );
    run_d(&lab, "plain", &[], &["sleep", "300"]);
    assert_eq!(
        ps_ports(&lab, "web"),
        set(&[
            "8080:80/tcp",
            "5353:53/udp",
            "127.0.0.1:8081:80/tcp",
            "9000:7000/udp",
            "9001:7001/udp",
            "8083:83/tcp",
        ])
    );
    assert_eq!(ps_ports(&lab, "plain"), BTreeSet::new());
    assert!(
        port_map(&lab).len() >= 6,
        "PORT_MAP should hold (at least) one entry per published port: {:?}",
        port_map(&lab)
    );
    lab.md_ok(&["stop", "web"]);
    assert_eq!(port_map(&lab), empty_map, "PORT_MAP after stopping web");
}

#[test]
fn published_port_does_not_hijack_traffic_to_other_servers() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("dnat-nohijack");
    serve(&lab, "web", &["8080:80", "5353:53/udp"], &[80], &[53]);
    run_d(&lab, "cli", &[], &["sleep", "300"]);
    // Servers outside on the same port numbers, and one on cli's own localhost:8080.
    let _oh = lab.spawn_outside(&[
        "python3",
        &fx("where_http.py"),
        "--bind",
        OUTSIDE_IP,
        "8080",
    ]);
    let _ou = lab.spawn_outside(&["python3", &fx("where_udp.py"), "--bind", OUTSIDE_IP, "5353"]);
    lab.wait_listening_outside("tcp", 8080);
    lab.wait_listening_outside("udp", 5353);
    let _lo = lab.spawn_exec(
        "cli",
        &[
            "python3",
            &fx("where_http.py"),
            "--bind",
            "127.0.0.1",
            "8080",
        ],
    );
    lab.wait_listening_in("cli", "tcp", 8080);
    let outside_8080 = format!("{OUTSIDE_IP}:8080");
    let url = format!("http://{outside_8080}/");

    for c in ["cli", "web"] {
        let w = get_ok(from_container(&lab, c, &url), &format!("{c} -> {url}"));
        assert_eq!(
            w.local, outside_8080,
            "{c} -> {url} was served by {w:?}, not the outside server"
        );
        assert_eq!(w.peer_ip, HOST_UPLINK_IP, "{c} -> {url}: masqueraded");
    }
    let w = get_ok(from_host(&lab, &url), &format!("host -> {url}"));
    assert_eq!(w.local, outside_8080, "host -> {url} was served by {w:?}");

    let r = udp_ok(
        lab.exec("cli", &udp_args(OUTSIDE_IP, "5353", &[])),
        "cli -> 192.0.2.2:5353/udp",
    );
    assert_eq!(r.seen.local, format!("{OUTSIDE_IP}:5353"), "{r:?}");
    assert_eq!(r.from, format!("{OUTSIDE_IP}:5353"), "{r:?}");
    let r = udp_ok(
        lab.host(&udp_args(OUTSIDE_IP, "5353", &[])),
        "host -> 192.0.2.2:5353/udp",
    );
    assert_eq!(r.seen.local, format!("{OUTSIDE_IP}:5353"), "{r:?}");

    // A container's own localhost is its own (the host-side socket programs must not act in
    // containers' namespaces).
    let w = get_ok(
        from_container(&lab, "cli", "http://127.0.0.1:8080/"),
        "cli -> its own 127.0.0.1:8080",
    );
    assert_eq!(w.local, "127.0.0.1:8080", "served by {w:?}");
}
