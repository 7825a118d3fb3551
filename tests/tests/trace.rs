//! `md-user trace` (issue 19): for every verdict the other e2e files produce with real traffic,
//! what `trace` predicts is compared with what a real packet does in the same lab: delivered
//! or not (curl, ping), the drop reason and the interface whose IF_STATS counter moved, the
//! translated address the peer saw. And a trace changes nothing live: `stats`, every pinned
//! map (trackers, counters, port hits, policy drops) and `monitor` stay as they were.
//!
//! Servers answer with the client address they saw (`peer_http.py`), so an answer also says
//! which translated source the real packet had.

use std::process::Output;
use std::time::Duration;

use md_tests::helpers::{assert_one_line_error, counter, fx, run_d, session_line, stats_row};
use md_tests::process::show_output;
use md_tests::{
    require_e2e, require_tools, stdout_str, wait_for, Lab, GATEWAY, HOST_UPLINK_IP, OUTSIDE_IP,
    UPLINK,
};
use serde_json::Value;

const HTTP: u16 = 80;
const PUBLISHED: u16 = 8080;
/// The HTTP server in the outside namespace (masquerade target).
const OUTSIDE_HTTP: u16 = 8000;
/// The line echo server outside (a long-lived session's far end).
const ECHO: u16 = 7000;

/// A connected UDP socket sends one datagram to HOST PORT and waits 2 s for an answer: exit 1
/// when the host refuses (ICMP port unreachable: ECONNREFUSED), 3 on silence, 0 on an answer.
const UDP_CONNECTED: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"probe")
try:
    s.recv(2048)
except ConnectionRefusedError:
    sys.exit(1)
except socket.timeout:
    sys.exit(3)
"#;

fn need_tools() {
    require_tools(&["python3", "curl", "ping", "ss", "bpftool", "sysctl"]);
}

/// `md-user trace FROM TO --json`, parsed.
#[track_caller]
fn trace(lab: &Lab, from: &str, to: &str) -> Value {
    let out = lab.md_ok(&["trace", from, to, "--json"]);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("trace {from} {to} --json is not JSON ({e}):\n{out}"))
}

/// An HTTP server in container `name` (extra `run` options in `opts`), listening.
#[track_caller]
fn serve(lab: &Lab, name: &str, opts: &[&str]) {
    let port = HTTP.to_string();
    run_d(lab, name, opts, &["python3", &fx("peer_http.py"), &port]);
    lab.wait_listening_in(name, "tcp", HTTP);
}

/// The HTTP server outside, on 192.0.2.2:8000.
#[track_caller]
fn outside_http(lab: &Lab) -> md_tests::Bg {
    let bg = lab.spawn_outside(&["python3", &fx("peer_http.py"), &OUTSIDE_HTTP.to_string()]);
    lab.wait_listening_outside("tcp", OUTSIDE_HTTP);
    bg
}

fn curl_args(url: &str) -> [&str; 5] {
    ["curl", "-sS", "--max-time", "2", url]
}

/// HTTP GET from container `from`: the client address the server saw, or the failed output.
fn get_from(lab: &Lab, from: &str, url: &str) -> Result<String, Output> {
    let out = lab.exec(from, &curl_args(url));
    if out.status.success() {
        Ok(stdout_str(&out).trim().to_string())
    } else {
        Err(out)
    }
}

#[track_caller]
fn seen_by_server(r: Result<String, Output>, what: &str) -> String {
    match r {
        Ok(s) => s,
        Err(out) => panic!("{what}: the real request failed\n{}", show_output(&out)),
    }
}

/// The real request timed out: dropped (curl exit 28), not refused.
#[track_caller]
fn really_dropped(r: Result<String, Output>, what: &str) {
    match r {
        Ok(seen) => panic!("{what}: trace says dropped, but the real request got {seen:?}"),
        Err(out) => assert_eq!(
            out.status.code(),
            Some(28),
            "{what}: the real request must time out (dropped)\n{}",
            show_output(&out)
        ),
    }
}

#[track_caller]
fn result(t: &Value) -> &str {
    t["verdict"]["result"].as_str().unwrap_or_default()
}

/// The trace says the request and its answer are delivered; returns the request as delivered.
#[track_caller]
fn predicts_delivered<'a>(t: &'a Value, what: &str) -> &'a Value {
    assert_eq!(result(t), "delivered", "{what}: trace predicts\n{t:#}");
    assert_eq!(t["request"]["end"]["result"], "delivered", "{what}\n{t:#}");
    assert_eq!(t["answer"]["end"]["result"], "delivered", "{what}\n{t:#}");
    &t["request"]["end"]["packet"]
}

/// The trace says the request is dropped for `reason`; returns the drop.
#[track_caller]
fn predicts_drop<'a>(t: &'a Value, reason: &str, what: &str) -> &'a Value {
    assert_eq!(result(t), "dropped", "{what}: trace predicts\n{t:#}");
    let end = &t["request"]["end"];
    assert_eq!(end["reason"], reason, "{what}\n{t:#}");
    assert_eq!(t["verdict"]["reason"], reason, "{what}\n{t:#}");
    assert!(
        t.get("answer").is_none(),
        "{what}: no answer to a dropped request\n{t:#}"
    );
    end
}

fn ip_part(addr: &Value) -> &str {
    addr.as_str()
        .and_then(|a| a.split(':').next())
        .unwrap_or_default()
}

/// The counters one hop of a trace moved, as "interface counter".
fn hop_counters(hop: &Value) -> Vec<String> {
    hop["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} {}",
                c["interface"].as_str().unwrap_or_default(),
                c["counter"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// Every counter any hop of the trace moved.
fn all_counters(t: &Value) -> Vec<String> {
    ["request", "answer"]
        .iter()
        .flat_map(|l| t[*l]["hops"].as_array().into_iter().flatten())
        .flat_map(hop_counters)
        .collect()
}

/// Sum of a container's counter in `stats --json` (`drops.policy`, `snat`, ...).
fn stat(s: &Value, name: &str, path: &str) -> u64 {
    counter(stats_row(s, name), path)
}

fn uplink_stat(s: &Value, path: &str) -> u64 {
    let up = s["uplinks"]
        .as_array()
        .and_then(|v| v.iter().find(|u| u["name"] == UPLINK))
        .unwrap_or_else(|| panic!("stats --json has no uplink {UPLINK}: {s}"));
    counter(up, path)
}

/// The drop counter the trace names moved in the real stats, on the same container.
#[track_caller]
fn drop_counted(lab: &Lab, drop: &Value, container: &str, before: &Value, what: &str) {
    let c = &drop["counter"];
    let reason = drop["reason"].as_str().unwrap_or_default();
    assert_eq!(c["counter"], format!("drops.{reason}"), "{what}: {drop:#}");
    assert_eq!(
        c["interface"].as_str(),
        Some(lab.host_veth_of(container).as_str()),
        "{what}: trace counts the drop on {container}'s veth: {drop:#}"
    );
    let path = format!("drops.{reason}");
    let after = lab.stats();
    assert!(
        stat(&after, container, &path) > stat(before, container, &path),
        "{what}: the real packet moved no {path} counter of {container}\nbefore {}\nafter {}",
        stats_row(before, container),
        stats_row(&after, container)
    );
}

#[test]
fn trace_predicts_allowed_policy_and_isolation_as_real_traffic() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("trace-verdicts");
    serve(&lab, "web", &[]);
    run_d(&lab, "a", &[], &["sleep", "600"]);
    lab.md_ok(&["network", "create", "n2"]);
    serve(&lab, "c", &["--network", "n2"]);
    let (a, web, c) = (lab.ip_of("a"), lab.ip_of("web"), lab.ip_of("c"));

    // Allowed: delivered with a's own address, and answered.
    let t = trace(&lab, "a", &format!("web:{HTTP}"));
    let got = predicts_delivered(&t, "a -> web");
    assert_eq!(ip_part(&got["src"]), a, "{t:#}");
    assert_eq!(got["dst"], format!("{web}:{HTTP}"), "{t:#}");
    assert_eq!(
        t["request"]["hops"][0]["program"], "md_veth_ingress",
        "{t:#}"
    );
    let before = lab.stats();
    let seen = seen_by_server(get_from(&lab, "a", &format!("http://{web}/")), "a -> web");
    assert_eq!(
        ip_part(&Value::from(seen.clone())),
        ip_part(&got["src"]),
        "server saw {seen}"
    );
    let after = lab.stats();
    for reason in ["policy", "network-isolation", "spoofed-source"] {
        let p = format!("drops.{reason}");
        assert_eq!(
            stat(&before, "a", &p),
            stat(&after, "a", &p),
            "allowed traffic dropped"
        );
    }
    let ping = lab.exec("a", &["ping", "-n", "-c", "1", "-W", "2", &web]);
    let t = trace(&lab, "a", "web");
    assert_eq!(t["to"], "web/icmp", "{t:#}");
    predicts_delivered(&t, "a -> web ping");
    assert!(ping.status.success(), "{}", show_output(&ping));

    // Policy: the rule named, the counter on a's veth, and the real request dropped.
    lab.md_ok(&["policy", "deny", "a", "web"]);
    let t = trace(&lab, "a", &format!("web:{HTTP}"));
    let drop = predicts_drop(&t, "policy", "a -> web denied");
    assert_eq!(drop["program"], "md_veth_ingress", "{t:#}");
    assert_eq!(drop["rule"]["from"], "a", "{t:#}");
    assert_eq!(drop["rule"]["to"], "web", "{t:#}");
    assert_eq!(drop["rule"]["verdict"], "deny", "{t:#}");
    let before = lab.stats();
    really_dropped(
        get_from(&lab, "a", &format!("http://{web}/")),
        "a -> web denied",
    );
    drop_counted(&lab, drop, "a", &before, "a -> web denied");
    // web -> a is not denied: the trace and a real request agree.
    let t = trace(&lab, "web", &format!("a:{HTTP}"));
    assert_ne!(result(&t), "dropped", "{t:#}");
    lab.md_ok(&["policy", "allow", "a", "web"]);
    let t = trace(&lab, "a", &format!("web:{HTTP}"));
    predicts_delivered(&t, "a -> web allowed again");
    seen_by_server(
        get_from(&lab, "a", &format!("http://{web}/")),
        "a -> web allowed again",
    );

    // Default deny without a rule: named as such.
    lab.md_ok(&["policy", "default", "deny"]);
    run_d(&lab, "b", &[], &["sleep", "600"]);
    let t = trace(&lab, "b", &format!("web:{HTTP}"));
    let drop = predicts_drop(&t, "policy", "b -> web under default deny");
    assert_eq!(drop["rule"]["verdict"], "default deny", "{t:#}");
    assert_eq!(drop["rule"]["from"], "b", "{t:#}");
    let before = lab.stats();
    really_dropped(
        get_from(&lab, "b", &format!("http://{web}/")),
        "b -> web default deny",
    );
    drop_counted(&lab, drop, "b", &before, "b -> web default deny");
    lab.md_ok(&["policy", "default", "allow"]);

    // Isolation: another network.
    let t = trace(&lab, "a", &format!("c:{HTTP}"));
    let drop = predicts_drop(&t, "network-isolation", "a -> c");
    assert_eq!(drop["ifindex"], t["request"]["hops"][0]["ifindex"], "{t:#}");
    assert!(
        drop["detail"].as_str().is_some_and(|d| d.contains("n2")),
        "{t:#}"
    );
    let before = lab.stats();
    really_dropped(get_from(&lab, "a", &format!("http://{c}/")), "a -> c");
    drop_counted(&lab, drop, "a", &before, "a -> c");
}

#[test]
fn trace_predicts_translations_in_the_redirect_datapath() {
    translations("redirect");
}

#[test]
fn trace_predicts_translations_in_the_stack_datapath() {
    translations("stack");
}

/// The programs a leg of a trace ran, in order.
fn programs(t: &Value, leg: &str) -> Vec<String> {
    t[leg]["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| h["program"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// DNAT from outside, masquerade, hairpin (to another container and to oneself), a host
/// process through 127.0.0.1, and unsolicited traffic, in datapath `mode`: what the peers see
/// is what the trace predicts, and the trace follows the mode's way (redirects past the
/// bridge, or the bridge and the host stack).
fn translations(mode: &str) {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new(&format!("trace-nat-{mode}"));
    let _outside = outside_http(&lab);
    let dp = format!("--datapath={mode}");
    serve(&lab, "web", &[&dp, "-p", &format!("{PUBLISHED}:{HTTP}")]);
    run_d(&lab, "a", &[], &["sleep", "600"]);
    assert_eq!(lab.stats()["datapath"], mode);
    let (a, web) = (lab.ip_of("a"), lab.ip_of("web"));
    let redirect = mode == "redirect";
    // DNAT from outside: the container sees the outside client; the answer leaves as the
    // published address.
    let url = format!("http://{HOST_UPLINK_IP}:{PUBLISHED}/");
    let t = trace(
        &lab,
        &format!("outside:{OUTSIDE_IP}"),
        &format!("{HOST_UPLINK_IP}:{PUBLISHED}"),
    );
    let got = predicts_delivered(&t, "outside -> published port");
    assert_eq!(got["dst"], format!("{web}:{HTTP}"), "{t:#}");
    assert_eq!(ip_part(&got["src"]), OUTSIDE_IP, "{t:#}");
    assert_eq!(
        t["answer"]["end"]["packet"]["src"],
        format!("{HOST_UPLINK_IP}:{PUBLISHED}"),
        "{t:#}"
    );
    let web_veth = lab.host_veth_of("web");
    assert!(
        all_counters(&t).contains(&format!("{web_veth} dnat")),
        "trace counts the DNAT on web's veth: {:?}",
        all_counters(&t)
    );
    // Redirect: straight from the uplink into web; stack: through the host to web's veth.
    assert_eq!(
        programs(&t, "request"),
        if redirect {
            vec!["md_uplink_ingress"]
        } else {
            vec!["md_uplink_ingress", "md_veth_egress"]
        },
        "{t:#}"
    );
    let redirected = all_counters(&t).contains(&format!("{web_veth} redirected"));
    assert_eq!(redirected, redirect, "{:?}", all_counters(&t));
    let before = lab.stats();
    let out = lab.outside(&curl_args(&url));
    assert!(out.status.success(), "{}", show_output(&out));
    let seen = stdout_str(&out).trim().to_string();
    assert_eq!(
        ip_part(&Value::from(seen.clone())),
        ip_part(&got["src"]),
        "web saw {seen}"
    );
    let after = lab.stats();
    assert!(stat(&after, "web", "dnat") > stat(&before, "web", "dnat"));
    assert_eq!(
        stat(&after, "web", "redirected") > stat(&before, "web", "redirected"),
        redirect,
        "the real packets were redirected as the trace says"
    );

    // Masquerade: the outside server sees the host's address and a port from md's NAT range,
    // as the trace's rewritten source.
    let t = trace(&lab, "a", &format!("outside:{OUTSIDE_IP}:{OUTSIDE_HTTP}"));
    let got = predicts_delivered(&t, "a -> outside");
    let hops = t["request"]["hops"].as_array().unwrap();
    let last = hops.last().unwrap();
    assert_eq!(last["program"], "md_uplink_egress", "{t:#}");
    assert_eq!(last["interface"], UPLINK, "{t:#}");
    assert!(
        last["rewritten"].as_array().is_some_and(|r| !r.is_empty()),
        "{t:#}"
    );
    let predicted_port: u16 = got["src"]
        .as_str()
        .and_then(|s| s.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {got}"));
    let a_veth = lab.host_veth_of("a");
    assert!(
        all_counters(&t).contains(&format!("{a_veth} snat")),
        "{:?}",
        all_counters(&t)
    );
    let before = lab.stats();
    let seen = seen_by_server(
        get_from(&lab, "a", &format!("http://{OUTSIDE_IP}:{OUTSIDE_HTTP}/")),
        "a -> outside",
    );
    let (seen_ip, seen_port) = seen.rsplit_once(':').unwrap();
    let seen_port: u16 = seen_port.parse().unwrap();
    assert_eq!(
        seen_ip,
        ip_part(&got["src"]),
        "outside saw {seen}, trace predicts {got}"
    );
    assert_eq!(seen_ip, HOST_UPLINK_IP);
    // The port is drawn at random in md's NAT range, by the trace as by the real flow.
    for p in [predicted_port, seen_port] {
        assert!(
            (61000..=65535).contains(&p),
            "{p} outside the NAT range: {seen} / {got}"
        );
    }
    assert!(stat(&lab.stats(), "a", "snat") > stat(&before, "a", "snat"));

    // Hairpin: a reaches web through the host address and keeps its own source...
    let t = trace(&lab, "a", &format!("{HOST_UPLINK_IP}:{PUBLISHED}"));
    let got = predicts_delivered(&t, "a -> published port (hairpin)");
    assert_eq!(t["request"]["hops"][0]["verdict"], "redirect", "{t:#}");
    // bpf_redirect_peer straight into web, or bpf_redirect to web's veth.
    assert_eq!(
        programs(&t, "request").len(),
        if redirect { 1 } else { 2 },
        "{t:#}"
    );
    assert_eq!(got["dst"], format!("{web}:{HTTP}"), "{t:#}");
    assert_eq!(
        t["answer"]["end"]["packet"]["src"],
        format!("{HOST_UPLINK_IP}:{PUBLISHED}"),
        "{t:#}"
    );
    let seen = seen_by_server(get_from(&lab, "a", &url), "a -> hairpin");
    assert_eq!(
        ip_part(&Value::from(seen.clone())),
        ip_part(&got["src"]),
        "web saw {seen}"
    );
    assert_eq!(ip_part(&got["src"]), a);
    // ...and web reaching its own published port comes from the gateway.
    let t = trace(&lab, "web", &format!("{HOST_UPLINK_IP}:{PUBLISHED}"));
    let got = predicts_delivered(&t, "web -> its own published port");
    let seen = seen_by_server(get_from(&lab, "web", &url), "web -> itself");
    assert_eq!(
        ip_part(&Value::from(seen.clone())),
        ip_part(&got["src"]),
        "web saw {seen}"
    );
    assert_eq!(ip_part(&got["src"]), GATEWAY);

    // A host process through 127.0.0.1 (md's socket programs): the container sees the gateway.
    let t = trace(&lab, "host", &format!("127.0.0.1:{PUBLISHED}"));
    let got = predicts_delivered(&t, "host -> 127.0.0.1 published");
    assert!(
        t["request"]["before"]
            .to_string()
            .contains("md_sock_connect4 (modelled"),
        "{t:#}"
    );
    let out = lab.host(&curl_args(&format!("http://127.0.0.1:{PUBLISHED}/")));
    assert!(out.status.success(), "{}", show_output(&out));
    assert_eq!(
        ip_part(&Value::from(stdout_str(&out).trim())),
        ip_part(&got["src"])
    );

    // Unsolicited: a route to the containers does not let the outside in.
    lab.outside_ok(&["ip", "route", "add", "172.18.0.0/16", "via", HOST_UPLINK_IP]);
    let t = trace(
        &lab,
        &format!("outside:{OUTSIDE_IP}"),
        &format!("web:{HTTP}"),
    );
    let drop = predicts_drop(&t, "unsolicited", "outside -> web directly");
    assert_eq!(drop["interface"], UPLINK, "{t:#}");
    assert_eq!(drop["counter"]["interface"], UPLINK, "{t:#}");
    let before = lab.stats();
    let out = lab.outside(&curl_args(&format!("http://{web}/")));
    assert_eq!(out.status.code(), Some(28), "{}", show_output(&out));
    assert!(
        uplink_stat(&lab.stats(), "drops.unsolicited") > uplink_stat(&before, "drops.unsolicited")
    );
}

/// What a trace must leave as it was: every pinned map md keeps state in (bpftool dumps:
/// trackers, per-CPU counters, port hits, policy drops, fragments, socket translations).
fn live_maps(lab: &Lab) -> Vec<(String, Vec<Value>)> {
    [
        "CONNTRACK",
        "CONNTRACK_NEW",
        "IF_STATS",
        "PORT_MAP",
        "POLICY",
        "FRAGS",
        "SOCK_REV",
        "ENDPOINTS",
        "CONFIG",
    ]
    .iter()
    .map(|m| (m.to_string(), lab.map_dump(m)))
    .collect()
}

/// Each map's entries before and after, the ones that differ shown by their BTF fields.
#[track_caller]
fn assert_same_maps(before: &[(String, Vec<Value>)], after: &[(String, Vec<Value>)]) {
    let mut diffs = Vec::new();
    for ((name, a), (_, b)) in before.iter().zip(after) {
        let shown = |v: &Vec<Value>, other: &Vec<Value>| -> Vec<String> {
            v.iter()
                .filter(|e| !other.contains(e))
                .map(|e| e.get("formatted").unwrap_or(e).to_string())
                .collect()
        };
        let (gone, new) = (shown(a, b), shown(b, a));
        if !gone.is_empty() || !new.is_empty() {
            diffs.push(format!("{name}:\n  before {gone:?}\n  after  {new:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "a trace changed live maps:\n{}",
        diffs.join("\n")
    );
}

/// `stats --json` without what changes by itself (expired entries collected).
fn stable_stats(lab: &Lab) -> Value {
    let mut s = lab.stats();
    s["conntrack"]["collected"] = Value::Null;
    s
}

#[test]
fn trace_changes_nothing_in_stats_maps_or_monitor() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("trace-readonly");
    // No IPv6 chatter (router solicitations) on the lab's links: the counters must stand still
    // on their own for the comparison to mean something.
    for ns in [lab.host_ns(), lab.outside_ns()] {
        lab.in_ns_ok(
            ns,
            &[
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
    }
    let _outside = outside_http(&lab);
    serve(&lab, "web", &["-p", &format!("{PUBLISHED}:{HTTP}")]);
    run_d(&lab, "a", &[], &["sleep", "600"]);
    let web = lab.ip_of("web");
    lab.md_ok(&["policy", "deny", "a", "web"]);
    // A live, idle, masqueraded session in the tracker (hours of lifetime), so a trace that
    // touched the live tracker would show.
    let _echo = lab.spawn_outside(&["python3", &fx("tcp_echo.py"), &ECHO.to_string()]);
    lab.wait_listening_outside("tcp", ECHO);
    let go = lab.dir().join("session-go");
    let go_s = go.to_string_lossy().into_owned();
    let mut session = lab.spawn_exec(
        "a",
        &[
            "python3",
            &fx("tcp_session.py"),
            OUTSIDE_IP,
            &ECHO.to_string(),
            "--go",
            &go_s,
        ],
    );
    session_line(&mut session, "echo one", "a's session");
    let mon = lab.spawn_md(&["monitor"]);
    wait_for("monitor listens", Duration::from_secs(20), || {
        mon.stderr()
            .contains("monitoring datapath events")
            .then_some(())
    });
    // Quiet first: two looks 6 s apart agree (neighbour entries used by the session are
    // probed with ARP up to 5 s after their last use; those frames count too).
    let (maps0, stats0) = wait_for("the datapath is quiet", Duration::from_secs(60), || {
        let (m, s) = (live_maps(&lab), stable_stats(&lab));
        std::thread::sleep(Duration::from_secs(6));
        (live_maps(&lab) == m && stable_stats(&lab) == s).then_some((m, s))
    });

    let traces: [(&str, String, &str); 6] = [
        ("a", format!("web:{HTTP}"), "dropped"),
        (
            "a",
            format!("outside:{OUTSIDE_IP}:{OUTSIDE_HTTP}"),
            "delivered",
        ),
        (
            "outside:192.0.2.2",
            format!("{HOST_UPLINK_IP}:{PUBLISHED}"),
            "delivered",
        ),
        ("web", format!("{HOST_UPLINK_IP}:{PUBLISHED}"), "delivered"),
        ("outside:192.0.2.2", format!("web:{HTTP}"), "dropped"),
        ("a", format!("{HOST_UPLINK_IP}:9999/udp"), "refused"),
    ];
    for (from, to, want) in &traces {
        let t = trace(&lab, from, to);
        assert_eq!(result(&t), *want, "trace {from} {to}\n{t:#}");
        assert_eq!(t["sandbox"]["private_copy"], true);
        // The copy ran programs that moved counters and made tracker entries: in the copy.
        assert!(
            !all_counters(&t).is_empty(),
            "trace {from} {to} moved no counter even in its copy\n{t:#}"
        );
    }
    let text = lab.md_ok(&["trace", "a", &format!("web:{HTTP}")]);
    assert!(text.contains("private copy"), "{text}");

    assert_same_maps(&maps0, &live_maps(&lab));
    assert_eq!(
        stable_stats(&lab),
        stats0,
        "a trace changed what stats shows"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        mon.stdout().trim().is_empty(),
        "monitor printed events while only traces ran:\n{}",
        mon.stdout()
    );
    // The monitor was listening all along: a real denied request shows at once.
    really_dropped(
        get_from(&lab, "a", &format!("http://{web}/")),
        "a -> web denied",
    );
    wait_for(
        "monitor shows the real drop",
        Duration::from_secs(15),
        || mon.stdout().contains("policy").then_some(()),
    );
    // The session still works after all those traces of the same hosts.
    std::fs::write(&go, "go").unwrap();
    session_line(&mut session, "echo two", "a's session after the traces");
}

#[test]
fn trace_names_why_a_cannot_reach_c() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("trace-why");
    serve(&lab, "web", &["-p", &format!("{PUBLISHED}:{HTTP}")]);
    run_d(&lab, "a", &[], &["sleep", "600"]);
    // --privileged: changing its own address needs CAP_NET_ADMIN inside.
    run_d(&lab, "rogue", &["--privileged"], &["sleep", "600"]);

    // Nothing published on that port: delivered to the host, which refuses.
    let t = trace(&lab, "a", &format!("{HOST_UPLINK_IP}:9999"));
    assert_eq!(result(&t), "refused", "{t:#}");
    assert_eq!(t["verdict"]["reason"], "no-published-port", "{t:#}");
    assert!(
        t["answer"]["end"]["packet"]["what"]
            .as_str()
            .is_some_and(|w| w.contains('R')),
        "the host answers with a RST\n{t:#}"
    );
    let out = lab.exec("a", &curl_args(&format!("http://{HOST_UPLINK_IP}:9999/")));
    assert_eq!(out.status.code(), Some(7), "refused\n{}", show_output(&out));
    let t = trace(&lab, "a", &format!("{HOST_UPLINK_IP}:9999/udp"));
    assert_eq!(t["verdict"]["reason"], "no-published-port", "{t:#}");
    let out = lab.exec(
        "a",
        &["python3", "-c", UDP_CONNECTED, HOST_UPLINK_IP, "9999"],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "ECONNREFUSED\n{}",
        show_output(&out)
    );
    // The same port published: reached.
    let t = trace(&lab, "a", &format!("{HOST_UPLINK_IP}:{PUBLISHED}"));
    assert_eq!(result(&t), "delivered", "{t:#}");

    // Spoofing: rogue takes an address md did not give it; the trace sends what rogue would
    // send (read from its namespace) and names the drop, as the real packets meet it.
    let rogue_ip = lab.ip_of("rogue");
    lab.exec_ok("rogue", &["ip", "addr", "flush", "dev", "eth0"]);
    lab.exec_ok(
        "rogue",
        &["ip", "addr", "add", "172.18.200.9/16", "dev", "eth0"],
    );
    lab.exec_ok("rogue", &["ip", "route", "add", "default", "via", GATEWAY]);
    let t = trace(
        &lab,
        "rogue",
        &format!("outside:{OUTSIDE_IP}:{OUTSIDE_HTTP}"),
    );
    let drop = predicts_drop(&t, "spoofed-source", "rogue with a forged address");
    assert!(
        drop["detail"]
            .as_str()
            .is_some_and(|d| d.contains("172.18.200.9")),
        "{t:#}"
    );
    assert_ne!(rogue_ip, "172.18.200.9");
    let before = lab.stats();
    let out = lab.exec("rogue", &["ping", "-n", "-c", "1", "-W", "1", OUTSIDE_IP]);
    assert!(!out.status.success(), "{}", show_output(&out));
    drop_counted(&lab, drop, "rogue", &before, "rogue's forged packets");

    // From outside through a forged md address.
    let t = trace(
        &lab,
        "outside:172.18.0.77",
        &format!("{HOST_UPLINK_IP}:{PUBLISHED}"),
    );
    let drop = predicts_drop(&t, "spoofed-source", "outside claiming an md address");
    assert_eq!(drop["interface"], UPLINK, "{t:#}");

    // NAT ports exhausted: md's NAT range narrowed to two ports (CONFIG, written with
    // bpftool), both held by live sessions to the same server; a third flow there has none.
    let _echo = lab.spawn_outside(&["python3", &fx("tcp_echo.py"), &ECHO.to_string()]);
    lab.wait_listening_outside("tcp", ECHO);
    set_nat_range(&lab, 61000, 61001);
    let go = lab.dir().join("sessions-go");
    let go_s = go.to_string_lossy().into_owned();
    let mut sessions: Vec<md_tests::Bg> = (0..2)
        .map(|_| {
            lab.spawn_exec(
                "a",
                &[
                    "python3",
                    &fx("tcp_session.py"),
                    OUTSIDE_IP,
                    &ECHO.to_string(),
                    "--go",
                    &go_s,
                ],
            )
        })
        .collect();
    for s in &mut sessions {
        let peer = session_line(s, "peer", "a's session");
        assert!(
            peer.ends_with(":61000") || peer.ends_with(":61001"),
            "{peer}"
        );
    }
    let t = trace(&lab, "a", &format!("outside:{OUTSIDE_IP}:{ECHO}"));
    let drop = predicts_drop(&t, "nat-ports-exhausted", "a third flow to the same server");
    assert_eq!(drop["program"], "md_uplink_egress", "{t:#}");
    assert_eq!(drop["counter"]["interface"], UPLINK, "{t:#}");
    assert!(
        drop["detail"]
            .as_str()
            .is_some_and(|d| d.contains("61000-61001")),
        "{t:#}"
    );
    let before = lab.stats();
    let out = lab.exec("a", &curl_args(&format!("http://{OUTSIDE_IP}:{ECHO}/")));
    assert_eq!(
        out.status.code(),
        Some(28),
        "dropped\n{}",
        show_output(&out)
    );
    let path = "drops.nat-ports-exhausted";
    assert!(uplink_stat(&lab.stats(), path) > uplink_stat(&before, path));
    // Another server still has free ports: reached.
    let t = trace(&lab, "a", &format!("outside:{OUTSIDE_IP}:9"));
    assert_ne!(t["verdict"]["reason"], "nat-ports-exhausted", "{t:#}");
    std::fs::write(&go, "go").unwrap();
}

/// Narrows md's NAT port range in the live CONFIG map (bytes 16..20 of `Config`: nat_port_min,
/// nat_port_max, little-endian).
#[track_caller]
fn set_nat_range(lab: &Lab, min: u16, max: u16) {
    let entry = lab.map_dump("CONFIG").pop().expect("CONFIG has its slot");
    let mut value: Vec<u8> = entry["value"]
        .as_array()
        .expect("CONFIG value bytes")
        .iter()
        .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect();
    value[16..18].copy_from_slice(&min.to_le_bytes());
    value[18..20].copy_from_slice(&max.to_le_bytes());
    let pin = lab.pin_dir().join("maps/CONFIG");
    let mut args = vec![
        "bpftool".to_string(),
        "map".into(),
        "update".into(),
        "pinned".into(),
        pin.to_string_lossy().into_owned(),
        "key".into(),
    ];
    args.extend(["0", "0", "0", "0"].map(String::from));
    args.push("value".into());
    args.extend(value.iter().map(|b| b.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "{}", show_output(&out));
    let cfg = &lab.map_dump("CONFIG")[0]["formatted"]["value"];
    assert_eq!(
        (cfg["nat_port_min"].as_u64(), cfg["nat_port_max"].as_u64()),
        (Some(min as u64), Some(max as u64))
    );
}

#[test]
fn trace_refuses_bad_input_with_one_line() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("trace-input");
    run_d(&lab, "a", &[], &["sleep", "600"]);
    let pins = lab.pin_entries();
    for (args, want) in [
        (vec!["trace", "a", "nosuch:80"], "no such container: nosuch"),
        (vec!["trace", "nosuch", "a:80"], "no such container: nosuch"),
        (vec!["trace", "a", "a:80/sctp"], "unknown protocol"),
        (vec!["trace", "a", "a:0"], "is not a port"),
        (vec!["trace", "a", "a/tcp"], "needs a port"),
        (vec!["trace", "a", "outside:1.2.3"], "not an IPv4 address"),
        (vec!["trace", "a:80", "a"], "only as a published"),
        (
            vec!["trace", "192.0.2.1:4444", "a:80"],
            "no port published on 192.0.2.1:4444/tcp",
        ),
        (vec!["trace", "a"], "required"),
    ] {
        let out = lab.md(&args);
        let err = assert_one_line_error(&out, &args.join(" "));
        assert!(err.contains(want), "{}: {err}", args.join(" "));
    }
    assert_eq!(lab.pin_entries(), pins);
}

/// On a host with a second Ethernet uplink and a layer-3 VPN device: masquerade out of each,
/// and a published port reached through the VPN, as their servers and clients see it. The
/// VPN's programs are layer-3 ones, run as their Ethernet twins.
#[test]
fn trace_follows_the_hosts_routing_to_every_uplink() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let (lab, o2, vpn) = Lab::real_host("trace-uplinks");
    let mut servers = Vec::new();
    for ns in [o2.ns.as_str(), vpn.ns.as_str()] {
        servers.push(lab.spawn_in_ns(
            ns,
            &["python3", &fx("peer_http.py"), &OUTSIDE_HTTP.to_string()],
        ));
        lab.wait_listening_ns(ns, "tcp", OUTSIDE_HTTP);
    }
    serve(&lab, "web", &["-p", &format!("{PUBLISHED}:{HTTP}")]);
    run_d(&lab, "a", &[], &["sleep", "600"]);
    for (seg, program) in [(&o2, "md_uplink_egress"), (&vpn, "md_l3_egress")] {
        let t = trace(
            &lab,
            "a",
            &format!("outside:{}:{OUTSIDE_HTTP}", seg.peer_ip),
        );
        let got = predicts_delivered(&t, &seg.host_if);
        let hops = t["request"]["hops"].as_array().unwrap();
        let last = hops.last().unwrap();
        assert_eq!(last["interface"], seg.host_if.as_str(), "{t:#}");
        assert_eq!(last["program"], program, "{t:#}");
        if program == "md_l3_egress" {
            assert_eq!(last["ran_as"], "md_uplink_egress", "{t:#}");
        }
        let seen = seen_by_server(
            get_from(
                &lab,
                "a",
                &format!("http://{}:{OUTSIDE_HTTP}/", seg.peer_ip),
            ),
            &seg.host_if,
        );
        assert_eq!(
            ip_part(&Value::from(seen.clone())),
            ip_part(&got["src"]),
            "{seen}"
        );
        assert_eq!(ip_part(&got["src"]), seg.host_ip, "{t:#}");
    }
    // A client behind the VPN reaches the published port on the host's VPN address.
    let t = trace(
        &lab,
        &format!("outside:{}", vpn.peer_ip),
        &format!("{}:{PUBLISHED}", vpn.host_ip),
    );
    let got = predicts_delivered(&t, "VPN client -> published port");
    assert_eq!(t["request"]["hops"][0]["program"], "md_l3_ingress", "{t:#}");
    assert_eq!(
        t["request"]["hops"][0]["ran_as"], "md_uplink_ingress",
        "{t:#}"
    );
    if t["request"]["hops"][0]["verdict"] == "redirect" {
        // The twin can redirect where the layer-3 program leaves the packet to the stack:
        // the trace says so.
        assert!(
            t["verdict"]["warnings"]
                .to_string()
                .contains("md_l3_ingress on tun0 ran as"),
            "{t:#}"
        );
    }
    assert_eq!(
        t["request"]["hops"][0]["interface"],
        vpn.host_if.as_str(),
        "{t:#}"
    );
    let out = lab.in_ns(
        &vpn.ns,
        &curl_args(&format!("http://{}:{PUBLISHED}/", vpn.host_ip)),
    );
    assert!(out.status.success(), "{}", show_output(&out));
    assert_eq!(
        ip_part(&Value::from(stdout_str(&out).trim())),
        ip_part(&got["src"])
    );
    assert_eq!(ip_part(&got["src"]), vpn.peer_ip);
}
