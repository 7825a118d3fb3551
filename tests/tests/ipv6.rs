//! Issue 14: IPv6 dual stack, end to end in the dual-stack lab (host `up0` 2001:db8:1::1/64,
//! outside 2001:db8:1::2/64, the host's IPv6 default route via the outside).
//!
//! Real traffic only: containers on dual-stack networks ping, curl and send UDP over IPv6 to
//! the outside (masqueraded behind the host's address, as Docker's NAT66), outside clients and
//! host processes reach published ports over IPv6 (one host port for both families), a
//! container reaches a published port through the host (hairpin), `policy deny` stops both
//! families, names resolve to AAAA records and /etc/hosts lists both addresses, the resolver
//! forwards to an IPv6 upstream, a routed network is reached directly on its published ports
//! only, fragmented datagrams and ICMPv6 errors are translated, and a container's neighbour
//! advertisement for another container's address is dropped. Without md's IPv6 datapath every
//! one of them fails: md used to switch IPv6 off in containers and drop every IPv6 frame.

use std::time::Duration;

use md_tests::helpers::{
    assert_no_netfilter, drops_of, fx, md_resolv, run_args, run_d, stats_row, counter,
    X_TABLES_NAMES,
};
use md_tests::process::show_output;
use md_tests::{
    require_e2e, require_tools, wait_for, Bg, Lab, HOST_UPLINK_IP, HOST_UPLINK_IP6, OUTSIDE_IP,
    OUTSIDE_IP6,
};
use serde_json::Value;

/// A dual-stack user network of the tests.
const NET: &str = "six";
const SUBNET6: &str = "fd00:6::/64";
const GATEWAY6: &str = "fd00:6::1";
/// The outside's server ports.
const OUT_HTTP: u16 = 8000;
const OUT_UDP: u16 = 9000;

fn need_tools() {
    require_tools(&["ping", "curl", "python3", "bpftool", "dig", "dnsmasq"]);
}

fn dual_stack_net(lab: &Lab) {
    lab.md_ok(&["network", "create", NET, "--ipv6", "--subnet6", SUBNET6]);
}

/// A container on the dual-stack network serving HTTP on port 80 of both families.
fn web(lab: &Lab, name: &str, opts: &[&str]) {
    let mut o = vec!["--network", NET];
    o.extend_from_slice(opts);
    run_d(lab, name, &o, &["python3", &fx("dual_http.py"), "80"]);
    lab.wait_listening_in(name, "tcp", 80);
}

fn sleeper(lab: &Lab, name: &str) {
    run_d(lab, name, &["--network", NET], &["sleep", "600"]);
}

fn ip6_of(lab: &Lab, name: &str) -> String {
    let c = lab.ps_entry(name);
    c["ip6"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no IPv6 address in ps: {c}"))
        .to_string()
}

/// `curl` from `out` ("outside", "host" or a container): the body, or None on failure.
fn curl(lab: &Lab, from: &str, url: &str) -> Option<String> {
    let args = ["curl", "-sS", "-g", "--max-time", "5", url];
    let out = match from {
        "outside" => lab.outside(&args),
        "host" => lab.host(&args),
        c => lab.exec(c, &args),
    };
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[track_caller]
fn curl_ok(lab: &Lab, from: &str, url: &str) -> String {
    curl(lab, from, url).unwrap_or_else(|| {
        let out = lab.exec(from, &["curl", "-sS", "-g", "--max-time", "5", url]);
        panic!("{from}: curl {url} failed\n{}", show_output(&out))
    })
}

/// The address part of "ip:port" (IPv6 without brackets, as the servers print it).
fn peer_ip(s: &str) -> &str {
    s.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(s)
}

fn outside_http(lab: &Lab) -> Bg {
    let bg = lab.spawn_outside(&["python3", &fx("dual_http.py"), &OUT_HTTP.to_string()]);
    lab.wait_listening_outside("tcp", OUT_HTTP);
    bg
}

/// Entries of an IPv6 tracker map whose key has `addr` (bpftool prints addresses as byte
/// lists).
fn tracker6_has(lab: &Lab, addr: &str) -> bool {
    let bytes: Vec<Value> = addr
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets()
        .iter()
        .map(|b| Value::from(*b))
        .collect();
    ["CONNTRACK6", "CONNTRACK6_NEW"].iter().any(|m| {
        lab.map_dump(m).iter().any(|e| {
            let k = &e["formatted"]["key"];
            k["saddr"].as_array() == Some(&bytes) || k["daddr"].as_array() == Some(&bytes)
        })
    })
}

#[test]
fn ipv6_container_is_dual_stack_and_masqueraded() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("v6-masq");
    dual_stack_net(&lab);
    let _srv = outside_http(&lab);
    let echo = lab.spawn_outside(&["python3", "-u", &fx("udp_echo6.py"), &OUT_UDP.to_string()]);
    lab.wait_listening_outside("udp", OUT_UDP);
    sleeper(&lab, "a");
    let a6 = ip6_of(&lab, "a");
    assert!(a6.starts_with("fd00:6::"), "a's address {a6} is in {SUBNET6}");

    // The container side: its address without DAD (never tentative), the default route via
    // the gateway, the gateway answering at once.
    let addrs = lab.exec_ok("a", &["ip", "-6", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains(&format!("{a6}/64")), "{addrs}");
    assert!(!addrs.contains("tentative"), "DAD is off: {addrs}");
    let routes = lab.exec_ok("a", &["ip", "-6", "route", "show", "default"]);
    assert!(routes.contains(&format!("via {GATEWAY6}")), "{routes}");
    lab.exec_ok("a", &["ping", "-6", "-n", "-c", "1", "-W", "2", GATEWAY6]);

    // ICMPv6 echo, TCP and UDP to the outside: masqueraded behind the host's address.
    let out = lab.exec("a", &["ping", "-6", "-n", "-c", "2", "-W", "2", OUTSIDE_IP6]);
    assert!(out.status.success(), "a pings the outside over IPv6\n{}", show_output(&out));
    let seen = curl_ok(&lab, "a", &format!("http://[{OUTSIDE_IP6}]:{OUT_HTTP}/"));
    assert_eq!(peer_ip(&seen), HOST_UPLINK_IP6, "the outside sees the host's address");
    let port: u16 = seen.rsplit_once(':').unwrap().1.parse().unwrap();
    assert!(port >= 61000, "the source port comes from md's NAT range: {seen}");
    // IPv4 still works the same from the same container.
    let seen4 = curl_ok(&lab, "a", &format!("http://{OUTSIDE_IP}:{OUT_HTTP}/"));
    assert_eq!(peer_ip(&seen4), HOST_UPLINK_IP);
    let udp = format!(
        "import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(3); \
         s.sendto(b'hello6', ('{OUTSIDE_IP6}', {OUT_UDP})); print(s.recvfrom(100)[0].decode())"
    );
    assert_eq!(lab.exec_ok("a", &["python3", "-c", &udp]).trim(), "hello6");
    wait_for("the UDP echo saw the host's address", Duration::from_secs(5), || {
        echo.stdout()
            .contains(&format!("6 {HOST_UPLINK_IP6}"))
            .then_some(())
    });
    assert!(tracker6_has(&lab, &a6), "the flows are in md's IPv6 tracker");
    assert!(counter(stats_row(&lab.stats(), "a"), "snat") >= 3);
    // md wrote no netfilter rule for any of it.
    assert_no_netfilter(&lab, &X_TABLES_NAMES);
}
