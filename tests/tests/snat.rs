//! Containers reaching the outside world through masquerade (SNAT to the uplink address), with
//! no netfilter rule anywhere.
//!
//! The outside namespace has no route back to 172.18.0.0/16, so without masquerade the replies
//! never arrive: every test here fails when SNAT (or its reverse) is missing. The servers in the
//! outside namespace report the peer address they saw, and the tests assert on it.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use md_tests::helpers::{assert_no_netfilter, fx, run_d, session_line, X_TABLES_NAMES};
use md_tests::process::show_output;
use md_tests::{require_e2e, require_tools, Lab, GATEWAY, HOST_UPLINK_IP, OUTSIDE_IP};
use serde_json::Value;

/// Tracker lifetime of a closed TCP flow (md's default `ct_tcp_closing_secs`).
const CT_TCP_CLOSING: Duration = Duration::from_secs(10);

/// Splits "ip:port".
#[track_caller]
fn split_addr(s: &str, what: &str) -> (String, u16) {
    let s = s.trim();
    s.rsplit_once(':')
        .and_then(|(ip, port)| Some((ip.to_string(), port.parse().ok()?)))
        .unwrap_or_else(|| panic!("{what}: {s:?} is not ip:port"))
}

fn assert_masqueraded(peer: &str, what: &str) {
    let peer = peer.trim();
    let (ip, port) = peer
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{what}: peer said {peer:?}, not ip:port"));
    assert_eq!(
        ip, HOST_UPLINK_IP,
        "{what}: the outside saw {peer}, not the host's uplink address"
    );
    assert!(
        port.parse::<u16>().is_ok_and(|p| p > 0),
        "{what}: port in {peer}"
    );
}

/// Asks md for the number of live tracker entries (stats collects expired ones first).
fn ct_entries(lab: &Lab) -> Result<u64, String> {
    let out = lab.md(&["stats", "--json"]);
    if !out.status.success() {
        return Err(format!(
            "md-user stats --json failed\n{}",
            show_output(&out)
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "md-user stats --json is not JSON ({e})\n{}",
            show_output(&out)
        )
    })?;
    v["conntrack"]["entries"]
        .as_u64()
        .ok_or_else(|| format!("stats has no numeric conntrack.entries: {v}"))
}

#[test]
fn container_reaches_outside_http_masqueraded() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "curl", "ss"]);
    let lab = Lab::new("snat-http");
    let _server = lab.spawn_outside(&["python3", &fx("peer_http.py"), "8080", OUTSIDE_IP]);
    lab.wait_listening_outside("tcp", 8080);

    run_d(&lab, "c", &[], &["sleep", "300"]);
    let url = format!("http://{OUTSIDE_IP}:8080/");
    let body = lab.exec_ok("c", &["curl", "-sS", "--max-time", "5", &url]);
    assert_masqueraded(&body, "HTTP from container c");

    // A second container, a second flow: both translated.
    run_d(&lab, "d", &[], &["sleep", "300"]);
    let body = lab.exec_ok("d", &["curl", "-sS", "--max-time", "5", &url]);
    assert_masqueraded(&body, "HTTP from container d");
    assert_no_netfilter(&lab, &X_TABLES_NAMES);
}

#[test]
fn container_reaches_outside_udp_masqueraded() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "ss"]);
    let lab = Lab::new("snat-udp");
    let _server = lab.spawn_outside(&["python3", &fx("peer_udp.py"), "9090", OUTSIDE_IP]);
    lab.wait_listening_outside("udp", 9090);

    run_d(&lab, "c", &[], &["sleep", "300"]);
    let reply = lab.exec_ok("c", &["python3", &fx("udp_ask.py"), OUTSIDE_IP, "9090"]);
    assert_masqueraded(&reply, "UDP from container c");
}

#[test]
fn container_pings_outside_with_no_netfilter_rule() {
    if !require_e2e() {
        return;
    }
    require_tools(&["ping"]);
    let lab = Lab::new("snat-ping");
    run_d(&lab, "c", &[], &["sleep", "300"]);
    let out = lab.exec("c", &["ping", "-c", "2", "-W", "2", OUTSIDE_IP]);
    assert!(
        out.status.success(),
        "ping {OUTSIDE_IP} from container c (the outside has no route to 172.18/16: only a \
         masqueraded echo request gets a reply)\n{}",
        show_output(&out)
    );
    // Both echo replies came back: the identifier mapping is stable across packets.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2 received"),
        "expected both echo replies: {text}"
    );
    assert_no_netfilter(&lab, &X_TABLES_NAMES);
}

#[test]
fn concurrent_source_port_clash_gets_distinct_ports() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "ss"]);
    let lab = Lab::new("snat-clash");
    let _echo = lab.spawn_outside(&["python3", &fx("tcp_echo.py"), "7000", OUTSIDE_IP]);
    lab.wait_listening_outside("tcp", 7000);
    run_d(&lab, "a", &[], &["sleep", "300"]);
    run_d(&lab, "b", &[], &["sleep", "300"]);

    let go = lab.dir().join("clash-go");
    let go_s = go.to_str().unwrap();
    let session = |c: &str| {
        lab.spawn_exec(
            c,
            &[
                "python3",
                &fx("tcp_session.py"),
                OUTSIDE_IP,
                "7000",
                "--bind-port",
                "40000",
                "--go",
                go_s,
            ],
        )
    };
    // Both sessions start together and stay open until `go` exists: the two flows from
    // 172.18.0.x:40000 to the same destination are live at the same time.
    let mut sa = session("a");
    let mut sb = session("b");
    let peer_a = session_line(&mut sa, "peer ", "a's session");
    let peer_b = session_line(&mut sb, "peer ", "b's session");
    for (s, c) in [(&mut sa, "a"), (&mut sb, "b")] {
        let local = session_line(s, "local ", &format!("{c}'s session"));
        assert!(
            local.ends_with(":40000"),
            "{c} should have bound source port 40000 (the clash is the point): local {local}"
        );
    }
    assert_masqueraded(&peer_a, "a's session");
    assert_masqueraded(&peer_b, "b's session");
    let (_, port_a) = split_addr(&peer_a, "a's session");
    let (_, port_b) = split_addr(&peer_b, "b's session");
    assert_ne!(
        port_a, port_b,
        "two live flows were given the same translated source {peer_a}"
    );

    std::fs::write(&go, b"").unwrap();
    for (s, c) in [(&mut sa, "a"), (&mut sb, "b")] {
        let st = s.wait_timeout(Duration::from_secs(20));
        let out = s.stdout();
        assert!(
            st.success() && out.contains("echo two"),
            "{c}'s session failed after both were open ({st})\n{out}{}",
            s.stderr()
        );
    }
}

#[test]
fn burst_of_2000_connections_expires_and_long_session_survives() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "ss"]);
    let lab = Lab::new("snat-burst");
    let _echo = lab.spawn_outside(&["python3", &fx("tcp_echo.py"), "7000", OUTSIDE_IP]);
    lab.wait_listening_outside("tcp", 7000);
    run_d(&lab, "c", &[], &["sleep", "600"]);

    // A long-lived session, opened before the burst, idle during it and during the expiry wait.
    let go = lab.dir().join("session-go");
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
    let long_peer = session_line(&mut long, "peer ", "the long session");
    assert_masqueraded(&long_peer, "the long session");
    session_line(&mut long, "echo one", "the long session");

    let baseline = ct_entries(&lab);
    let t_burst = Instant::now();
    let out = lab.exec(
        "c",
        &[
            "python3",
            &fx("tcp_burst.py"),
            OUTSIDE_IP,
            "7000",
            "2000",
            "50",
        ],
    );
    let burst_took = t_burst.elapsed();
    assert!(
        out.status.success(),
        "2000 short connections from c did not all succeed\n{}",
        show_output(&out)
    );
    let summary = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!("burst: {summary} (wall {burst_took:?})");
    let after = ct_entries(&lab);
    let t_after = Instant::now();

    // The tracker entries of the burst are closing; wait out their lifetime, then they must go.
    std::thread::sleep(CT_TCP_CLOSING + Duration::from_secs(1));
    let mut expired: Result<u64, String> = Err("not polled".into());
    if let (Ok(base), Ok(peak)) = (&baseline, &after) {
        assert!(
            *peak >= base + 1900,
            "conntrack.entries right after 2000 connections: {peak} (baseline {base}); \
             burst: {summary}, took {burst_took:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            expired = ct_entries(&lab);
            match &expired {
                Ok(n) if *n <= base + 20 => break,
                Ok(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(500))
                }
                _ => break,
            }
        }
    }

    // The long session still works across the burst and the expiry of its neighbours.
    std::fs::write(&go, b"").unwrap();
    let st = long.wait_timeout(Duration::from_secs(20));
    assert!(
        st.success() && long.stdout().contains("echo two"),
        "the long-lived session broke across the burst ({st})\n{}{}",
        long.stdout(),
        long.stderr()
    );
    // And new flows still get translated.
    let out = lab.exec_ok(
        "c",
        &[
            "python3",
            &fx("tcp_burst.py"),
            OUTSIDE_IP,
            "7000",
            "20",
            "5",
        ],
    );
    assert!(out.contains("ok=20 "), "20 more connections: {out}");
    assert_no_netfilter(&lab, &X_TABLES_NAMES);

    eprintln!(
        "conntrack.entries: baseline {baseline:?}, after the burst {after:?}, \
         {:?} after it {expired:?}",
        t_after.elapsed()
    );
    // Reported last so that a missing `stats` does not hide the traffic checks above.
    let base = baseline.expect("baseline tracker count");
    let peak = after.expect("tracker count after the burst");
    let left = expired.expect("tracker count after the closing lifetime");
    assert!(
        left <= base + 20,
        "conntrack.entries {:?} after the burst's closing lifetime: {left} \
         (baseline {base}, peak {peak}); closed flows are not collected",
        t_after.elapsed()
    );
}

#[test]
fn container_and_gateway_traffic_is_not_translated() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "curl", "ss"]);
    let lab = Lab::new("snat-local");
    let srv = format!(
        "python3 {} 8000 & python3 {} 8000 & wait",
        fx("where_http.py"),
        fx("where_udp.py")
    );
    run_d(&lab, "b", &[], &["sh", "-c", &srv]);
    run_d(&lab, "a", &[], &["sleep", "300"]);
    lab.wait_listening_in("b", "tcp", 8000);
    lab.wait_listening_in("b", "udp", 8000);
    let ip_a = lab.ip_of("a");
    let ip_b = lab.ip_of("b");

    // Container to container over the bridge: b sees a's own address.
    let body = lab.exec_ok(
        "a",
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{ip_b}:8000/"),
        ],
    );
    let (peer, local) = body.trim().split_once(' ').expect("PEER LOCAL");
    assert_eq!(
        split_addr(peer, "a -> b tcp").0,
        ip_a,
        "b saw {peer}, not a's address"
    );
    assert_eq!(local, format!("{ip_b}:8000"));
    let reply = lab.exec_ok("a", &["python3", &fx("udp_from.py"), &ip_b, "8000"]);
    let parts: Vec<&str> = reply.split_whitespace().collect();
    assert_eq!(parts.len(), 3, "udp_from output: {reply}");
    assert_eq!(parts[0], format!("{ip_b}:8000"), "reply source: {reply}");
    assert_eq!(
        split_addr(parts[1], "a -> b udp").0,
        ip_a,
        "b saw {}, not a's address",
        parts[1]
    );

    // Container to a server on the bridge address in the host namespace.
    let _gw = lab.spawn_host(&["python3", &fx("where_http.py"), "--bind", GATEWAY, "8001"]);
    lab.wait_listening_host("tcp", 8001);
    let body = lab.exec_ok(
        "a",
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{GATEWAY}:8001/"),
        ],
    );
    let (peer, _) = body.trim().split_once(' ').expect("PEER LOCAL");
    let (ip, _) = split_addr(peer, "a -> gateway");
    assert_eq!(
        ip, ip_a,
        "the host-side server on {GATEWAY} saw {peer}, not a's address"
    );
    assert!(ip.parse::<Ipv4Addr>().is_ok());
}

#[test]
fn icmp_port_unreachable_reaches_the_container_socket() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3"]);
    let lab = Lab::new("snat-icmp-unreach");
    run_d(&lab, "c", &[], &["sleep", "300"]);
    // Nothing listens on udp/9999 outside: the outside answers with port unreachable to
    // 192.0.2.1, and only a translated error reaches c's connected socket as ECONNREFUSED.
    let out = lab.exec(
        "c",
        &[
            "python3",
            &fx("icmp_error.py"),
            "refused",
            OUTSIDE_IP,
            "9999",
        ],
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("refused"),
        "c's connected UDP socket to {OUTSIDE_IP}:9999 should get ECONNREFUSED\n{}",
        show_output(&out)
    );
}

#[test]
fn icmp_time_exceeded_reaches_the_container() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3"]);
    let lab = Lab::new("snat-icmp-ttl");
    // Make the outside namespace a router towards 198.51.100.0/24 (a veth pair inside it gives
    // the connected route), so that it forwards — and, for TTL 1, answers time exceeded.
    let o = lab.outside_ns().to_string();
    for args in [
        &[
            "ip", "-n", &o, "link", "add", "far0", "type", "veth", "peer", "name", "far1",
        ][..],
        &[
            "ip",
            "-n",
            &o,
            "addr",
            "add",
            "198.51.100.1/24",
            "dev",
            "far0",
        ],
        &["ip", "-n", &o, "link", "set", "far0", "up"],
        &["ip", "-n", &o, "link", "set", "far1", "up"],
    ] {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}\n{}", show_output(&out));
    }
    lab.outside_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    run_d(&lab, "c", &[], &["sleep", "300"]);

    // TTL 2: the host forwards (TTL 1), the outside would forward and must give up instead.
    let out = lab.exec(
        "c",
        &[
            "python3",
            &fx("icmp_error.py"),
            "ttl",
            "198.51.100.7",
            "33434",
            "2",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "no ICMP error reached c for its TTL-2 datagram to 198.51.100.7\n{}",
        show_output(&out)
    );
    // origin 2 = SO_EE_ORIGIN_ICMP; type 11 = time exceeded, from the outside router.
    assert!(
        text.contains("origin=2 type=11 ") && text.contains(&format!("offender={OUTSIDE_IP} ")),
        "expected an ICMP time exceeded from {OUTSIDE_IP}, got: {text}"
    );
}
