//! Issue 12: md on a host shaped like a real one (`Lab::real_host`): two Ethernet uplinks to
//! different networks (`up0` 192.0.2.1/24, `up1` 198.51.100.1/24), a layer-3 VPN device
//! (`tun0` 203.0.113.1/25, no Ethernet header) routing to a third namespace, host services of
//! its own (a stub resolver on 127.0.0.53, servers on ports), address changes and interfaces
//! that come and go. Every test here failed before the change it covers.

use std::time::Duration;

use md_tests::helpers::{counter, fx, logged, logger, md_resolv, run_d, RAW_UDP, UDP_SEND};
use md_tests::process::show_output;
use md_tests::{require_e2e, require_tools, stdout_str, wait_for, Lab, HOST_UPLINK_IP, OUTSIDE_IP};

const WEB_PORT: u16 = 8080;

fn tools() -> bool {
    if !require_e2e() {
        return false;
    }
    require_tools(&["python3", "curl", "ss", "dig", "ip"]);
    true
}

fn curl(url: &str) -> [&str; 5] {
    ["curl", "-sS", "--max-time", "5", url]
}

/// The first field ("ip:port" → "ip") of a peer_http answer.
fn ip_of_peer(answer: &str) -> String {
    answer
        .trim()
        .rsplit_once(':')
        .map(|(ip, _)| ip)
        .unwrap_or("")
        .to_string()
}

/// An HTTP server answering with the client address it saw, in namespace `ns` on port 8000.
#[track_caller]
fn peer_server(lab: &Lab, ns: &str) -> md_tests::Bg {
    let bg = lab.spawn_in_ns(ns, &["python3", &fx("peer_http.py"), "8000"]);
    lab.wait_listening_ns(ns, "tcp", 8000);
    bg
}

/// Container `name` with an HTTP server on 80 that answers with the client address it saw.
#[track_caller]
fn web(lab: &Lab, name: &str, publish: &[&str]) {
    let mut opts = Vec::new();
    for p in publish {
        opts.extend(["-p", p]);
    }
    run_d(lab, name, &opts, &["python3", &fx("peer_http.py"), "80"]);
    lab.wait_listening_in(name, "tcp", 80);
}

/// Counter `path` of uplink `name` in `md-user stats --json`.
#[track_caller]
fn uplink_counter(lab: &Lab, name: &str, path: &str) -> u64 {
    let s = lab.stats();
    let row = s["uplinks"]
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == name))
        .unwrap_or_else(|| panic!("no uplink {name} in stats: {}", s["uplinks"]));
    counter(row, path)
}

#[track_caller]
fn ok(out: std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what}\n{}", show_output(&out));
    stdout_str(&out)
}

/// Item 3: masquerade on every egress that is not an md bridge (a second NIC and a layer-3
/// VPN device included), published ports answer on every interface, an address-bound port
/// only on its address; `stats` lists every interface md covers.
#[test]
fn every_interface_masquerades_and_publishes() {
    if !tools() {
        return;
    }
    let (lab, o2, vpn) = Lab::real_host("every-interface");
    let _s1 = peer_server(&lab, lab.outside_ns());
    let _s2 = peer_server(&lab, &o2.ns);
    let _s3 = peer_server(&lab, &vpn.ns);
    web(&lab, "web", &["8080:80", "198.51.100.1:8081:80"]);
    run_d(&lab, "cli", &[], &["sleep", "600"]);

    for (server, seen, what) in [
        (OUTSIDE_IP, HOST_UPLINK_IP, "the default route's uplink"),
        (
            o2.peer_ip.as_str(),
            o2.host_ip.as_str(),
            "a second Ethernet uplink",
        ),
        (
            vpn.peer_ip.as_str(),
            vpn.host_ip.as_str(),
            "a layer-3 VPN device",
        ),
    ] {
        let url = format!("http://{server}:8000/");
        let answer = ok(lab.exec("cli", &curl(&url)), what);
        assert_eq!(
            ip_of_peer(&answer),
            seen,
            "{what}: the server must see the host's address on that interface, got {answer:?}"
        );
    }

    for (ns, addr, what) in [
        (lab.outside_ns().to_string(), HOST_UPLINK_IP, "up0"),
        (o2.ns.clone(), o2.host_ip.as_str(), "up1"),
        (vpn.ns.clone(), vpn.host_ip.as_str(), "tun0 (layer 3)"),
    ] {
        let url = format!("http://{addr}:{WEB_PORT}/");
        let answer = ok(
            lab.in_ns(&ns, &curl(&url)),
            &format!("published port on {what}"),
        );
        assert!(!answer.trim().is_empty(), "{what}: empty answer");
    }
    // Bound to up1's address: answers there, not on up0's.
    ok(
        lab.in_ns(&o2.ns, &curl("http://198.51.100.1:8081/")),
        "8081 bound to 198.51.100.1",
    );
    let out = lab.outside(&curl(&format!("http://{HOST_UPLINK_IP}:8081/")));
    assert!(
        !out.status.success(),
        "8081 is bound to 198.51.100.1 only, yet answered on {HOST_UPLINK_IP}"
    );

    let s = lab.stats();
    let names: Vec<&str> = s["uplinks"]
        .as_array()
        .expect("stats.uplinks")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    for want in ["up0", "up1", "tun0"] {
        assert!(names.contains(&want), "stats covers {want}: {names:?}");
    }
    assert!(uplink_counter(&lab, "tun0", "egress_packets") > 0);
}

/// Item 3: nothing from any interface reaches a container address directly, and the host
/// does not route between its own interfaces although md turned forwarding on.
#[test]
fn no_direct_routes_and_no_forwarding_between_host_interfaces() {
    if !tools() {
        return;
    }
    let (lab, o2, vpn) = Lab::real_host("no-forwarding");
    web(&lab, "web", &[]);
    let cip = lab.ip_of("web");
    // Neighbours that route through the host.
    lab.in_ns_ok(
        &o2.ns,
        &["ip", "route", "add", "172.18.0.0/16", "via", &o2.host_ip],
    );
    lab.in_ns_ok(
        &o2.ns,
        &["ip", "route", "add", "192.0.2.0/24", "via", &o2.host_ip],
    );
    lab.outside_ok(&[
        "ip",
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        HOST_UPLINK_IP,
    ]);
    lab.outside_ok(&[
        "ip",
        "route",
        "add",
        "203.0.113.0/25",
        "via",
        HOST_UPLINK_IP,
    ]);

    let url = format!("http://{cip}:80/");
    let out = lab.in_ns(&o2.ns, &curl(&url));
    assert!(
        !out.status.success(),
        "a neighbour on up1 reached container {cip} directly:\n{}",
        show_output(&out)
    );
    assert!(uplink_counter(&lab, "up1", "drops.unsolicited") > 0);

    for (from, to, what) in [
        (
            lab.outside_ns().to_string(),
            o2.peer_ip.clone(),
            "up0 -> up1",
        ),
        (o2.ns.clone(), OUTSIDE_IP.to_string(), "up1 -> up0"),
        (
            lab.outside_ns().to_string(),
            vpn.peer_ip.clone(),
            "up0 -> tun0",
        ),
        (vpn.ns.clone(), OUTSIDE_IP.to_string(), "tun0 -> up0"),
    ] {
        let out = lab.in_ns(&from, &["ping", "-c", "2", "-W", "1", &to]);
        assert!(
            !out.status.success(),
            "{what}: the host forwarded a ping to {to}:\n{}",
            show_output(&out)
        );
    }
    assert!(uplink_counter(&lab, "up0", "drops.not-forwarded") > 0);
    assert!(uplink_counter(&lab, "tun0", "drops.not-forwarded") > 0);
    // md's own traffic still flows both ways.
    let _s = peer_server(&lab, &o2.ns);
    ok(
        lab.exec("web", &curl(&format!("http://{}:8000/", o2.peer_ip))),
        "container -> up1",
    );
}

/// Items 1 and 2: a container publishing 53/udp takes neither the host's stub resolver on
/// 127.0.0.53 (from host processes and from md's own resolver, which forwards there) nor the
/// gateway resolver of the other containers. A 0.0.0.0 publish still answers on 127.0.0.1.
#[test]
fn published_53_takes_neither_the_stub_resolver_nor_container_dns() {
    if !tools() {
        return;
    }
    let (lab, _, _) = Lab::real_host("port-53");
    let resolv = lab.dir().join("stub-resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    // A container answering every query with 203.0.113.99 publishes 53/udp.
    let out = md_resolv(
        &lab,
        &resolv,
        &[
            "run",
            "-d",
            "--name",
            "fakedns",
            "-p",
            "53:53/udp",
            "--",
            "python3",
            &fx("dns_stub.py"),
            "0.0.0.0",
            "203.0.113.99",
        ],
    );
    ok(out, "run fakedns");
    lab.wait_listening_in("fakedns", "udp", 53);
    // The stub starts after the publish (a restarted systemd-resolved): its port is its own
    // although md published 53 on every address.
    let _stub = {
        let mut bg = lab.spawn_host(&["python3", &fx("dns_stub.py"), "127.0.0.53", "192.0.2.53"]);
        bg.wait_for_line("ready", Duration::from_secs(20));
        bg
    };
    let out = md_resolv(
        &lab,
        &resolv,
        &["run", "-d", "--name", "asker", "--", "sleep", "600"],
    );
    ok(out, "run asker");

    let ask = |args: &[&str]| ok(lab.host(args), &args.join(" ")).trim().to_string();
    assert_eq!(
        ask(&[
            "dig",
            "+short",
            "+tries=1",
            "+time=3",
            "@127.0.0.53",
            "anything.test"
        ]),
        "192.0.2.53",
        "the host's stub resolver answers its own address"
    );
    assert_eq!(
        ask(&[
            "dig",
            "+short",
            "+tries=1",
            "+time=3",
            "@127.0.0.1",
            "anything.test"
        ]),
        "203.0.113.99",
        "a 0.0.0.0 publish answers on 127.0.0.1"
    );
    let dig = |name: &str| {
        ok(
            lab.exec(
                "asker",
                &["dig", "+short", "+tries=1", "+time=3", "@172.18.0.1", name],
            ),
            name,
        )
        .trim()
        .to_string()
    };
    assert_eq!(
        dig("fakedns"),
        lab.ip_of("fakedns"),
        "the gateway resolver answers container names"
    );
    assert_eq!(
        dig("elsewhere.test"),
        "192.0.2.53",
        "md's resolver forwards to the stub, not to the container publishing 53"
    );
}

/// Item 1: a packet that belongs to a host socket is never translated: a host server that
/// binds a published port on one address keeps it there (from outside and from the host), and
/// the answers to a host socket on a published UDP port reach the host socket.
#[test]
fn host_sockets_win_over_published_ports() {
    if !tools() {
        return;
    }
    let (lab, _, _) = Lab::real_host("host-sockets");
    web(&lab, "web", &["8080:80"]);
    // Started after the publish, bound to the uplink address only.
    let _host = lab.spawn_host(&[
        "python3",
        &fx("where_http.py"),
        "--bind",
        HOST_UPLINK_IP,
        "8080",
    ]);
    lab.wait_listening_host("tcp", 8080);
    let host_answer = format!("{HOST_UPLINK_IP}:8080");
    let from_outside = ok(
        lab.outside(&curl(&format!("http://{HOST_UPLINK_IP}:8080/"))),
        "outside -> 192.0.2.1:8080",
    );
    assert!(
        from_outside.trim().ends_with(&host_answer),
        "the host's server must answer on its own address, got {from_outside:?}"
    );
    let from_host = ok(
        lab.host(&curl(&format!("http://{HOST_UPLINK_IP}:8080/"))),
        "host -> 192.0.2.1:8080",
    );
    assert!(
        from_host.trim().ends_with(&host_answer),
        "got {from_host:?}"
    );
    // Where no host socket listens, the container still answers.
    let via_lo = ok(
        lab.host(&curl("http://127.0.0.1:8080/")),
        "host -> 127.0.0.1:8080",
    );
    assert!(
        !via_lo.contains(&host_answer),
        "127.0.0.1:8080 reaches the container, got {via_lo:?}"
    );

    // UDP: the container publishes 40001/udp; a host socket bound to 40001 asks the outside.
    run_d(&lab, "u", &["-p", "40001:53/udp"], &["sleep", "600"]);
    let log = logger(&lab, "u", 53);
    let _echo = lab.spawn_outside(&["python3", &fx("peer_udp.py"), "7000"]);
    lab.wait_listening_outside("udp", 7000);
    let answer = ok(
        lab.host(&[
            "python3",
            &fx("udp_from.py"),
            OUTSIDE_IP,
            "7000",
            "--bind-port",
            "40001",
        ]),
        "host socket on 40001 asks the outside",
    );
    assert!(
        answer.contains(&format!("{HOST_UPLINK_IP}:40001")),
        "the answer reached the host socket: {answer:?}"
    );
    assert!(
        log.stdout().trim().is_empty(),
        "the container got the host's answer: {}",
        log.stdout()
    );
}

/// Item 4: at the uplink the source is checked before any translation: a forged packet
/// claiming a container of another network is dropped, not translated into the published
/// container's network.
#[test]
fn forged_container_source_is_dropped_before_dnat() {
    if !tools() {
        return;
    }
    let (lab, _, _) = Lab::real_host("source-first");
    lab.md_ok(&["network", "create", "n2"]);
    run_d(&lab, "other", &["--network", "n2"], &["sleep", "600"]);
    let forged_src = lab.ip_of("other");
    run_d(&lab, "pub", &["-p", "5353:5353/udp"], &["sleep", "600"]);
    let log = logger(&lab, "pub", 5353);
    // `stats.uplink` is the default route's interface (up0).
    let spoofed = || counter(&lab.stats()["uplink"], "drops.spoofed-source");
    let before = spoofed();
    lab.outside_ok(&[
        "python3",
        "-c",
        RAW_UDP,
        &forged_src,
        HOST_UPLINK_IP,
        "5353",
        "forged",
    ]);
    // A genuine datagram after it shows the path works and the forged one is not late.
    lab.outside_ok(&["python3", "-c", UDP_SEND, HOST_UPLINK_IP, "5353", "genuine"]);
    logged(&log, "genuine");
    assert!(
        !log.stdout().contains("forged"),
        "a datagram claiming {forged_src} was translated to the published container:\n{}",
        log.stdout()
    );
    assert_eq!(spoofed(), before + 1);
}

/// Item 5: a flood of spoofed SYNs to a published port (more than the whole tracker holds)
/// must not evict an answered flow: an idle masqueraded session opened before the flood keeps
/// its NAT port and works after it.
#[test]
fn syn_flood_does_not_evict_answered_flows() {
    if !tools() {
        return;
    }
    let lab = Lab::new("syn-flood");
    let _echo = lab.spawn_outside(&["python3", &fx("tcp_echo.py"), "7000", OUTSIDE_IP]);
    lab.wait_listening_outside("tcp", 7000);
    web(&lab, "web", &["8080:80"]);
    run_d(&lab, "c", &[], &["sleep", "600"]);
    let go = lab.dir().join("flood-go");
    let mut long = lab.spawn_exec(
        "c",
        &[
            "python3",
            &fx("tcp_session.py"),
            OUTSIDE_IP,
            "7000",
            "--go",
            go.to_str().unwrap(),
        ],
    );
    let peer = md_tests::helpers::session_line(&mut long, "peer ", "the long session");
    md_tests::helpers::session_line(&mut long, "echo one", "the long session");
    let flood = ok(
        lab.outside(&[
            "python3",
            &fx("syn_flood.py"),
            HOST_UPLINK_IP,
            "8080",
            "140000",
        ]),
        "140,000 spoofed SYNs",
    );
    assert_eq!(flood.trim(), "sent 140000");
    std::fs::write(&go, b"").unwrap();
    let st = long.wait_timeout(Duration::from_secs(30));
    let out = long.stdout();
    assert!(
        st.success() && out.contains("echo two"),
        "the session opened as {peer} broke after the flood ({st})\n{out}{}",
        long.stderr()
    );
    let s = lab.stats();
    assert!(
        s["conntrack"]["unanswered"].as_u64().unwrap_or(0) > 1000,
        "the flood is tracked as unanswered: {}",
        s["conntrack"]
    );
}

/// Item 8: datagrams larger than the path MTU arrive in fragments; those of masqueraded flows
/// and published ports are translated (the first carries the ports, the rest follow it).
#[test]
fn fragments_of_translated_flows_arrive_whole() {
    if !tools() {
        return;
    }
    let (lab, _, _) = Lab::real_host("fragments");
    // A UDP echo that answers with the size it received, as big as the datagram it got.
    const SIZE_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"%d " % len(data) + b"x" * len(data), peer)
"#;
    const ASK_BIG: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
for _ in range(3):
    s.sendto(b"y" * int(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
    try:
        data, _ = s.recvfrom(65535)
    except socket.timeout:
        continue
    print(data.split(b" ")[0].decode(), len(data))
    sys.exit(0)
sys.exit(3)
"#;
    let _outside_echo = lab.spawn_outside(&["python3", "-c", SIZE_ECHO, "7001"]);
    lab.wait_listening_outside("udp", 7001);
    run_d(
        &lab,
        "big",
        &["-p", "7002:7002/udp"],
        &["python3", "-c", SIZE_ECHO, "7002"],
    );
    lab.wait_listening_in("big", "udp", 7002);
    // Out and back: the container's 4000-byte datagram leaves in fragments, so does the answer.
    let got = ok(
        lab.exec(
            "big",
            &["python3", "-c", ASK_BIG, OUTSIDE_IP, "7001", "4000"],
        ),
        "container -> outside, 4000 bytes",
    );
    assert_eq!(got.trim(), "4000 4005", "both ways whole");
    // In: a 4000-byte datagram to the published port.
    let got = ok(
        lab.outside(&["python3", "-c", ASK_BIG, HOST_UPLINK_IP, "7002", "4000"]),
        "outside -> published port, 4000 bytes",
    );
    assert_eq!(got.trim(), "4000 4005", "the published port gets it whole");
}

/// Low item: one client port to two host addresses of one published port makes two flows
/// whose reply tuples would be equal; the second gets a new source port (as Linux NAT does)
/// instead of being dropped as nat-ports-exhausted.
#[test]
fn same_client_port_to_two_host_addresses() {
    if !tools() {
        return;
    }
    let (lab, _, _) = Lab::real_host("client-port-twice");
    lab.host_ok(&["ip", "addr", "add", "192.0.2.100/24", "dev", "up0"]);
    web(&lab, "web", &["8080:80"]);
    const TWO: &str = r#"
import socket, sys
out = []
socks = []
for dst in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(5)
    s.bind(("0.0.0.0", 5555))
    s.connect((dst, 8080))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    out.append(data.split(b"\r\n\r\n", 1)[-1].decode().strip())
    socks.append(s)
print(" ".join(out))
"#;
    let got = ok(
        lab.outside(&["python3", "-c", TWO, HOST_UPLINK_IP, "192.0.2.100"]),
        "two connections from port 5555",
    );
    let answers: Vec<&str> = got.split_whitespace().collect();
    assert_eq!(answers.len(), 2, "both connections answered: {got:?}");
    assert!(
        answers.iter().all(|a| a.starts_with("192.0.2.2:")),
        "{got:?}"
    );
}

/// Item 6: md follows the host. A DHCP-style address change is followed at once by new flows
/// (masqueraded behind the new address) and published ports (answer on the new address only);
/// an uplink deleted and recreated under the same name, and an interface that appears later,
/// are covered again by the watcher with no stale attachment left.
#[test]
fn follows_address_changes_and_interfaces_that_come_and_go() {
    if !tools() {
        return;
    }
    let (lab, o2, _) = Lab::real_host("follow-host");
    let _s0 = peer_server(&lab, lab.outside_ns());
    let _s2 = peer_server(&lab, &o2.ns);
    web(&lab, "web", &["8080:80"]);
    run_d(&lab, "cli", &[], &["sleep", "600"]);
    let seen = |server: &str| {
        let out = lab.exec("cli", &curl(&format!("http://{server}:8000/")));
        out.status.success().then(|| ip_of_peer(&stdout_str(&out)))
    };
    assert_eq!(seen(OUTSIDE_IP).as_deref(), Some(HOST_UPLINK_IP));

    // DHCP gives up0 a new address (the old one goes, and its default route with it).
    lab.host_ok(&["ip", "addr", "del", "192.0.2.1/24", "dev", "up0"]);
    lab.host_ok(&["ip", "addr", "add", "192.0.2.50/24", "dev", "up0"]);
    lab.host_ok(&["ip", "route", "replace", "default", "via", OUTSIDE_IP]);
    assert_eq!(
        seen(OUTSIDE_IP).as_deref(),
        Some("192.0.2.50"),
        "new flows leave behind the new address"
    );
    wait_for(
        "the published port answers on the new address",
        Duration::from_secs(10),
        || {
            lab.outside(&curl("http://192.0.2.50:8080/"))
                .status
                .success()
                .then_some(())
        },
    );

    // up1 is deleted and made again under the same name.
    let old = lab.link_table();
    let old_idx = old.iter().find(|(_, n)| n == "up1").expect("up1").0;
    lab.host_ok(&["ip", "link", "del", "up1"]);
    let o2b = &o2;
    lab.host_ok(&[
        "ip", "link", "add", "up1", "type", "veth", "peer", "name", "eth0", "netns", &o2b.ns,
    ]);
    lab.host_ok(&["ip", "addr", "add", "198.51.100.1/24", "dev", "up1"]);
    lab.host_ok(&["ip", "link", "set", "up1", "up"]);
    lab.in_ns_ok(
        &o2b.ns,
        &["ip", "addr", "add", "198.51.100.2/24", "dev", "eth0"],
    );
    lab.in_ns_ok(&o2b.ns, &["ip", "link", "set", "eth0", "up"]);
    let new_idx = lab
        .link_table()
        .into_iter()
        .find(|(_, n)| n == "up1")
        .expect("up1 again")
        .0;
    assert_ne!(old_idx, new_idx);
    wait_for(
        "the recreated up1 masquerades again",
        Duration::from_secs(15),
        || (seen(&o2.peer_ip).as_deref() == Some("198.51.100.1")).then_some(()),
    );
    let pins = std::fs::read_dir(lab.pin_dir().join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert!(
        !pins.iter().any(|p| p.starts_with(&format!("if{old_idx}-"))),
        "the old up1's attachment is gone: {pins:?}"
    );
    assert!(
        pins.iter().any(|p| p == &format!("if{new_idx}-egress")),
        "the new up1 is covered: {pins:?}"
    );

    // An interface that appears after md started.
    let late = lab.add_segment("late", "up2", "203.0.113.129", "203.0.113.130", 25);
    let _s3 = peer_server(&lab, &late.ns);
    wait_for(
        "a new interface is covered",
        Duration::from_secs(15),
        || (seen(&late.peer_ip).as_deref() == Some("203.0.113.129")).then_some(()),
    );
    ok(
        lab.in_ns(&late.ns, &curl("http://203.0.113.129:8080/")),
        "published port on the late interface",
    );
}

/// Low item: HOST_ADDRS is sized from the host, so a host with more addresses than the old
/// fixed 256 still runs containers; `stats` says how full each map is.
#[test]
fn many_host_addresses() {
    if !tools() {
        return;
    }
    let (lab, _, _) = Lab::real_host("many-addresses");
    let mut batch = String::new();
    for i in 3..=254 {
        batch.push_str(&format!("addr add 192.0.2.{i}/32 dev up0\n"));
    }
    for i in 3..=100 {
        batch.push_str(&format!("addr add 198.51.100.{i}/32 dev up1\n"));
    }
    let file = lab.dir().join("addrs.batch");
    std::fs::write(&file, batch).unwrap();
    lab.host_ok(&["ip", "-batch", file.to_str().unwrap()]);
    web(&lab, "web", &["8080:80"]);
    ok(
        lab.outside(&curl("http://192.0.2.200:8080/")),
        "a published port on the 200th address",
    );
    let s = lab.stats();
    let host_addrs = &s["maps"]["HOST_ADDRS"];
    assert!(
        host_addrs["entries"].as_u64().unwrap_or(0) >= 350,
        "HOST_ADDRS fill: {host_addrs}"
    );
    assert!(
        host_addrs["capacity"].as_u64().unwrap_or(0) > host_addrs["entries"].as_u64().unwrap_or(0)
    );
    // Per-interface counters are per CPU: allocated as interfaces come, not for 65,536 of them
    // on every CPU up front.
    let pin = lab.pin_dir().join("maps/IF_STATS");
    // From the root namespace: pin paths are global (`ip netns exec` remounts /sys).
    let show = std::process::Command::new("bpftool")
        .args(["map", "show", "pinned", pin.to_str().unwrap(), "-j"])
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).expect("bpftool json");
    assert_eq!(
        v["flags"].as_u64().map(|f| f & 1),
        Some(1),
        "IF_STATS is BPF_F_NO_PREALLOC: {v}"
    );
}
