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
    let mut a = vec!["--ipam-driver", &d.driver];
    a.extend_from_slice(opts);
    create_network_with(lab, d, name, &a)
}

/// `docker network create -d md NAME OPTS...` (Docker's own IPAM unless OPTS say otherwise).
#[track_caller]
fn create_network_with(lab: &Lab, d: &Docker, name: &str, opts: &[&str]) -> Value {
    let mut a = vec!["network", "create", "-d", &d.driver];
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

#[test]
fn docker_network_connect_and_disconnect_live() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("docker connect");
    let (d, _upstream) = docker_lab(&lab, &[]);
    create_network(&lab, &d, "neta", &[]);
    // netb with Docker's own IPAM: md takes the addresses Docker hands out.
    let b = create_network_with(&lab, &d, "netb", &["--subnet", "10.77.0.0/24"]);
    assert_eq!(b["subnet"], "10.77.0.0/24");
    d.run_d("c1", &["--network", "neta", "-p", "8080:80"], &HTTPD);
    d.run_d("c2", &["--network", "netb", "--ip", "10.77.0.42"], &HTTPD);
    let c2 = md_ip(&lab, "c2", "netb");
    assert_eq!(c2, "10.77.0.42");
    answers_outside(&lab, 8080);
    // Networks are isolated until connected.
    assert!(!reaches(&d, "c1", &c2, 80), "c1 reaches c2 across networks");

    d.ok(&["network", "connect", "netb", "c1"]);
    let c1b = md_ip(&lab, "c1", "netb");
    let docker_ip = d.ok(&[
        "inspect",
        "--format",
        "{{(index .NetworkSettings.Networks \"netb\").IPAddress}}",
        "c1",
    ]);
    assert_eq!(
        docker_ip, c1b,
        "Docker and md disagree on c1's netb address"
    );
    let addrs = d.ok(&["exec", "c1", "ip", "-o", "-4", "addr"]);
    assert!(addrs.contains(&format!("{c1b}/24")), "{addrs}");
    assert!(
        reaches(&d, "c1", &c2, 80),
        "c1 cannot reach c2 once connected"
    );
    assert_eq!(lookup(&d, "c1", "c2").as_deref(), Some(c2.as_str()));
    answers_outside(&lab, 8080);

    // Disconnected: the interface and its veth go, the networks are apart again.
    let veth_b = md_veth(&lab, "c1", "netb");
    d.ok(&["network", "disconnect", "netb", "c1"]);
    let nets = md_ps(&lab, "c1").unwrap()["networks"].clone();
    assert_eq!(nets.as_array().map(Vec::len), Some(1), "{nets}");
    assert!(!lab.links().contains(&veth_b), "{veth_b} is left");
    assert!(!map_mentions_ip(&lab, "ENDPOINTS", &c1b));
    assert!(
        !reaches(&d, "c1", &c2, 80),
        "c1 reaches c2 after disconnect"
    );
    answers_outside(&lab, 8080);

    // Connected again, then off its first network: Docker moves its default route and its
    // published ports to netb, and so does md.
    d.ok(&["network", "connect", "netb", "c1"]);
    assert!(
        reaches(&d, "c1", &c2, 80),
        "c1 cannot reach c2 once reconnected"
    );
    d.ok(&["network", "disconnect", "neta", "c1"]);
    let c1 = md_ps(&lab, "c1").unwrap();
    assert_eq!(c1["networks"].as_array().map(Vec::len), Some(1), "{c1}");
    assert_eq!(c1["ip"], md_ip(&lab, "c1", "netb").as_str(), "{c1}");
    assert_eq!(c1["ports"][0], "8080:80/tcp", "{c1}");
    answers_outside(&lab, 8080);
    let route = d.ok(&["exec", "c1", "ip", "route"]);
    assert!(route.contains("default via 10.77.0.1"), "{route}");
}

#[test]
fn docker_networking_survives_restarts_of_plugin_and_dockerd() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("docker restarts");
    let (mut d, _upstream) = docker_lab(&lab, &["--live-restore"]);
    create_network(&lab, &d, "mynet", &[]);
    d.run_d("web", &["--network", "mynet", "-p", "8080:80"], &HTTPD);
    d.run_d("api", &["--network", "mynet"], &HTTPD);
    let (web, api) = (md_ip(&lab, "web", "mynet"), md_ip(&lab, "api", "mynet"));
    answers_outside(&lab, 8080);
    lab.md_ok(&["policy", "deny", "api", "web"]);
    assert!(
        !reaches(&d, "api", &web, 80),
        "api reaches web after the deny"
    );

    // The plugin killed: the pinned datapath keeps every container's network and policy.
    d.stop_plugin(libc::SIGKILL);
    answers_outside(&lab, 8080);
    assert!(
        reaches(&d, "web", &api, 80),
        "web lost api with the plugin gone"
    );
    assert!(
        !reaches(&d, "api", &web, 80),
        "the deny went with the plugin"
    );
    // Started again (over its stale socket), it carries on from md's store: a new container
    // gets a free address (the others' are still leased) and the old ones go cleanly.
    d.start_plugin();
    d.run_d("late", &["--network", "mynet"], &HTTPD);
    let late = md_ip(&lab, "late", "mynet");
    assert!(late != web && late != api, "late got a used address {late}");
    assert!(reaches(&d, "late", &web, 80), "late cannot reach web");
    d.ok(&["rm", "-f", "api"]);
    assert!(md_ps(&lab, "api").is_none(), "api is left in md");
    assert!(!map_mentions_ip(&lab, "ENDPOINTS", &api));

    // dockerd stopped (--live-restore: its containers keep running) and started again.
    d.stop_daemon();
    answers_outside(&lab, 8080);
    d.start_daemon();
    answers_outside(&lab, 8080);
    assert!(
        reaches(&d, "late", &web, 80),
        "late lost web over dockerd's restart"
    );
    // Docker's restored view and md's agree: new containers, connect and rm go through md.
    d.run_d("after", &["--network", "mynet"], &HTTPD);
    let after = md_ip(&lab, "after", "mynet");
    assert!(
        reaches(&d, "after", &web, 80),
        "a container made after the restart is cut off"
    );
    assert_eq!(lookup(&d, "after", "web").as_deref(), Some(web.as_str()));
    let web_veth = md_veth(&lab, "web", "mynet");
    d.ok(&["rm", "-f", "web", "late", "after"]);
    assert_eq!(
        outside_get(&lab, 8080),
        None,
        "web's port answers after rm -f"
    );
    assert!(!lab.links().contains(&web_veth));
    assert!(lab.ps().is_empty(), "{:?}", lab.ps());
    assert!(!map_mentions_ip(&lab, "ENDPOINTS", &after));
    assert_eq!(
        md_network(&lab, "mynet").unwrap()["docker_leases"],
        serde_json::json!([]),
        "addresses are still leased"
    );
}

/// What md refuses reaches the Docker user as md's one-line error, and leaves nothing: no md
/// network, pool, lease, container, veth or map entry.
#[test]
fn docker_refusals_leave_nothing() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("docker refusals");
    let (d, _upstream) = docker_lab(&lab, &[]);
    let drv = d.driver.clone();
    let refused = |args: &[&str], msg: &str| {
        let out = d.docker(args);
        assert!(
            !out.status.success() && md_tests::stderr_str(&out).contains(msg),
            "`docker {}` should fail with {msg:?}\n{}",
            args.join(" "),
            show_output(&out)
        );
    };
    let create = ["network", "create", "-d", &drv, "--ipam-driver", &drv];
    let with = |extra: &[&'static str]| {
        let mut a: Vec<&str> = create.to_vec();
        a.extend_from_slice(extra);
        a
    };
    refused(&with(&["--ipv6", "v6net"]), "md's networks are IPv4");
    refused(
        &with(&["-o", "mtu=9000", "onet"]),
        "md takes no driver options (-o mtu)",
    );
    refused(
        &with(&["--subnet", "172.18.5.0/24", "over"]),
        "overlaps md network bridge (172.18.0.0/16)",
    );
    refused(
        &with(&["--subnet", "10.66.0.0/24", "--gateway", "10.66.0.9", "gw"]),
        "md's gateway is the subnet's first address, 10.66.0.1",
    );
    let ls: Value = serde_json::from_str(&lab.md_ok(&["network", "ls", "--json"])).unwrap();
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["bridge"], "refused networks left md networks: {ls}");
    // Nor pools: the first network md's IPAM makes still gets the first free /16.
    let net = create_network(&lab, &d, "mynet", &[]);
    assert_eq!(
        net["subnet"], "172.19.0.0/16",
        "a refused network kept its pool"
    );
    run_d(&lab, "clash", &["-p", "8080:80"], &["sleep", "600"]);
    let run = |name: &'static str, extra: &[&'static str]| {
        let mut a = vec!["run", "-d", "--name", name, "--network", "mynet"];
        a.extend_from_slice(extra);
        a.push(md_tests::docker::IMAGE);
        a.extend_from_slice(&HTTPD);
        a
    };
    refused(
        &run("sctp", &["-p", "80/sctp"]),
        "port 80/sctp: md publishes tcp and udp ports",
    );
    refused(
        &run("taken", &["-p", "8080:80"]),
        "port 8080:80/tcp is already published by container clash",
    );
    refused(&run("clash", &[]), "container name clash is already in use");
    // Only md-user run's container is left in md.
    let names: Vec<String> = lab
        .ps()
        .iter()
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    assert_eq!(names, ["clash"]);
    assert_eq!(lab.md_veths().len(), 1, "{:?}", lab.md_veths());
    assert_eq!(lab.map_dump("ENDPOINTS").len(), 1);
    assert_eq!(published_host_ports(&lab), [8080]);
    assert_eq!(
        md_network(&lab, "mynet").unwrap()["docker_leases"],
        serde_json::json!([]),
        "a refused container's address is still leased"
    );
}
