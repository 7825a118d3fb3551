//! Observability (issue 7): `stats` counters under known traffic, `monitor` events, BTF on
//! every pinned map, clear program and link names in bpftool, `inspect`.
//!
//! Counters are compared as deltas around the traffic a test makes (ARP and the like also
//! move them): exact where the datapath counts one per thing (published-port hits, DNAT per
//! connection, SNAT per new flow, policy drops per packet), lower bounds elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use md_common::maps as m;
use md_tests::helpers::{counter, fx, run_d, stats_row, RAW_UDP, UDP_PROBE};
use md_tests::process::show_output;
use md_tests::{
    require_e2e, require_tools, stderr_str, stdout_str, wait_for, Bg, Lab, GATEWAY, HOST_UPLINK_IP,
    OUTSIDE_IP,
};
use serde_json::Value;

/// How many times [`UDP_PROBE`] sends before it gives up (1 s each).
const UDP_PROBE_TRIES: &str = "3";

/// Sends COUNT datagrams from one socket to HOST PORT (one flow, no answer expected).
const UDP_BURST: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"d%d" % i, (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.01)
"#;

/// UDP sink: prints one line per datagram on PORT, never answers.
const UDP_SINK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    print("%s %s:%d" % (data.decode(errors="replace"), peer[0], peer[1]), flush=True)
"#;

/// One UDP flow: COUNT request/answer exchanges from one socket with HOST PORT.
const UDP_FLOW: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
for i in range(int(sys.argv[3])):
    s.sendto(b"q%d" % i, (sys.argv[1], int(sys.argv[2])))
    s.recvfrom(2048)
"#;

/// Size of an ICMP echo request/reply of `ping` (default 56 bytes of data) at the IP layer.
const PING_IP_BYTES: u64 = 84;

fn need_tools() {
    require_tools(&["python3", "curl", "ping", "ss", "bpftool"]);
}

/// A container serving HTTP on 80 (peer_http.py) and UDP on 53 (peer_udp.py).
#[track_caller]
fn serve(lab: &Lab, name: &str, extra: &[&str]) {
    let script = format!(
        "python3 {} 80 & python3 {} 53 & wait",
        fx("peer_http.py"),
        fx("peer_udp.py")
    );
    run_d(lab, name, extra, &["sh", "-c", &script]);
    lab.wait_listening_in(name, "tcp", 80);
    lab.wait_listening_in(name, "udp", 53);
}

/// An HTTP server outside on 192.0.2.2:8081.
#[track_caller]
fn outside_http(lab: &Lab) -> Bg {
    let bg = lab.spawn_outside(&["python3", &fx("peer_http.py"), "8081", OUTSIDE_IP]);
    lab.wait_listening_outside("tcp", 8081);
    bg
}

#[track_caller]
fn curl_ok(out: std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what}\n{}", show_output(&out));
    stdout_str(&out)
}

// ---- stats ------------------------------------------------------------------------------

/// after - before of a counter of container `name` (or of the uplink when `name` is None).
#[track_caller]
fn delta(before: &Value, after: &Value, name: Option<&str>, path: &str) -> u64 {
    let pick = |s: &'_ Value| -> u64 {
        match name {
            Some(n) => counter(stats_row(s, n), path),
            None => counter(&s["uplink"], path),
        }
    };
    let (b, a) = (pick(before), pick(after));
    assert!(
        a >= b,
        "counter {path} of {name:?} went backwards: {b} -> {a}"
    );
    a - b
}

/// Hits of the published port entry of `container` whose spec is `port` (as ps shows it).
#[track_caller]
fn hits(stats: &Value, container: &str, port: &str) -> u64 {
    let p = stats["ports"]
        .as_array()
        .and_then(|v| {
            v.iter().find(|p| {
                p["container"].as_str() == Some(container) && p["port"].as_str() == Some(port)
            })
        })
        .unwrap_or_else(|| panic!("stats --json has no port {port} of {container}: {stats}"));
    p["hits"]
        .as_u64()
        .unwrap_or_else(|| panic!("port entry without numeric hits: {p}"))
}

#[test]
fn stats_count_pings_flows_and_directions() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("obs-stats-snat");
    let _http = outside_http(&lab);
    let sink = lab.spawn_outside(&["python3", "-u", "-c", UDP_SINK, OUTSIDE_IP, "9999"]);
    lab.wait_listening_outside("udp", 9999);
    run_d(&lab, "a", &[], &["sleep", "600"]);
    run_d(&lab, "b", &[], &["sleep", "600"]);

    // Exactly 5 echo requests: one ICMP flow.
    let n = 5u64;
    let s0 = lab.stats();
    let out = lab.exec(
        "a",
        &[
            "ping",
            "-n",
            "-c",
            &n.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            OUTSIDE_IP,
        ],
    );
    assert!(
        out.status.success(),
        "a pings outside\n{}",
        show_output(&out)
    );
    let s1 = lab.stats();
    let d = |name: Option<&str>, path: &str| delta(&s0, &s1, name, path);
    assert!(
        d(Some("a"), "egress_packets") >= n,
        "a egress_packets: {s1}"
    );
    assert!(
        d(Some("a"), "ingress_packets") >= n,
        "a ingress_packets: {s1}"
    );
    assert!(
        d(Some("a"), "egress_bytes") >= n * PING_IP_BYTES,
        "a egress_bytes"
    );
    assert!(
        d(Some("a"), "ingress_bytes") >= n * PING_IP_BYTES,
        "a ingress_bytes"
    );
    assert_eq!(d(Some("a"), "snat"), 1, "one ICMP flow = one SNAT binding");
    assert_eq!(d(Some("a"), "dnat"), 0);
    assert!(
        d(Some("b"), "egress_packets") < n,
        "a's pings were counted on b: {s1}"
    );
    assert_eq!(d(Some("b"), "snat"), 0);
    assert!(
        d(None, "egress_packets") >= n,
        "uplink egress_packets: {s1}"
    );
    assert!(
        d(None, "ingress_packets") >= n,
        "uplink ingress_packets: {s1}"
    );
    let ct = &s1["conntrack"];
    let entries = ct["entries"].as_u64().expect("conntrack.entries");
    assert!(
        entries >= 2,
        "the ping flow (two tracker entries) is still live: {ct}"
    );
    assert!(
        ct["capacity"].as_u64().is_some_and(|c| c > entries) && ct["collected"].is_u64(),
        "conntrack: {ct}"
    );

    // Three connections: three flows.
    let url = format!("http://{OUTSIDE_IP}:8081/");
    let s0 = lab.stats();
    for _ in 0..3 {
        curl_ok(
            lab.exec("a", &["curl", "-sS", "--max-time", "5", &url]),
            "a -> outside http",
        );
    }
    let s1 = lab.stats();
    assert_eq!(
        delta(&s0, &s1, Some("a"), "snat"),
        3,
        "3 TCP connections = 3 SNAT bindings"
    );
    assert!(delta(&s0, &s1, Some("a"), "egress_packets") >= 3 * 3);
    assert!(delta(&s0, &s1, Some("a"), "ingress_packets") >= 3 * 3);

    // 20 datagrams out, nothing back: egress grows, ingress does not (direction check).
    let s0 = lab.stats();
    lab.exec_ok("a", &["python3", "-c", UDP_BURST, OUTSIDE_IP, "9999", "20"]);
    wait_for("the sink got 20 datagrams", Duration::from_secs(10), || {
        (sink.stdout().lines().count() >= 20).then_some(())
    });
    let s1 = lab.stats();
    let eg = delta(&s0, &s1, Some("a"), "egress_packets");
    let ing = delta(&s0, &s1, Some("a"), "ingress_packets");
    assert!(eg >= 20, "20 datagrams left a: egress_packets +{eg}");
    assert!(
        ing < 10,
        "nothing answered a's datagrams, yet ingress_packets +{ing} (egress +{eg}): \
         are egress and ingress swapped?"
    );
    assert_eq!(delta(&s0, &s1, Some("a"), "snat"), 1, "one UDP flow");
}

#[test]
fn stats_count_published_port_hits_and_dnat_exactly() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("obs-stats-dnat");
    serve(&lab, "c", &["-p", "8080:80", "-p", "5353:53/udp"]);
    run_d(&lab, "b", &[], &["sleep", "600"]);
    let url = format!("http://{HOST_UPLINK_IP}:8080/");

    let n = 4u64;
    let s0 = lab.stats();
    for _ in 0..n {
        let seen = curl_ok(
            lab.outside(&["curl", "-sS", "--max-time", "5", &url]),
            "outside -> 192.0.2.1:8080",
        );
        assert!(seen.starts_with(OUTSIDE_IP), "{seen}");
    }
    let s1 = lab.stats();
    assert_eq!(
        hits(&s1, "c", "8080:80/tcp") - hits(&s0, "c", "8080:80/tcp"),
        n
    );
    assert_eq!(hits(&s1, "c", "5353:53/udp"), hits(&s0, "c", "5353:53/udp"));
    assert_eq!(
        delta(&s0, &s1, Some("c"), "dnat"),
        n,
        "c dnat after {n} connections"
    );
    assert_eq!(
        delta(&s0, &s1, Some("c"), "snat"),
        0,
        "answers are not SNAT"
    );
    assert_eq!(delta(&s0, &s1, Some("b"), "dnat"), 0);
    // SYN, ACK, request, FIN… in; SYN-ACK, response, FIN… out.
    assert!(delta(&s0, &s1, Some("c"), "ingress_packets") >= 3 * n);
    assert!(delta(&s0, &s1, Some("c"), "egress_packets") >= 2 * n);

    // Two requests from another container through the host address (hairpin) and one UDP
    // flow from outside: counted the same way.
    let s0 = lab.stats();
    for _ in 0..2 {
        curl_ok(
            lab.exec("b", &["curl", "-sS", "--max-time", "5", &url]),
            "b -> 192.0.2.1:8080",
        );
    }
    let out = lab.outside(&[
        "python3",
        "-c",
        UDP_PROBE,
        HOST_UPLINK_IP,
        "5353",
        UDP_PROBE_TRIES,
    ]);
    assert!(
        out.status.success(),
        "outside -> 5353/udp\n{}",
        show_output(&out)
    );
    let s1 = lab.stats();
    assert_eq!(
        hits(&s1, "c", "8080:80/tcp") - hits(&s0, "c", "8080:80/tcp"),
        2
    );
    assert_eq!(
        hits(&s1, "c", "5353:53/udp") - hits(&s0, "c", "5353:53/udp"),
        1
    );
    assert_eq!(delta(&s0, &s1, Some("c"), "dnat"), 3);
    assert!(delta(&s0, &s1, Some("b"), "egress_packets") >= 2 * 3);

    // Every ports[] entry is one of c's published ports, as ps spells them.
    let ps_ports: BTreeSet<String> = lab
        .container("c")
        .and_then(|p| p["ports"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    let stats_ports: BTreeSet<String> = s1["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["container"], "c", "{p}");
            p["port"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(stats_ports, ps_ports);
}

#[test]
fn stats_count_host_clients_of_published_ports_like_any_other() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("obs-stats-host");
    serve(&lab, "c", &["-p", "8080:80", "-p", "5353:53/udp"]);

    // Host processes reach published ports through the socket programs, not through a veth
    // or the uplink: still one translated connection each, to be counted like the others.
    let n = 3u64;
    let s0 = lab.stats();
    for _ in 0..n {
        curl_ok(
            lab.host(&["curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/"]),
            "host -> 127.0.0.1:8080",
        );
    }
    let s1 = lab.stats();
    let tcp_hits = hits(&s1, "c", "8080:80/tcp") - hits(&s0, "c", "8080:80/tcp");
    let tcp_dnat = delta(&s0, &s1, Some("c"), "dnat");

    // One UDP flow of five datagrams from one host socket: one hit, one translation.
    let out = lab.host(&["python3", "-c", UDP_FLOW, "127.0.0.1", "5353", "5"]);
    assert!(
        out.status.success(),
        "host -> 127.0.0.1:5353/udp\n{}",
        show_output(&out)
    );
    let s2 = lab.stats();
    let udp_hits = hits(&s2, "c", "5353:53/udp") - hits(&s1, "c", "5353:53/udp");
    let udp_dnat = delta(&s1, &s2, Some("c"), "dnat");
    assert!(
        (tcp_hits, tcp_dnat, udp_hits, udp_dnat) == (n, n, 1, 1),
        "from the host: {n} TCP connections to 127.0.0.1:8080 gave hits +{tcp_hits} and c's \
         dnat +{tcp_dnat} (expected +{n} each); one UDP flow of 5 datagrams to \
         127.0.0.1:5353 gave hits +{udp_hits} and dnat +{udp_dnat} (expected +1 each)"
    );
}

// ---- monitor ----------------------------------------------------------------------------

/// Parsed JSON lines a background `monitor --json` printed so far.
fn events(mon: &Bg) -> Vec<Value> {
    mon.stdout()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until the monitor printed an event with all of `want`'s fields; returns it.
#[track_caller]
fn wait_event(mon: &mut Bg, want: &[(&str, &str)], what: &str) -> Value {
    wait_for(
        &format!("monitor shows {what}"),
        Duration::from_secs(15),
        || {
            if let Some(st) = mon.try_status() {
                panic!(
                    "monitor exited ({st}) before {what}\n--- stdout ---\n{}--- stderr ---\n{}",
                    mon.stdout(),
                    mon.stderr()
                );
            }
            events(mon)
                .into_iter()
                .find(|e| want.iter().all(|(k, v)| e[*k].as_str() == Some(*v)))
        },
    )
}

#[test]
fn policy_drops_and_nat_show_in_stats_and_monitor() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("obs-monitor");
    let _http = outside_http(&lab);
    run_d(&lab, "a", &[], &["sleep", "600"]);
    serve(&lab, "c", &["-p", "8080:80"]);
    let (a, c) = (lab.ip_of("a"), lab.ip_of("c"));
    let mut mon = lab.spawn_md(&["monitor", "--json"]);

    lab.md_ok(&["policy", "deny", "a", "c"]);
    let s0 = lab.stats();
    let out = lab.exec(
        "a",
        &[
            "curl",
            "-sS",
            "--max-time",
            "1",
            "--local-port",
            "41234",
            &format!("http://{c}/"),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(28),
        "a -> c must be dropped\n{}",
        show_output(&out)
    );
    let ev = wait_event(
        &mut mon,
        &[
            ("event", "policy-deny"),
            ("reason", "policy"),
            ("proto", "tcp"),
            ("src", &format!("{a}:41234")),
            ("dst", &format!("{c}:80")),
        ],
        "the a -> c policy drop",
    );
    assert_eq!(ev["src_container"], "a", "{ev}");
    assert_eq!(ev["dst_container"], "c", "{ev}");
    assert!(ev["ts_ns"].as_u64().is_some_and(|t| t > 0), "{ev}");
    assert!(ev.get("interface").is_some(), "{ev}");

    // Exactly 2 echo requests a -> c: stats count both, the monitor reports them.
    let out = lab.exec("a", &["ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", &c]);
    assert!(
        !out.status.success(),
        "a -> c pings answered\n{}",
        show_output(&out)
    );
    let s1 = lab.stats();
    let tcp_drops = delta(&s0, &s1, Some("a"), "drops.policy");
    assert!(
        tcp_drops >= 3,
        "1 SYN + 2 echo requests dropped: drops.policy +{tcp_drops}"
    );
    let s2 = lab.stats();
    let out = lab.exec("a", &["ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", &c]);
    assert!(!out.status.success());
    let s3 = lab.stats();
    assert_eq!(
        delta(&s2, &s3, Some("a"), "drops.policy"),
        2,
        "2 denied pings"
    );
    assert_eq!(delta(&s2, &s3, Some("c"), "drops.policy"), 0);
    wait_event(
        &mut mon,
        &[
            ("event", "policy-deny"),
            ("proto", "icmp"),
            ("src_container", "a"),
            ("dst_container", "c"),
        ],
        "the a -> c ICMP policy drop",
    );

    // New NAT bindings: masquerade of a's connection, a published port from outside.
    curl_ok(
        lab.exec(
            "a",
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--local-port",
                "41235",
                &format!("http://{OUTSIDE_IP}:8081/"),
            ],
        ),
        "a -> outside",
    );
    let ev = wait_event(
        &mut mon,
        &[
            ("event", "nat"),
            ("reason", "snat"),
            ("proto", "tcp"),
            ("src", &format!("{a}:41235")),
            ("dst", &format!("{OUTSIDE_IP}:8081")),
        ],
        "a's SNAT binding",
    );
    assert!(
        ev["nat"]
            .as_str()
            .is_some_and(|n| n.starts_with(&format!("{HOST_UPLINK_IP}:"))),
        "SNAT event must say the translated source: {ev}"
    );
    assert_eq!(ev["src_container"], "a", "{ev}");
    curl_ok(
        lab.outside(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--local-port",
            "41236",
            &format!("http://{HOST_UPLINK_IP}:8080/"),
        ]),
        "outside -> 192.0.2.1:8080",
    );
    let ev = wait_event(
        &mut mon,
        &[
            ("event", "nat"),
            ("reason", "dnat"),
            ("src", &format!("{OUTSIDE_IP}:41236")),
            ("dst", &format!("{HOST_UPLINK_IP}:8080")),
        ],
        "the DNAT binding of an outside client",
    );
    assert_eq!(ev["nat"], format!("{c}:80"), "{ev}");

    // A drop for another reason: a forged source.
    lab.exec_ok(
        "a",
        &["python3", "-c", RAW_UDP, "172.18.0.250", &c, "53", "forged"],
    );
    wait_event(
        &mut mon,
        &[
            ("event", "drop"),
            ("reason", "spoofed-source"),
            ("src", "172.18.0.250:40000"),
        ],
        "the spoofed-source drop",
    );

    // Every line is one JSON object.
    for l in mon.stdout().lines() {
        assert!(
            serde_json::from_str::<Value>(l).is_ok_and(|v| v.is_object()),
            "monitor --json printed a line that is not a JSON object: {l:?}"
        );
    }
    mon.signal(libc::SIGINT);
    let st = mon.wait_timeout(Duration::from_secs(5));
    assert!(st.success(), "monitor after SIGINT: {st}\n{}", mon.stderr());

    // The readable form: one line per event, with addresses and names.
    let mut text = lab.spawn_md(&["monitor"]);
    let _ = lab.exec(
        "a",
        &[
            "curl",
            "-sS",
            "--max-time",
            "1",
            "--local-port",
            "41237",
            &format!("http://{c}/"),
        ],
    );
    let needle = format!("{a}:41237");
    let line = wait_for("monitor prints the drop", Duration::from_secs(15), || {
        text.stdout()
            .lines()
            .find(|l| l.contains(&needle))
            .map(str::to_string)
    });
    for want in ["policy-deny", &format!("{c}:80"), "(a)", "(c)"] {
        assert!(line.contains(want), "monitor line lacks {want:?}: {line}");
    }
    text.signal(libc::SIGTERM);
    let st = text.wait_timeout(Duration::from_secs(5));
    assert!(
        st.success(),
        "monitor after SIGTERM: {st}\n{}",
        text.stderr()
    );
}

#[test]
fn monitor_streams_what_happens_after_it_starts() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("obs-monitor-live");
    run_d(&lab, "a", &[], &["sleep", "600"]);
    serve(&lab, "c", &[]);
    let (a, c) = (lab.ip_of("a"), lab.ip_of("c"));
    lab.md_ok(&["policy", "deny", "a", "c"]);
    let drop_from = |port: &str| {
        let out = lab.exec(
            "a",
            &[
                "curl",
                "-sS",
                "--max-time",
                "1",
                "--local-port",
                port,
                &format!("http://{c}/"),
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(28),
            "a -> c must be dropped\n{}",
            show_output(&out)
        );
    };
    // A drop nobody watched...
    drop_from("41301");
    let mut mon = lab.spawn_md(&["monitor", "--json"]);
    // ...then one while the monitor runs.
    drop_from("41302");
    wait_event(
        &mut mon,
        &[("event", "policy-deny"), ("src", &format!("{a}:41302"))],
        "the drop made while it runs",
    );
    let stale: Vec<Value> = events(&mon)
        .into_iter()
        .filter(|e| e["src"].as_str() == Some(&format!("{a}:41301")))
        .collect();
    assert!(
        stale.is_empty(),
        "monitor, started after the drop from port 41301, printed it as if it happened now \
         (events queued in the ring buffer while nobody read it): {stale:?}"
    );
}

// ---- bpftool ----------------------------------------------------------------------------

/// `bpftool ARGS... -j` (root namespace), parsed.
#[track_caller]
fn bpftool_json(args: &[&str]) -> Value {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .arg("-j")
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {} -j\n{}",
        args.join(" "),
        show_output(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool {} -j is not JSON ({e}):\n{}",
            args.join(" "),
            stdout_str(&out)
        )
    })
}

/// `bpftool ARGS...` without -j: the plain output, which with BTF is JSON-like text.
#[track_caller]
fn bpftool_plain(args: &[&str]) -> String {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {}\n{}",
        args.join(" "),
        show_output(&out)
    );
    stdout_str(&out)
}

fn dir_names(p: &Path) -> BTreeSet<String> {
    std::fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every string anywhere in `v` that looks like a raw byte ("0x..").
fn hex_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.starts_with("0x") => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| hex_strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| hex_strings(x, out)),
        _ => {}
    }
}

/// The kernel keeps 15 characters of an object's name.
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

#[test]
fn every_pinned_map_has_a_clear_name_and_dumps_with_btf_field_names() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("obs-btf");
    serve(&lab, "c", &["-p", "8080:80", "-p", "5353:53/udp"]);
    run_d(&lab, "a", &[], &["sleep", "600"]);
    // Fill the maps: a rule, tracked flows, a host UDP socket translated at sendmsg.
    lab.md_ok(&["policy", "deny", "a", "c"]);
    let out = lab.exec("a", &["ping", "-n", "-c", "1", "-W", "2", OUTSIDE_IP]);
    assert!(
        out.status.success(),
        "a pings outside\n{}",
        show_output(&out)
    );
    let out = lab.host(&[
        "python3",
        "-c",
        UDP_PROBE,
        "127.0.0.1",
        "5353",
        UDP_PROBE_TRIES,
    ]);
    assert!(
        out.status.success(),
        "host -> 127.0.0.1:5353/udp\n{}",
        show_output(&out)
    );

    let maps_dir = lab.pin_dir().join("maps");
    let pinned = dir_names(&maps_dir);
    let expected: BTreeSet<String> = m::ALL_MAPS.iter().map(|s| s.to_string()).collect();
    assert_eq!(pinned, expected, "maps pinned under {}", maps_dir.display());

    // A named field each map's entries must show (value unless marked key).
    let fields: BTreeMap<&str, &[&str]> = [
        (
            m::ENDPOINTS,
            &["value.ifindex", "value.identity", "value.mac"][..],
        ),
        (m::NETWORKS, &["value.gateway", "value.prefix_len"]),
        (m::CONFIG, &["value.uplink_ip", "value.policy_default"]),
        (
            m::PORT_MAP,
            &["key.port", "key.proto", "value.ip", "value.hits"],
        ),
        (
            m::CONNTRACK,
            &[
                "key.saddr",
                "key.dport",
                "value.nat_saddr",
                "value.expires_ns",
            ],
        ),
        (
            m::POLICY,
            &[
                "key.src_identity",
                "key.dst_identity",
                "value.verdict",
                "value.drops",
            ],
        ),
        (
            m::IF_STATS,
            &[
                "values.0.value.egress_packets",
                "values.0.value.drop_policy",
            ],
        ),
        (m::SOCK_REV, &["key.cookie", "value.ip", "value.port"]),
        (m::HOST_ADDRS, &[]),
    ]
    .into_iter()
    .collect();

    for name in &pinned {
        let f = maps_dir.join(name);
        let f = f.to_str().unwrap();
        let show = bpftool_json(&["map", "show", "pinned", f]);
        assert_eq!(
            show["name"].as_str(),
            Some(kernel_name(name)),
            "the kernel name of {f} should say the same as its file: {show}"
        );
        if show["type"] == "ringbuf" {
            // A ring buffer has no key/value to dump; `show` is what bpftool offers.
            continue;
        }
        assert!(
            show["btf_id"].as_u64().is_some_and(|id| id > 0),
            "{name} carries no BTF: {show}"
        );
        let dump = bpftool_json(&["map", "dump", "pinned", f]);
        let entries = dump.as_array().unwrap_or_else(|| panic!("{name}: {dump}"));
        for e in entries {
            assert!(
                e["formatted"].is_object(),
                "{name}: entry without a BTF-formatted form: {e}"
            );
        }
        let plain = bpftool_plain(&["map", "dump", "pinned", f]);
        let plain: Value = serde_json::from_str(&plain).unwrap_or_else(|e| {
            panic!("{name}: plain bpftool dump is not the BTF (JSON) form ({e}):\n{plain}")
        });
        let mut hex = Vec::new();
        hex_strings(&plain, &mut hex);
        assert!(hex.is_empty(), "{name} dumps raw bytes {hex:?}:\n{plain}");
        let Some(want) = fields.get(name.as_str()) else {
            continue;
        };
        let first = plain
            .as_array()
            .and_then(|a| a.first())
            .unwrap_or_else(|| panic!("{name} has no entry to show after the traffic"));
        for path in *want {
            let v = path
                .split('.')
                .fold(first, |v, k| match k.parse::<usize>() {
                    Ok(i) => &v[i],
                    Err(_) => &v[k],
                });
            assert!(!v.is_null(), "{name}: no field {path} in {first}");
        }
    }
}

#[test]
fn programs_and_links_have_clear_names() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("obs-progs");
    serve(&lab, "c", &["-p", "8080:80"]);
    run_d(&lab, "b", &[], &["sleep", "600"]);
    let all = [
        m::PROG_VETH_INGRESS,
        m::PROG_VETH_EGRESS,
        m::PROG_UPLINK_INGRESS,
        m::PROG_UPLINK_EGRESS,
        m::PROG_SOCK_CONNECT4,
        m::PROG_SOCK_SENDMSG4,
        m::PROG_SOCK_RECVMSG4,
        m::PROG_SOCK_GETPEERNAME4,
    ];

    // Pinned programs: named as their files, and bpftool shows the full names.
    let progs_dir = lab.pin_dir().join("progs");
    let mut by_id: BTreeMap<u64, String> = BTreeMap::new();
    for name in dir_names(&progs_dir) {
        let f = progs_dir.join(&name);
        let p = bpftool_json(&["prog", "show", "pinned", f.to_str().unwrap()]);
        assert_eq!(
            p["name"].as_str(),
            Some(name.as_str()),
            "{}: {p}",
            f.display()
        );
        by_id.insert(p["id"].as_u64().expect("prog id"), name);
    }
    let names: BTreeSet<&str> = by_id.values().map(String::as_str).collect();
    for want in all {
        assert!(names.contains(want), "no pinned program {want}: {names:?}");
    }
    let listed = bpftool_json(&["prog", "show"]);
    for (id, name) in &by_id {
        let p = listed
            .as_array()
            .and_then(|v| v.iter().find(|p| p["id"].as_u64() == Some(*id)))
            .unwrap_or_else(|| panic!("bpftool prog show does not list {name} (id {id})"));
        assert_eq!(p["name"].as_str(), Some(name.as_str()), "{p}");
    }

    // Pinned links (the uplink's TCX links, the socket programs'): each attaches one of md's
    // programs, and bpftool lists it.
    let links_dir = lab.pin_dir().join("links");
    let mut links = Vec::new();
    for n in dir_names(&links_dir) {
        let f = links_dir.join(&n);
        let l = bpftool_json(&["link", "show", "pinned", f.to_str().unwrap()]);
        let prog = l["prog_id"].as_u64().expect("link prog_id");
        let pname = by_id
            .get(&prog)
            .unwrap_or_else(|| panic!("link {n} runs program {prog}, not one of md's"));
        links.push((l["id"].as_u64().expect("link id"), pname.clone()));
    }
    let listed = bpftool_json(&["link", "show"]);
    for (id, prog) in &links {
        assert!(
            listed
                .as_array()
                .is_some_and(|v| v.iter().any(|l| l["id"].as_u64() == Some(*id))),
            "bpftool link show does not list the link of {prog} (id {id})"
        );
    }
    // A container's host veth: its two programs in clsact filters, which `bpftool net` names.
    let veth_filters = || -> Vec<(String, String, String)> {
        let out = lab.host_ok(&["bpftool", "net", "show", "-j"]);
        let v: Value = serde_json::from_str(&out).expect("bpftool net show -j");
        v[0]["tc"]
            .as_array()
            .expect("bpftool net: tc")
            .iter()
            .filter(|f| f["devname"].as_str().is_some_and(|d| d.starts_with("md")))
            .map(|f| {
                let id = f["id"].as_u64().expect("filter prog id");
                let pname = by_id
                    .get(&id)
                    .unwrap_or_else(|| panic!("filter {f} runs program {id}, not one of md's"));
                assert_eq!(f["name"].as_str(), Some(pname.as_str()), "{f}");
                let s = |k: &str| f[k].as_str().unwrap_or_default().to_string();
                (s("devname"), s("kind"), pname.clone())
            })
            .collect()
    };
    let count = |fs: &[(String, String, String)], p: &str| fs.iter().filter(|f| f.2 == p).count();
    let filters = veth_filters();
    for want in all {
        let veth_prog = [m::PROG_VETH_INGRESS, m::PROG_VETH_EGRESS].contains(&want);
        let n = if veth_prog {
            count(&filters, want)
        } else {
            links.iter().filter(|(_, n)| n == want).count()
        };
        assert!(n >= 1, "{want} is attached nowhere: {links:?} {filters:?}");
    }
    assert_eq!(
        count(&filters, m::PROG_VETH_INGRESS),
        2,
        "two containers: {filters:?}"
    );
    assert_eq!(
        count(&filters, m::PROG_VETH_EGRESS),
        2,
        "two containers: {filters:?}"
    );
    let veth = lab.host_veth_of("c");
    for (kind, prog) in [
        ("clsact/ingress", m::PROG_VETH_INGRESS),
        ("clsact/egress", m::PROG_VETH_EGRESS),
    ] {
        let want = (veth.clone(), kind.to_string(), prog.to_string());
        assert!(filters.contains(&want), "no {want:?}: {filters:?}");
    }

    lab.md_ok(&["stop", "b"]);
    let filters = veth_filters();
    assert_eq!(
        count(&filters, m::PROG_VETH_INGRESS),
        1,
        "after stopping b: {filters:?}"
    );
    assert_eq!(
        count(&filters, m::PROG_VETH_EGRESS),
        1,
        "after stopping b: {filters:?}"
    );
}

// ---- inspect ----------------------------------------------------------------------------

#[track_caller]
fn inspect(lab: &Lab, name: &str) -> Value {
    let out = lab.md_ok(&["inspect", name, "--json"]);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("inspect {name} --json is not JSON ({e}):\n{out}"))
}

fn policies(v: &Value) -> BTreeSet<(String, String, String)> {
    v["Policies"]
        .as_array()
        .unwrap_or_else(|| panic!("inspect has no Policies array: {v}"))
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
            (s("from"), s("to"), s("verdict"))
        })
        .collect()
}

fn triple(f: &str, t: &str, v: &str) -> (String, String, String) {
    (f.into(), t.into(), v.into())
}

#[test]
fn inspect_shows_network_settings_ports_and_policies() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("obs-inspect");
    serve(
        &lab,
        "c",
        &[
            "-p",
            "8080:80",
            "-p",
            "127.0.0.1:8081:81",
            "-p",
            "5353:53/udp",
        ],
    );
    run_d(&lab, "a", &[], &["sleep", "600"]);
    run_d(&lab, "b", &[], &["sleep", "600"]);
    lab.md_ok(&["policy", "deny", "a", "c"]);
    lab.md_ok(&["policy", "deny", "c", "b"]);
    lab.md_ok(&["policy", "deny", "a", "b"]);

    let ps = lab.container("c").expect("c in ps");
    let v = inspect(&lab, "c");
    assert_eq!(v["Name"], "c", "{v}");
    assert_eq!(v["Id"], ps["id"], "{v}");
    assert_eq!(v["Hostname"], "c", "{v}");
    assert_eq!(v["State"]["Status"], "running", "{v}");
    assert_eq!(v["State"]["Pid"], ps["pid"], "{v}");

    let ip = lab.ip_of("c");
    let net = &v["NetworkSettings"]["Networks"]["bridge"];
    assert_eq!(net["IPAddress"], ip.as_str(), "{v}");
    assert_eq!(net["IPPrefixLen"], 16, "{v}");
    assert_eq!(net["Gateway"], GATEWAY, "{v}");
    let o: Vec<u8> = ip.split('.').map(|x| x.parse().unwrap()).collect();
    let mac = format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    assert_eq!(net["MacAddress"], mac.as_str(), "{v}");
    let eth0 = lab.exec_ok("c", &["ip", "-o", "link", "show", "dev", "eth0"]);
    assert!(
        eth0.contains(&format!("link/ether {mac} ")),
        "inspect says MAC {mac}, c's eth0 says: {eth0}"
    );
    assert_eq!(net["Interface"], "eth0", "{v}");
    let veth = lab.host_veth_of("c");
    assert_eq!(net["HostVeth"], veth.as_str(), "{v}");
    let ifindex = lab
        .link_table()
        .into_iter()
        .find(|(_, n)| *n == veth)
        .map(|(i, _)| i)
        .expect("c's veth in the host namespace");
    assert_eq!(net["HostIfindex"], ifindex, "{v}");
    assert_eq!(net["Bridge"], "md0", "{v}");

    let ports = &v["NetworkSettings"]["Ports"];
    let expected: Value = serde_json::json!({
        "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}],
        "81/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8081"}],
        "53/udp": [{"HostIp": "0.0.0.0", "HostPort": "5353"}],
    });
    assert_eq!(ports, &expected, "inspect c Ports");

    assert_eq!(
        policies(&v),
        BTreeSet::from([triple("a", "c", "deny"), triple("c", "b", "deny")]),
        "the policies touching c (and only those): {v}"
    );
    let va = inspect(&lab, "a");
    assert_eq!(
        policies(&va),
        BTreeSet::from([triple("a", "c", "deny"), triple("a", "b", "deny")])
    );
    assert_eq!(
        va["NetworkSettings"]["Ports"],
        serde_json::json!({}),
        "a publishes nothing: {va}"
    );

    // The readable form carries the same facts.
    let text = lab.md_ok(&["inspect", "c"]);
    for want in [
        format!("{ip}/16"),
        GATEWAY.to_string(),
        mac.clone(),
        veth.clone(),
        "8080".to_string(),
    ] {
        assert!(text.contains(&want), "inspect c lacks {want:?}:\n{text}");
    }

    let out = lab.md(&["inspect", "ghost", "--json"]);
    assert!(
        !out.status.success() && stderr_str(&out).contains("ghost"),
        "inspect of an unknown name must fail naming it\n{}",
        show_output(&out)
    );
}
