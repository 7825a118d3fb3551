//! Multi-host networks (issue 17): overlay networks across three md hosts coordinated through a
//! real etcd (Debian's etcd-server) in a namespace of its own (tests/src/multihost.rs).
//!
//! Every container runs an HTTP server that answers with the client address it saw
//! (`peer_http.py`) and a UDP one that does the same (`peer_udp.py`), so each answer proves
//! both that the packet arrived and that it arrived untranslated from the sending container.
//! Container names avoid single letters (`dig` would read them as record types).

use std::time::Duration;

use md_tests::helpers::{assert_one_line_error, fx, run_args};
use md_tests::multihost::{underlay_ip, Cluster, STORE};
use md_tests::process::show_output;
use md_tests::{require_e2e, stdout_str, wait_until, Lab, HOST_UPLINK_IP, OUTSIDE_IP};
use serde_json::Value;

const HTTP: &str = "80";
const UDP: &str = "7000";

/// Starts `name` on host `i`, network `net`, serving HTTP on 80 and UDP on 7000.
fn serve(c: &Cluster, i: usize, name: &str, net: &str, extra: &[&str]) {
    let script = format!(
        "python3 {} {UDP} & exec python3 {} {HTTP}",
        fx("peer_udp.py"),
        fx("peer_http.py")
    );
    let mut opts = vec!["--network", net];
    opts.extend_from_slice(extra);
    c.md_ok(i, &run_args(name, &opts, &["sh", "-c", &script]));
    c.host(i).wait_listening_in(name, "tcp", 80);
    c.host(i).wait_listening_in(name, "udp", 7000);
}

fn ip_of(c: &Cluster, i: usize, name: &str) -> String {
    c.host(i).ip_of(name)
}

/// `curl http://TARGET/` from `from` on host `i`: the body (the client address the server
/// saw), or None when it fails.
fn http(c: &Cluster, i: usize, from: &str, target: &str) -> Option<String> {
    let url = format!("http://{target}/");
    let out = c
        .host(i)
        .exec(from, &["curl", "-s", "--max-time", "4", &url]);
    out.status.success().then(|| stdout_str(&out))
}

fn udp(c: &Cluster, i: usize, from: &str, target: &str) -> Option<String> {
    let out = c
        .host(i)
        .exec(from, &["python3", &fx("udp_ask.py"), target, UDP]);
    out.status.success().then(|| stdout_str(&out))
}

fn ping(c: &Cluster, i: usize, from: &str, target: &str, extra: &[&str]) -> bool {
    let mut a = vec!["ping", "-c", "1", "-W", "2"];
    a.extend_from_slice(extra);
    a.push(target);
    c.host(i).exec(from, &a).status.success()
}

/// The client address a peer saw, without the port.
fn seen_ip(answer: &str) -> &str {
    answer.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(answer)
}

fn networks(c: &Cluster, i: usize) -> Vec<Value> {
    let out = c.md_ok(i, &["network", "ls", "--json"]);
    serde_json::from_str::<Value>(&out)
        .expect("network ls --json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn network(c: &Cluster, i: usize, name: &str) -> Option<Value> {
    networks(c, i)
        .into_iter()
        .find(|n| n["name"].as_str() == Some(name))
}

fn remote_names(c: &Cluster, i: usize, net: &str) -> Vec<String> {
    network(c, i, net)
        .and_then(|n| n["remote"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

/// Host `i`'s REMOTE map: each entry's address and BTF-formatted value.
fn remote_entries(c: &Cluster, i: usize) -> Vec<(String, Value)> {
    c.host(i)
        .map_dump("REMOTE")
        .iter()
        .map(|e| {
            let f = &e["formatted"];
            let k = f["key"]
                .as_array()
                .unwrap_or_else(|| panic!("REMOTE entry without a formatted key: {e}"));
            let o: Vec<String> = k
                .iter()
                .map(|b| b.as_u64().expect("key byte").to_string())
                .collect();
            (o.join("."), f["value"].clone())
        })
        .collect()
}

/// Addresses in host `i`'s REMOTE map.
fn remote_map(c: &Cluster, i: usize) -> Vec<String> {
    remote_entries(c, i).into_iter().map(|(a, _)| a).collect()
}

fn in_subnet(ip: &str, net: &str, prefix: u32) -> bool {
    let a: std::net::Ipv4Addr = ip.parse().expect("ip");
    let n: std::net::Ipv4Addr = net.parse().expect("net");
    let mask = u32::MAX << (32 - prefix);
    u32::from(a) & mask == u32::from(n) & mask
}

/// The drops counted on rule FROM → TO on host `i`.
fn rule_drops(c: &Cluster, i: usize, from: &str, to: &str) -> u64 {
    let out = c.md_ok(i, &["policy", "list", "--json"]);
    let v: Value = serde_json::from_str(&out).expect("policy list --json");
    v["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["from"].as_str() == Some(from) && r["to"].as_str() == Some(to))
        .and_then(|r| r["drops"].as_u64())
        .unwrap_or_else(|| panic!("no rule {from} -> {to} on host {i}: {v}"))
}

#[test]
fn overlay_tunnel_across_three_hosts() {
    if !require_e2e() {
        return;
    }
    let c = Cluster::new("ov-tunnel", 15);
    // The first host names the store on the command line, the others through MD_STORE.
    c.md_ok(
        0,
        &[
            "network",
            "create",
            "ov",
            "--driver",
            "overlay",
            "--store",
            STORE,
            "--subnet",
            "172.30.0.0/16",
        ],
    );
    // The others join it: the subnet and mode come from the store.
    for i in 1..3 {
        c.md_ok(i, &["network", "create", "ov", "--driver", "overlay"]);
    }
    let mut blocks = Vec::new();
    for i in 0..3 {
        let n = network(&c, i, "ov").expect("ov listed");
        assert_eq!(n["driver"], "overlay", "{n}");
        assert_eq!(n["subnet"], "172.30.0.0/16", "{n}");
        assert_eq!(n["mode"], "tunnel", "{n}");
        // The underlay's 1500 less VXLAN's 50.
        assert_eq!(n["mtu"], 1450, "{n}");
        blocks.push(n["block"].as_str().expect("block").to_string());
    }
    blocks.sort();
    blocks.dedup();
    assert_eq!(
        blocks.len(),
        3,
        "every host leased its own block: {blocks:?}"
    );
    assert_eq!(c.store_keys("/md/blocks/ov/").len(), 3);
    // `network inspect` (Docker's form) says what it is: the whole subnet, this host's block
    // as the range it allocates from, the overlay's MTU.
    let out = c.md_ok(0, &["network", "inspect", "ov", "--json"]);
    let v: Value = serde_json::from_str(&out).expect("network inspect --json");
    let n = &v[0];
    assert_eq!(n["Driver"], "overlay", "{n}");
    assert_eq!(n["IPAM"]["Config"][0]["Subnet"], "172.30.0.0/16", "{n}");
    let block0 = network(&c, 0, "ov").expect("ov")["block"].clone();
    assert_eq!(n["IPAM"]["Config"][0]["IPRange"], block0, "{n}");
    assert_eq!(n["Options"]["com.docker.network.driver.mtu"], "1450", "{n}");

    let names = ["alpha", "bravo", "charlie"];
    for (i, n) in names.iter().enumerate() {
        serve(&c, i, n, "ov", &[]);
    }
    let ips: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| ip_of(&c, i, n))
        .collect();
    for (i, ip) in ips.iter().enumerate() {
        let block = network(&c, i, "ov").unwrap()["block"]
            .as_str()
            .unwrap()
            .to_string();
        let (net, len) = block.split_once('/').unwrap();
        assert!(
            in_subnet(ip, net, len.parse().unwrap()),
            "{ip} is in host {i}'s block {block}"
        );
    }
    // Every host hears of the others' containers.
    for i in 0..3 {
        wait_until(
            &format!("host {i} knows the other hosts' containers"),
            Duration::from_secs(15),
            || remote_names(&c, i, "ov").len() == 2,
        );
    }
    // One identity per name on every host: the store's, in the VNI's range above the per-host
    // ones, and what each other host's REMOTE entry for that address carries.
    for (i, (n, ip)) in names.iter().zip(&ips).enumerate() {
        let key = format!("/md/identities/{n}");
        let out = c.etcdctl(&["get", "--print-value-only", &key]);
        let id: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}: {}", show_output(&out)));
        assert!((1 << 20..1 << 24).contains(&id), "{n}: identity {id}");
        for j in (0..3).filter(|&j| j != i) {
            let entry = remote_entries(&c, j)
                .into_iter()
                .find(|(a, _)| a == ip)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("host {j} has no REMOTE entry for {n} ({ip})"));
            assert_eq!(
                entry["identity"].as_u64(),
                Some(id),
                "host {j}'s REMOTE entry for {n}: {entry}"
            );
        }
    }
    let rec =
        String::from_utf8_lossy(&c.etcdctl(&["get", "/md/containers/bravo"]).stdout).into_owned();
    assert!(
        rec.contains(&ips[1]) && rec.contains(&underlay_ip(1)),
        "bravo registered with its address and host: {rec}"
    );

    // TCP by name through each host's resolver, untranslated.
    assert_eq!(
        http(&c, 0, "alpha", "bravo").as_deref().map(seen_ip),
        Some(ips[0].as_str())
    );
    assert_eq!(
        http(&c, 1, "bravo", "charlie").as_deref().map(seen_ip),
        Some(ips[1].as_str())
    );
    assert_eq!(
        http(&c, 2, "charlie", "alpha").as_deref().map(seen_ip),
        Some(ips[2].as_str())
    );
    // A remote container's address names it back (PTR, `NAME.NETWORK.` as Docker answers).
    let ptr = c.host(0).exec_ok(
        "alpha",
        &["dig", "+short", "+time=2", "+tries=2", "-x", &ips[1]],
    );
    assert_eq!(
        ptr.trim(),
        "bravo.ov.",
        "PTR of bravo's address from host 0"
    );
    // UDP and ICMP.
    assert_eq!(
        udp(&c, 1, "bravo", "charlie").as_deref().map(seen_ip),
        Some(ips[1].as_str())
    );
    assert!(ping(&c, 2, "charlie", "alpha", &[]), "ping across hosts");
    // MTU: the container's interface has the underlay's less the encapsulation, and a full
    // packet of it crosses (1422 + 28 = 1450) with DF set; one byte more does not leave.
    let link = c
        .host(0)
        .exec_ok("alpha", &["ip", "-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1450"), "{link}");
    assert!(ping(&c, 0, "alpha", &ips[1], &["-M", "do", "-s", "1422"]));
    assert!(!ping(&c, 0, "alpha", &ips[1], &["-M", "do", "-s", "1423"]));

    // Policy at the receiver: the rule is on charlie's host only, alpha's identity travels in
    // the VNI. alpha cannot open connections to charlie; charlie still reaches alpha (and its
    // answers come back), bravo still reaches charlie.
    c.md_ok(2, &["policy", "deny", "alpha", "charlie"]);
    assert_eq!(
        http(&c, 0, "alpha", "charlie"),
        None,
        "denied at charlie's host"
    );
    assert_eq!(udp(&c, 0, "alpha", "charlie"), None);
    assert!(
        rule_drops(&c, 2, "alpha", "charlie") > 0,
        "dropped by the rule"
    );
    assert!(
        http(&c, 2, "charlie", "alpha").is_some(),
        "the other way is open"
    );
    assert!(
        http(&c, 1, "bravo", "charlie").is_some(),
        "others unaffected"
    );
    // Policy at the sender: bravo → alpha denied on bravo's host.
    c.md_ok(1, &["policy", "deny", "bravo", "alpha"]);
    assert_eq!(
        http(&c, 1, "bravo", "alpha"),
        None,
        "denied at bravo's host"
    );
    assert!(rule_drops(&c, 1, "bravo", "alpha") > 0);
    assert!(
        http(&c, 0, "alpha", "bravo").is_some(),
        "answers still pass"
    );
    c.md_ok(2, &["policy", "allow", "alpha", "charlie"]);
    assert!(http(&c, 0, "alpha", "charlie").is_some(), "lifted");

    // Isolation across hosts: another overlay's container cannot reach this one's.
    for i in 0..2 {
        c.md_ok(
            i,
            &[
                "network",
                "create",
                "ov2",
                "--driver",
                "overlay",
                "--subnet",
                "172.31.0.0/16",
            ],
        );
    }
    serve(&c, 0, "delta", "ov2", &[]);
    serve(&c, 1, "echo", "ov2", &[]);
    let echo = ip_of(&c, 1, "echo");
    wait_until("delta's host knows echo", Duration::from_secs(15), || {
        remote_names(&c, 0, "ov2") == ["echo"]
    });
    assert!(http(&c, 0, "delta", &echo).is_some(), "same overlay");
    assert_eq!(http(&c, 0, "delta", &ips[1]), None, "another overlay");
    assert!(!ping(&c, 0, "delta", &ips[1], &[]));
    assert_eq!(http(&c, 0, "delta", "bravo"), None, "not even its name");

    // Masquerade leaves from the container's own host: alpha reaches the outside of host 0
    // (a namespace only host 0 is connected to) as host 0's uplink address.
    let _srv = c
        .host(0)
        .spawn_outside(&["python3", &fx("peer_http.py"), "8000"]);
    c.host(0).wait_listening_outside("tcp", 8000);
    let out = http(&c, 0, "alpha", &format!("{OUTSIDE_IP}:8000")).expect("outside");
    assert_eq!(seen_ip(&out), HOST_UPLINK_IP);
    // A published port of host 1 reaches its container there.
    serve(&c, 1, "foxtrot", "ov", &["-p", "8080:80"]);
    let url = format!("http://{HOST_UPLINK_IP}:8080/");
    let got = c
        .host(1)
        .outside_ok(&["curl", "-s", "--max-time", "4", &url]);
    assert_eq!(seen_ip(got.trim()), OUTSIDE_IP);

    // A container that stops leaves the other hosts' names and maps.
    assert!(
        remote_map(&c, 0).contains(&ips[1]),
        "bravo in host 0's REMOTE"
    );
    c.md_ok(1, &["stop", "-t", "1", "bravo"]);
    wait_until("bravo leaves host 0", Duration::from_secs(15), || {
        !remote_names(&c, 0, "ov").contains(&"bravo".to_string())
            && !remote_map(&c, 0).contains(&ips[1])
    });
    assert_eq!(http(&c, 0, "alpha", "bravo"), None);
    assert!(c.store_keys("/md/containers/bravo").is_empty());
    leave_cleanly(&c);
}

/// `down` on every host succeeds (a stale MD_SUBNETS entry of the overlay made it fail), and
/// each host's registrations leave the store at once, well within the 15 s TTL: `down`
/// revokes the lease. A second `down` finds nothing to do.
fn leave_cleanly(c: &Cluster) {
    for i in 0..3 {
        c.md_ok(i, &["down"]);
        assert_eq!(c.store_keys("/md/hosts/").len(), 2 - i, "host {i} left");
    }
    assert!(c.store_keys("/md/containers/").is_empty());
    assert!(c.store_keys("/md/blocks/").is_empty());
    c.md_ok(0, &["down"]);
}

#[test]
fn overlay_native_routing_across_hosts() {
    if !require_e2e() {
        return;
    }
    let c = Cluster::new("ov-native", 15);
    for i in 0..3 {
        // The stack datapath here (the tunnel test runs the redirect one).
        c.md_ok(
            i,
            &[
                "--datapath",
                "stack",
                "network",
                "create",
                "nat",
                "--driver",
                "overlay",
                "--mode",
                "native",
                "--subnet",
                "172.29.0.0/16",
            ],
        );
    }
    let n = network(&c, 0, "nat").unwrap();
    assert_eq!(n["mode"], "native", "{n}");
    assert_eq!(n["mtu"], 1500, "no encapsulation: the underlay's MTU");
    let names = ["golf", "hotel", "india"];
    for (i, n) in names.iter().enumerate() {
        serve(&c, i, n, "nat", &[]);
    }
    let ips: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| ip_of(&c, i, n))
        .collect();
    for i in 0..3 {
        wait_until(
            &format!("host {i} routes to the other blocks"),
            Duration::from_secs(15),
            || {
                let routes = c.host(i).host_ok(&["ip", "route"]);
                (0..3)
                    .filter(|j| *j != i)
                    .all(|j| routes.contains(&format!("via {} dev ul0 proto 77", underlay_ip(j))))
                    && remote_names(&c, i, "nat").len() == 2
            },
        );
    }
    let routes = c.host(0).host_ok(&["ip", "route"]);
    assert!(routes.contains("unreachable 172.29.0.0/16"), "{routes}");
    assert!(c
        .host(0)
        .host_ok(&["ip", "link"])
        .lines()
        .all(|l| !l.contains("mdvx0")));
    assert_eq!(
        http(&c, 0, "golf", "hotel").as_deref().map(seen_ip),
        Some(ips[0].as_str())
    );
    assert_eq!(
        udp(&c, 1, "hotel", "india").as_deref().map(seen_ip),
        Some(ips[1].as_str())
    );
    assert!(ping(&c, 2, "india", "golf", &[]));
    // Policy at the receiver, with the sender's identity from the registry.
    c.md_ok(2, &["policy", "deny", "golf", "india"]);
    assert_eq!(http(&c, 0, "golf", "india"), None);
    assert!(rule_drops(&c, 2, "golf", "india") > 0);
    assert!(http(&c, 2, "india", "golf").is_some());
    assert!(http(&c, 1, "hotel", "india").is_some());
    // Not masqueraded on the way: the underlay carries container addresses (tcpdump on
    // host 1's ul0 sees golf's own address as the source).
    let mut dump = c.host(1).spawn_host(&[
        "tcpdump", "-l", "-n", "-c", "1", "-i", "ul0", "tcp", "and", "dst", "port", "80",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(http(&c, 0, "golf", "hotel").is_some());
    wait_until("tcpdump saw the packet", Duration::from_secs(10), || {
        dump.try_status().is_some()
    });
    let seen = dump.stdout();
    assert!(
        seen.contains(&format!("{}.", ips[0])) && seen.contains(&format!("> {}.80", ips[1])),
        "{seen}"
    );
    leave_cleanly(&c);
}

#[test]
fn overlay_host_death_and_store_outage() {
    if !require_e2e() {
        return;
    }
    // A short TTL: a dead host's registrations are gone within 3 s.
    let c = Cluster::new("ov-fail", 3);
    // Two /28 blocks only: the third host gets one when a holder's lease is gone.
    let create = [
        "network",
        "create",
        "ov",
        "--driver",
        "overlay",
        "--subnet",
        "172.28.0.0/27",
    ];
    c.md_ok(0, &create);
    c.md_ok(1, &create);
    let out = c.md(2, &create);
    let err = assert_one_line_error(&out, "a third host with no block left");
    assert!(err.contains("no free /28 block"), "{err}");
    assert!(network(&c, 2, "ov").is_none(), "nothing left behind");
    serve(&c, 0, "kilo", "ov", &[]);
    serve(&c, 1, "lima", "ov", &[]);
    let kilo = ip_of(&c, 0, "kilo");
    wait_until("lima's host knows kilo", Duration::from_secs(15), || {
        remote_names(&c, 1, "ov") == ["kilo"]
    });
    assert_eq!(
        http(&c, 1, "lima", "kilo").as_deref().map(seen_ip),
        Some(ip_of(&c, 1, "lima").as_str())
    );

    // Host 0 dies. Its block is not reused before its lease expires...
    assert!(remote_map(&c, 1).contains(&kilo), "kilo in host 1's REMOTE");
    c.kill_host(0);
    let out = c.md(2, &create);
    assert_one_line_error(&out, "the dead host's block is still leased");
    // ... and within the TTL (and a watch round) its container leaves host 1's maps and names.
    wait_until("kilo leaves host 1", Duration::from_secs(10), || {
        remote_names(&c, 1, "ov").is_empty() && !remote_map(&c, 1).contains(&kilo)
    });
    assert_eq!(http(&c, 1, "lima", "kilo"), None, "its name is gone");
    assert!(c.store_keys("/md/containers/kilo").is_empty());
    // Now the block is free again: host 2 takes it.
    c.md_ok(2, &create);
    let n = network(&c, 2, "ov").unwrap();
    assert_eq!(n["block"], "172.28.0.0/28", "host 0's block: {n}");
    serve(&c, 2, "mike", "ov", &[]);
    let mike = ip_of(&c, 2, "mike");
    assert!(
        in_subnet(&mike, "172.28.0.0", 28),
        "{mike} is in the reused block"
    );
    wait_until("lima's host knows mike", Duration::from_secs(15), || {
        remote_names(&c, 1, "ov") == ["mike"]
    });
    assert!(http(&c, 1, "lima", "mike").is_some());

    // etcd goes away: what runs keeps running (names, traffic), longer than the TTL.
    c.stop_etcd();
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        http(&c, 1, "lima", "mike").is_some(),
        "traffic and names go on"
    );
    assert!(udp(&c, 2, "mike", "lima").is_some());
    assert_eq!(remote_names(&c, 1, "ov"), ["mike"]);
    // Commands that need the store say so, and leave nothing.
    let before = c.host(1).ps_names();
    let out = c.md(
        1,
        &run_args("november", &["--network", "ov"], &["sleep", "60"]),
    );
    let err = assert_one_line_error(&out, "run on an overlay with the store down");
    assert!(
        err.contains("the store etcd://198.51.100.2:2379 is down or unreachable"),
        "{err}"
    );
    assert_eq!(c.host(1).ps_names(), before, "no container left");
    let out = c.md(
        1,
        &[
            "network",
            "create",
            "ov9",
            "--driver",
            "overlay",
            "--subnet",
            "172.27.0.0/24",
        ],
    );
    let err = assert_one_line_error(&out, "network create with the store down");
    assert!(err.contains("is down or unreachable"), "{err}");
    assert!(network(&c, 1, "ov9").is_none());
    let out = c.md(1, &["network", "ls"]);
    let warn = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && warn.contains("the store etcd://198.51.100.2:2379 is down"),
        "{}",
        show_output(&out)
    );
    // A container on a host-local network still starts; that command, and one that only
    // reads, say the store is down too (after their own output, on stderr).
    let down = "warning: the store etcd://198.51.100.2:2379 is down";
    for args in [
        run_args("oscar", &[], &["sleep", "60"]),
        vec!["inspect", "oscar"],
    ] {
        let out = c.md(1, &args);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stderr).contains(down),
            "md-user {}: {}",
            args.join(" "),
            show_output(&out)
        );
    }

    // etcd comes back on the same data: nothing was lost, and new registrations work.
    c.start_etcd();
    let keys = c.store_keys("/md/containers/");
    assert!(
        keys.contains(&"/md/containers/lima".to_string())
            && keys.contains(&"/md/containers/mike".to_string()),
        "{keys:?}"
    );
    wait_until(
        "host 1 sees the store back",
        Duration::from_secs(15),
        || c.md(1, &["network", "ls"]).stderr.is_empty(),
    );
    serve(&c, 1, "papa", "ov", &[]);
    wait_until("mike's host knows papa", Duration::from_secs(15), || {
        remote_names(&c, 2, "ov").contains(&"papa".to_string())
    });
    assert!(http(&c, 2, "mike", "papa").is_some());
    assert!(http(&c, 1, "lima", "mike").is_some());
}

#[test]
fn overlay_bad_input_leaves_nothing() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("ov-bad");
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "network",
                "create",
                "x",
                "--driver",
                "overlay",
                "--subnet",
                "172.30.0.0/16",
            ],
            "needs a store",
        ),
        (
            &[
                "network",
                "create",
                "x",
                "--driver",
                "overlay",
                "--store",
                "http://a:1",
            ],
            "only etcd://",
        ),
        (
            &[
                "network", "create", "x", "--driver", "overlay", "--store", "etcd://a",
            ],
            "needs a port",
        ),
        (
            &["network", "create", "x", "--mode", "native"],
            "options of --driver overlay",
        ),
        (
            &[
                "network",
                "create",
                "x",
                "--driver",
                "overlay",
                "--store",
                "etcd://192.0.2.2:2379",
                "--subnet",
                "172.30.0.0/28",
            ],
            "too small",
        ),
        (
            &["network", "create", "x", "--driver", "vlan"],
            "invalid value",
        ),
        // The bridge driver's settings: an overlay's MTU and gateway are md's to choose.
        (
            &[
                "network",
                "create",
                "x",
                "--driver",
                "overlay",
                "--store",
                "etcd://192.0.2.2:2379",
                "--mtu",
                "1400",
            ],
            "options of --driver bridge",
        ),
        (
            &[
                "network",
                "create",
                "x",
                "--driver",
                "overlay",
                "--store",
                "etcd://192.0.2.2:2379",
                "--internal",
            ],
            "options of --driver bridge",
        ),
    ];
    for (args, want) in cases {
        let out = lab.md(args);
        let err = assert_one_line_error(&out, &args.join(" "));
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A store nobody answers at (the outside namespace has no etcd): one line, in seconds.
    let t = std::time::Instant::now();
    let out = lab.md(&[
        "network",
        "create",
        "x",
        "--driver",
        "overlay",
        "--store",
        "etcd://192.0.2.2:2379",
        "--subnet",
        "172.30.0.0/16",
    ]);
    let err = assert_one_line_error(&out, "an unreachable store");
    assert!(err.contains("is down or unreachable"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20));
    let ls = lab.md_ok(&["network", "ls"]);
    assert!(!ls.contains("overlay"), "{ls}");
    assert!(!lab.links().iter().any(|l| l == "mdvx0"));
}
