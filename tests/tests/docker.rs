//! md as Docker's network driver (issue 16): Debian's dockerd 20.10 in the lab (see
//! `md_tests::docker`: `--iptables=false --ip6tables=false --bridge=none`, every file in the
//! lab's temp dir) with `md-user docker-plugin` as its network and IPAM driver, on a
//! busybox-static image made with `docker import`. Published ports from outside, masquerade,
//! names through Docker's embedded DNS and md's resolver (with an `md-user run` container on
//! the same md network), policy by Docker's names, `network connect/disconnect`, restarts of
//! the plugin and of dockerd, `docker rm -f` leaving nothing, and no netfilter rule.

use std::time::Duration;

use md_tests::docker::Docker;
use md_tests::helpers::{
    assert_no_netfilter, fx, run_d, stats_row, upstream_resolver, OUTSIDE_NAME, X_TABLES_NAMES,
};
use md_tests::process::show_output;
use md_tests::runtimes::busybox_rootfs;
use md_tests::{
    require_e2e, require_tools, stdout_str, wait_for, Bg, Lab, HOST_UPLINK_IP, OUTSIDE_IP,
};
use serde_json::Value;

const HTTPD: [&str; 6] = ["httpd", "-f", "-p", "80", "-h", "/tmp"];

fn need_tools() {
    require_tools(&[
        md_tests::docker::DOCKERD,
        md_tests::docker::DOCKER,
        "busybox",
        "curl",
        "dig",
        "dnsmasq",
        "python3",
        "bpftool",
    ]);
}

/// A lab with dockerd (its containers' upstream DNS: the outside namespace's dnsmasq), md's
/// plugin (md's resolvers forward there too) and the busybox image.
fn docker_lab<'a>(lab: &'a Lab, extra: &[&str]) -> (Docker<'a>, Bg) {
    let (upstream, resolv) = upstream_resolver(lab);
    let rootfs = lab.dir().join("rootfs");
    busybox_rootfs(&rootfs, OUTSIDE_IP);
    let mut args = vec!["--dns", OUTSIDE_IP];
    args.extend_from_slice(extra);
    let resolv = resolv.to_str().expect("utf-8").to_string();
    let d = Docker::new(lab, &args, &[("MD_RESOLV_CONF", &resolv)]);
    d.import_busybox(&rootfs);
    (d, upstream)
}

/// `docker network create -d md --ipam-driver md NAME OPTS...`; waits until md knows it by
/// Docker's name and returns its `md-user network ls --json` row.
#[track_caller]
fn create_network(lab: &Lab, d: &Docker, name: &str, opts: &[&str]) -> Value {
    let mut a = vec![
        "network",
        "create",
        "-d",
        &d.driver,
        "--ipam-driver",
        &d.driver,
    ];
    a.extend_from_slice(opts);
    a.push(name);
    d.ok(&a);
    wait_for(
        &format!("md names Docker's network {name}"),
        Duration::from_secs(15),
        || md_network(lab, name),
    )
}

fn md_network(lab: &Lab, name: &str) -> Option<Value> {
    let ls: Value = serde_json::from_str(&lab.md_ok(&["network", "ls", "--json"])).ok()?;
    ls.as_array()?.iter().find(|n| n["name"] == name).cloned()
}

/// What `md-user ps --json` says about a name.
fn md_ps(lab: &Lab, name: &str) -> Option<Value> {
    lab.ps().into_iter().find(|c| c["name"] == name)
}

/// The address `md-user ps` gives a container on md network `net`.
#[track_caller]
fn md_ip(lab: &Lab, name: &str, net: &str) -> String {
    let c = md_ps(lab, name).unwrap_or_else(|| panic!("{name} is not in md-user ps"));
    c["networks"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["network"] == net))
        .and_then(|n| n["ip"].as_str())
        .unwrap_or_else(|| panic!("{name} has no address on {net}: {c}"))
        .to_string()
}

/// The host-side veth md gave container `name` on md network `net` (`md-user inspect`).
#[track_caller]
fn md_veth(lab: &Lab, name: &str, net: &str) -> String {
    let v: Value = serde_json::from_str(&lab.md_ok(&["inspect", name, "--json"])).unwrap();
    v["NetworkSettings"]["Networks"][net]["HostVeth"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no veth on {net}: {v}"))
        .to_string()
}

/// A shell line for a busybox container: GET / from `ip`:`port` with nc, printing the
/// response (busybox-static's wget resolves through glibc's NSS, which it cannot load).
fn http_get(ip: &str, port: u16) -> String {
    format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port}")
}

/// Whether Docker container `from` gets an HTTP answer from `ip`:`port`.
fn reaches(d: &Docker, from: &str, ip: &str, port: u16) -> bool {
    let o = d.docker(&["exec", from, "sh", "-c", &http_get(ip, port)]);
    stdout_str(&o).contains(" 200 ")
}

/// The last address busybox's `nslookup` printed (the answer; the server's comes first).
fn lookup(d: &Docker, from: &str, name: &str) -> Option<String> {
    let o = d.docker(&["exec", from, "nslookup", name]);
    stdout_str(&o)
        .lines()
        .skip_while(|l| !l.starts_with("Name:"))
        .filter(|l| l.starts_with("Address"))
        .filter_map(|l| l.split_whitespace().last())
        .map(String::from)
        .next()
}

/// GET from the outside namespace to the host's `port`: the body, or None.
fn outside_get(lab: &Lab, port: u16) -> Option<String> {
    let url = format!("http://{HOST_UPLINK_IP}:{port}/index.html");
    let o = lab.outside(&["curl", "-s", "--max-time", "2", &url]);
    o.status.success().then(|| stdout_str(&o))
}

#[track_caller]
fn answers_outside(lab: &Lab, port: u16) {
    let got = wait_for(
        &format!("port {port} answers outside"),
        Duration::from_secs(30),
        || outside_get(lab, port),
    );
    assert_eq!(got, "hello from md", "port {port}");
}

/// The key bytes of a pinned map's entries (bpftool prints them as hex strings).
fn map_keys(lab: &Lab, map: &str) -> Vec<Vec<u8>> {
    lab.map_dump(map)
        .iter()
        .filter_map(|e| {
            e["key"]
                .as_array()?
                .iter()
                .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
                .collect()
        })
        .collect()
}

/// Whether a key of `map` holds `ip` as its first or second address (ENDPOINTS: the address;
/// the trackers: source and destination).
fn map_mentions_ip(lab: &Lab, map: &str, ip: &str) -> bool {
    let ip: Vec<u8> = ip.split('.').map(|o| o.parse().unwrap()).collect();
    map_keys(lab, map)
        .iter()
        .any(|k| k.get(0..4) == Some(&ip[..]) || k.get(4..8) == Some(&ip[..]))
}

/// Host ports in PORT_MAP (key bytes 4-5, the CPU's order).
fn published_host_ports(lab: &Lab) -> Vec<u16> {
    map_keys(lab, "PORT_MAP")
        .iter()
        .filter_map(|k| Some(u16::from_ne_bytes([*k.get(4)?, *k.get(5)?])))
        .collect()
}

fn reserved_ports(lab: &Lab) -> String {
    lab.host_ok(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
        .trim()
        .to_string()
}

#[test]
fn docker_containers_on_md() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("docker on md");
    let (d, _upstream) = docker_lab(&lab, &[]);
    let net = create_network(&lab, &d, "mynet", &[]);
    let gw = net["gateway"].as_str().expect("gateway").to_string();
    assert_eq!(
        net["docker_networks"].as_array().map(Vec::len),
        Some(1),
        "{net}"
    );

    // An md-user run container on the same md network, by the network's Docker name.
    run_d(
        &lab,
        "runner",
        &["--network", "mynet"],
        &["python3", &fx("peer_http.py"), "80"],
    );
    // web asks md's resolver for names Docker does not know (--dns: Docker's embedded DNS
    // forwards to it); api asks the outside's.
    d.run_d(
        "web",
        &[
            "--network",
            "mynet",
            "--dns",
            &gw,
            "-p",
            "8080:80",
            "-p",
            "127.0.0.1:8081:80",
            "-p",
            "8090-8099:80",
        ],
        &HTTPD,
    );
    d.run_d(
        "api",
        &["--network", "mynet", "--expose", "80", "-P"],
        &HTTPD,
    );
    let web_id = d.ok(&["inspect", "--format", "{{.Id}}", "web"]);

    // md-user sees Docker's containers by Docker's names, with the ports md chose.
    let (web, api, runner) = (
        md_ip(&lab, "web", "mynet"),
        md_ip(&lab, "api", "mynet"),
        md_ip(&lab, "runner", "mynet"),
    );
    let web_ps = md_ps(&lab, "web").unwrap();
    assert_eq!(
        web_ps["docker"]["container_id"],
        web_id.as_str(),
        "{web_ps}"
    );
    let mut ports: Vec<&str> = web_ps["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        ["127.0.0.1:8081:80/tcp", "8080:80/tcp", "8090:80/tcp"]
    );
    assert_eq!(md_ps(&lab, "api").unwrap()["ports"][0], "49153:80/tcp");
    // Docker's view is md's: md's IPAM gave the addresses, md the MACs.
    let inspect: Value = serde_json::from_str(&d.ok(&["network", "inspect", "mynet"])).unwrap();
    let members = &inspect[0]["Containers"];
    for (name, ip) in [("web", &web), ("api", &api)] {
        let m = members
            .as_object()
            .unwrap()
            .values()
            .find(|m| m["Name"] == name)
            .unwrap_or_else(|| panic!("{name} not in docker network inspect: {members}"));
        let prefix = net["subnet"].as_str().unwrap().split('/').nth(1).unwrap();
        assert_eq!(m["IPv4Address"], format!("{ip}/{prefix}").as_str(), "{m}");
        let octets: Vec<String> = ip
            .split('.')
            .map(|o| format!("{:02x}", o.parse::<u8>().unwrap()))
            .collect();
        assert_eq!(
            m["MacAddress"],
            format!("02:42:{}", octets.join(":")).as_str()
        );
    }
    let in_web = d.ok(&["exec", "web", "ip", "-o", "-4", "addr", "show", "eth0"]);
    assert!(in_web.contains(&format!("{web}/")), "{in_web}");
    assert_eq!(
        md_network(&lab, "mynet").unwrap()["docker_leases"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "web's and api's addresses are leased"
    );

    // Published ports, every form: from outside through md's eBPF DNAT; the loopback-bound one
    // only from the host.
    answers_outside(&lab, 8080);
    answers_outside(&lab, 8090);
    answers_outside(&lab, 49153);
    assert_eq!(
        outside_get(&lab, 8081),
        None,
        "127.0.0.1:8081 answers outside"
    );
    let local = lab.host(&[
        "curl",
        "-s",
        "--max-time",
        "2",
        "http://127.0.0.1:8081/index.html",
    ]);
    assert_eq!(
        stdout_str(&local),
        "hello from md",
        "{}",
        show_output(&local)
    );
    assert!(stats_row(&lab.stats(), "web")["dnat"].as_u64().unwrap() > 0);

    // Masquerade to the outside.
    let _peer = lab.spawn_outside(&["python3", &fx("peer_http.py"), "8000", OUTSIDE_IP]);
    lab.wait_listening_outside("tcp", 8000);
    let seen = d.ok(&["exec", "web", "sh", "-c", &http_get(OUTSIDE_IP, 8000)]);
    assert!(
        seen.contains(&format!("{HOST_UPLINK_IP}:")),
        "the outside saw: {seen}"
    );

    // Names: Docker's embedded DNS between its containers, its forwarding (from inside the
    // container, through md's masquerade) to the outside, md's resolver both ways.
    assert_eq!(lookup(&d, "web", "api").as_deref(), Some(api.as_str()));
    assert_eq!(lookup(&d, "api", "web").as_deref(), Some(web.as_str()));
    assert_eq!(lookup(&d, "api", OUTSIDE_NAME).as_deref(), Some(OUTSIDE_IP));
    assert_eq!(
        lookup(&d, "web", "runner").as_deref(),
        Some(runner.as_str())
    );
    let dig = stdout_str(&lab.exec("runner", &["dig", "+short", "+time=2", "+tries=2", "web"]));
    assert_eq!(dig, web);

    // Policy by Docker's names, against real traffic, seen by monitor and stats.
    lab.wait_listening_in("runner", "tcp", 80);
    assert!(reaches(&d, "web", &api, 80), "web cannot reach api");
    assert!(reaches(&d, "web", &runner, 80), "web cannot reach runner");
    let mut mon = lab.spawn_md(&["monitor", "--json"]);
    std::thread::sleep(Duration::from_millis(500));
    lab.md_ok(&["policy", "deny", "web", "api"]);
    lab.md_ok(&["policy", "deny", "runner", "web"]);
    assert!(
        !reaches(&d, "web", &api, 80),
        "web reaches api after the deny"
    );
    assert!(
        reaches(&d, "api", &web, 80),
        "the deny web -> api stopped api -> web"
    );
    let runner_to_web = lab.exec(
        "runner",
        &[
            "curl",
            "-s",
            "--max-time",
            "2",
            &format!("http://{web}/index.html"),
        ],
    );
    assert!(
        !runner_to_web.status.success(),
        "runner reaches web after the deny"
    );
    assert!(
        reaches(&d, "web", &runner, 80),
        "the deny runner -> web stopped web -> runner"
    );
    let ev = wait_for(
        "monitor shows web -> api denied",
        Duration::from_secs(15),
        || {
            mon.stdout()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|e| {
                    e["event"] == "policy-deny"
                        && e["src_container"] == "web"
                        && e["dst_container"] == "api"
                })
        },
    );
    assert_eq!(ev["dst"], format!("{api}:80").as_str(), "{ev}");
    mon.signal(libc::SIGTERM);
    let stats = lab.stats();
    assert!(
        stats_row(&stats, "web")["drops"]["policy"]
            .as_u64()
            .unwrap()
            > 0,
        "{stats}"
    );

    // docker rm -f: nothing of web is left in md.
    let web_veth = md_veth(&lab, "web", "mynet");
    let before = lab.map_dump("PORT_MAP").len();
    assert!(reserved_ports(&lab).contains("8080"));
    d.ok(&["rm", "-f", "web"]);
    assert!(md_ps(&lab, "web").is_none(), "web still in md-user ps");
    assert!(
        !lab.links().contains(&web_veth),
        "web's veth {web_veth} is left"
    );
    for map in ["ENDPOINTS", "CONNTRACK", "CONNTRACK_NEW"] {
        assert!(
            !map_mentions_ip(&lab, map, &web),
            "{map} still has web's {web}"
        );
    }
    assert_eq!(
        lab.map_dump("PORT_MAP").len(),
        before - 3,
        "web's three ports"
    );
    assert_eq!(
        published_host_ports(&lab),
        [49153],
        "only api's port is left"
    );
    assert!(
        !reserved_ports(&lab).contains("8080"),
        "{}",
        reserved_ports(&lab)
    );
    assert_eq!(
        outside_get(&lab, 8080),
        None,
        "web's port answers after rm -f"
    );
    let leases = md_network(&lab, "mynet").unwrap()["docker_leases"].clone();
    assert_eq!(
        leases,
        serde_json::json!([api]),
        "web's address is still leased"
    );

    // Everything else: the md network Docker's network made goes with it.
    d.ok(&["rm", "-f", "api"]);
    lab.md_ok(&["stop", "runner"]);
    d.ok(&["network", "rm", "mynet"]);
    assert!(
        md_network(&lab, "mynet").is_none(),
        "md network mynet is left"
    );
    assert!(lab.ps().is_empty(), "{:?}", lab.ps());
    assert!(lab.md_veths().is_empty(), "{:?}", lab.md_veths());
    for map in ["ENDPOINTS", "VETH_OWNERS", "PORT_MAP"] {
        assert!(lab.map_dump(map).is_empty(), "{map} is not empty");
    }
    assert_no_netfilter(&lab, &X_TABLES_NAMES);
}
