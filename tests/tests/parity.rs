//! Docker parity for everyday users (issue 18), end to end in the lab: network aliases with
//! round-robin answers, PTR, `--add-host` and `host-gateway`, `--dns`/`--dns-search`/
//! `--dns-option`, per-network MTU, `--internal` and gateway modes (`routed`, `isolated`),
//! `--gateway`, `--ip-range`, the bridge name option, `network inspect`, `--mac-address`,
//! `md-user port`, random host ports (`-p 80`, `-p IP::80`, `-P --expose`), and bad values
//! refused with one line and nothing left behind.
//!
//! Like names.rs, every lab runs an upstream resolver (dnsmasq) in the outside namespace that
//! knows only `outside.test` → 192.0.2.2 and refuses everything else; md-user is pointed at it
//! through a resolv.conf of the lab (which also carries a search domain and an option, so the
//! containers' resolv.conf can be checked against Docker's rules). A second resolver on
//! 192.0.2.53 knows other names, for `--dns`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use md_tests::helpers::{
    assert_one_line_error, counter, fx, md_resolv, run_args, stats_row, OUTSIDE_NAME,
};
use md_tests::process::show_output;
use md_tests::{
    require_e2e, require_tools, stdout_str, wait_for, Bg, Lab, GATEWAY, HOST_UPLINK_IP, OUTSIDE_IP,
};
use serde_json::Value;

/// The second upstream (for `--dns`), on another address of the outside namespace.
const OTHER_DNS: &str = "192.0.2.53";
/// What only the second upstream knows.
const OTHER_NAME: &str = "only-other.test";
const OTHER_NAME_IP: &str = "192.0.2.98";
/// A name under the search domain `lab.test`, known to the second upstream only.
const SEARCH_HOST: &str = "box";
const SEARCH_HOST_IP: &str = "192.0.2.99";

/// A lab with both upstream resolvers and md-user pointed at the first.
struct PLab {
    // Dropped before the lab (fields drop in order).
    _upstreams: Vec<Bg>,
    resolv: PathBuf,
    lab: Lab,
}

impl PLab {
    #[track_caller]
    fn new(name: &str) -> PLab {
        require_tools(&[
            "dig", "dnsmasq", "getent", "ping", "curl", "python3", "ss", "ip",
        ]);
        let lab = Lab::new(name);
        let resolv = lab.dir().join("upstream-resolv.conf");
        // The host's resolv.conf as md-user reads it: a search domain and an option, which the
        // containers get unless they ask for their own.
        std::fs::write(
            &resolv,
            format!("nameserver {OUTSIDE_IP}\nsearch corp.test\noptions timeout:2\n"),
        )
        .unwrap();
        lab.outside_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{OTHER_DNS}/24"),
            "dev",
            "eth0",
        ]);
        let dnsmasq = |listen: &str, names: &[(&str, &str)]| {
            let mut args = vec![
                "dnsmasq".to_string(),
                "--no-daemon".into(),
                "--conf-file=/dev/null".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                "--bind-interfaces".into(),
                format!("--listen-address={listen}"),
                "--pid-file=".into(),
                "--log-queries".into(),
                "--log-facility=-".into(),
            ];
            args.extend(names.iter().map(|(n, ip)| format!("--address=/{n}/{ip}")));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.spawn_outside(&args)
        };
        let first = dnsmasq(OUTSIDE_IP, &[(OUTSIDE_NAME, OUTSIDE_IP)]);
        let second = dnsmasq(
            OTHER_DNS,
            &[
                (OTHER_NAME, OTHER_NAME_IP),
                (&format!("{SEARCH_HOST}.lab.test"), SEARCH_HOST_IP),
            ],
        );
        wait_for("both upstream resolvers", Duration::from_secs(10), || {
            let out = lab.outside(&["ss", "-Hlun", "sport = :53"]);
            let s = stdout_str(&out);
            (s.contains(OUTSIDE_IP) && s.contains(OTHER_DNS)).then_some(())
        });
        PLab {
            _upstreams: vec![first, second],
            resolv,
            lab,
        }
    }

    #[track_caller]
    fn md(&self, args: &[&str]) -> Output {
        md_resolv(&self.lab, &self.resolv, args)
    }

    #[track_caller]
    fn md_ok(&self, args: &[&str]) -> String {
        let out = self.md(args);
        assert!(
            out.status.success(),
            "`md-user {}` failed\n{}",
            args.join(" "),
            show_output(&out)
        );
        stdout_str(&out)
    }

    #[track_caller]
    fn run_d(&self, name: &str, opts: &[&str], cmd: &[&str]) {
        let out = self.md_ok(&run_args(name, opts, cmd));
        assert_eq!(out.trim(), name, "run -d {name} prints the name");
    }

    #[track_caller]
    fn sleeper(&self, name: &str, opts: &[&str]) {
        self.run_d(name, opts, &["sleep", "600"]);
    }

    /// A container serving where_http.py on `ports`, once the first listens.
    #[track_caller]
    fn server(&self, name: &str, opts: &[&str], ports: &[u16]) {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut cmd = vec!["python3", "-u"];
        let script = fx("where_http.py");
        cmd.push(&script);
        cmd.extend(ports.iter().map(String::as_str));
        self.run_d(name, opts, &cmd);
        for p in &ports {
            self.lab.wait_listening_in(name, "tcp", p.parse().unwrap());
        }
    }

    #[track_caller]
    fn exec_ok(&self, c: &str, args: &[&str]) -> String {
        self.lab.exec_ok(c, args)
    }

    /// `dig +short` in `c` (through `server`, else its resolv.conf): the answer lines.
    #[track_caller]
    fn dig(&self, c: &str, server: Option<&str>, name: &str, qtype: &str) -> Vec<String> {
        let at = server.map(|s| format!("@{s}"));
        let mut args = vec!["dig", "+short", "+time=2", "+tries=2"];
        if let Some(at) = &at {
            args.push(at);
        }
        args.extend([name, qtype]);
        stdout_str(&self.lab.exec(c, &args))
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The status dig reports (NOERROR, NXDOMAIN, REFUSED...).
    #[track_caller]
    fn dig_status(&self, c: &str, server: Option<&str>, name: &str) -> String {
        let at = server.map(|s| format!("@{s}"));
        let mut args = vec!["dig", "+noall", "+comments", "+time=2", "+tries=2"];
        if let Some(at) = &at {
            args.push(at);
        }
        args.push(name);
        let out = stdout_str(&self.lab.exec(c, &args));
        out.split_once("status: ")
            .map(|(_, r)| {
                r.chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect()
            })
            .unwrap_or_else(|| panic!("[{c}] dig {name}: no status in\n{out}"))
    }

    /// `getent ahostsv4 NAME` in `c`: the addresses (empty when it does not resolve).
    #[track_caller]
    fn getent(&self, c: &str, name: &str) -> BTreeSet<String> {
        stdout_str(&self.lab.exec(c, &["getent", "ahostsv4", name]))
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// GET http://HOST:PORT/ from `c`: the body, or None when it fails.
    #[track_caller]
    fn curl(&self, c: &str, url: &str) -> Option<String> {
        let out = self.lab.exec(
            c,
            &["curl", "-s", "--max-time", "3", &format!("http://{url}/")],
        );
        out.status
            .success()
            .then(|| stdout_str(&out).trim().to_string())
    }

    fn pings(&self, c: &str, ip: &str) -> bool {
        self.lab
            .exec(c, &["ping", "-c1", "-W2", ip])
            .status
            .success()
    }

    /// `network inspect NAME --json`'s object.
    #[track_caller]
    fn inspect_net(&self, name: &str) -> Value {
        let out = self.md_ok(&["network", "inspect", name, "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v.as_array().map(Vec::len), Some(1), "one network: {out}");
        v[0].clone()
    }

    /// The resolv.conf of `c`.
    #[track_caller]
    fn resolv_of(&self, c: &str) -> String {
        self.exec_ok(c, &["cat", "/etc/resolv.conf"])
    }

    /// What must not change when a command is refused.
    #[track_caller]
    fn snapshot(&self) -> String {
        let mut state = self.lab.state_entries();
        state.sort();
        let mut pins = self.lab.pin_entries();
        pins.sort();
        format!(
            "links {:?}\nps {}\nnetworks {}\nstate {state:?}\npins {pins:?}\nreserved {}",
            self.lab.links(),
            self.md_ok(&["ps", "--json"]),
            self.md_ok(&["network", "ls", "--json"]),
            self.lab
                .host_ok(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
                .trim()
        )
    }
}

// ---- names -----------------------------------------------------------------------------------

/// `--network-alias` and `network connect --alias`: several names for one address, one name for
/// several containers (Compose's scaled service: every address, in turn), scoped to the network
/// the alias was given on, gone with its container; PTR answers for container addresses and the
/// `NAME.NETWORK` they give.
#[test]
fn aliases_round_robin_and_ptr() {
    if !require_e2e() {
        return;
    }
    let t = PLab::new("parity-alias");
    t.md_ok(&["network", "create", "svc", "--subnet", "10.61.0.0/24"]);
    let gw = "10.61.0.1";
    for w in ["web1", "web2", "web3"] {
        t.server(w, &["--network", "svc", "--network-alias", "web"], &[80]);
    }
    t.sleeper(
        "client",
        &[
            "--network",
            "svc",
            "--network-alias",
            "c1",
            "--network-alias",
            "c2",
        ],
    );
    t.sleeper("outsider", &[]);
    let ips: BTreeSet<String> = ["web1", "web2", "web3"]
        .iter()
        .map(|w| t.lab.ip_of(w))
        .collect();

    // Every answer has all three; the first one moves round.
    let mut firsts = BTreeSet::new();
    for _ in 0..6 {
        let got = t.dig("client", Some(gw), "web", "A");
        assert_eq!(
            got.iter().cloned().collect::<BTreeSet<_>>(),
            ips,
            "web answers with every container that has the alias: {got:?}"
        );
        assert_eq!(got.len(), 3, "{got:?}");
        firsts.insert(got[0].clone());
    }
    assert_eq!(firsts.len(), 3, "each answer starts elsewhere: {firsts:?}");
    // The same answers over TCP.
    let over_tcp: BTreeSet<String> = t
        .exec_ok(
            "client",
            &[
                "dig",
                "+tcp",
                "+short",
                "+time=2",
                &format!("@{gw}"),
                "web",
                "A",
            ],
        )
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(over_tcp, ips, "web over TCP");
    // Real traffic by the alias reaches one of them.
    let seen = t.curl("client", "web").expect("GET http://web/");
    let served_by = seen.split_whitespace().nth(1).unwrap_or_default();
    assert!(
        ips.iter()
            .any(|ip| served_by.starts_with(&format!("{ip}:"))),
        "http://web/ answered by one of {ips:?}: {seen}"
    );
    // Two names for one address.
    let client = t.lab.ip_of("client");
    for a in ["c1", "c2"] {
        assert_eq!(
            t.dig("web1", Some(gw), a, "A"),
            std::slice::from_ref(&client),
            "{a}"
        );
    }
    // Scoped to its network: from the default network, `web` is nobody's (forwarded upstream,
    // which refuses it).
    assert_eq!(t.dig_status("outsider", Some(GATEWAY), "web"), "REFUSED");

    // network connect --alias: the name on that network only, at the address there.
    t.md_ok(&[
        "network", "connect", "svc", "outsider", "--alias", "api", "--alias", "web",
    ]);
    let outsider_svc = wait_for("outsider on svc", Duration::from_secs(5), || {
        t.lab.ps_entry("outsider")["networks"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["network"] == "svc"))
            .and_then(|n| n["ip"].as_str().map(str::to_string))
    });
    assert_eq!(
        t.dig("client", Some(gw), "api", "A"),
        std::slice::from_ref(&outsider_svc)
    );
    assert_eq!(t.dig("client", Some(gw), "web", "A").len(), 4);
    assert!(
        t.getent("client", "api").contains(&outsider_svc),
        "getent resolves the alias too"
    );

    // A stopped container leaves the answers.
    t.md_ok(&["stop", "-t", "1", "web2"]);
    let w2 = "web2 gone";
    let left = t.dig("client", Some(gw), "web", "A");
    assert_eq!(left.len(), 3, "{w2}: {left:?}");

    // PTR: a container address names NAME.NETWORK; that name resolves back.
    let web1 = t.lab.ip_of("web1");
    assert_eq!(
        t.exec_ok("client", &["dig", "+short", "-x", &web1, "@10.61.0.1"])
            .trim(),
        "web1.svc."
    );
    assert_eq!(
        t.exec_ok(
            "client",
            &["dig", "+tcp", "+short", "-x", &web1, "@10.61.0.1"]
        )
        .trim(),
        "web1.svc.",
        "PTR over TCP"
    );
    assert_eq!(
        t.dig("client", Some(gw), "web1.svc", "A"),
        std::slice::from_ref(&web1)
    );
    let outsider = t.lab.ip_of("outsider");
    assert_eq!(
        t.exec_ok(
            "outsider",
            &["dig", "+short", "-x", &outsider, &format!("@{GATEWAY}")]
        )
        .trim(),
        "outsider.bridge."
    );
    // Through the container's own resolver library too (DNS, not its hosts file).
    let out = t.exec_ok("client", &["getent", "-s", "dns", "hosts", &web1]);
    assert!(out.contains("web1.svc"), "getent hosts {web1}: {out}");
    // An address on a network the asker is not on: not md's to name (forwarded, refused).
    assert_eq!(
        t.dig_status(
            "outsider",
            Some(GATEWAY),
            &format!("{}.in-addr.arpa", {
                let o: Vec<&str> = web1.split('.').rev().collect();
                o.join(".")
            })
        ),
        "REFUSED"
    );
}

/// `--add-host` (also `host-gateway`, the host at the network's gateway), `--dns` (this
/// container's upstream), `--dns-search` and `--dns-option` in resolv.conf, and Docker's
/// defaults: the host's search domains and options, plus `ndots:0` unless an option sets ndots.
#[test]
fn extra_hosts_and_dns_options() {
    if !require_e2e() {
        return;
    }
    let t = PLab::new("parity-dns");
    let outside_http = t
        .lab
        .spawn_outside(&["python3", &fx("peer_http.py"), "8088", OUTSIDE_IP]);
    t.lab.wait_listening_outside("tcp", 8088);
    // A host service on every address: what host-gateway is for.
    let host_http = t.lab.spawn_host(&["python3", &fx("where_http.py"), "8099"]);
    t.lab.wait_listening_host("tcp", 8099);

    t.sleeper(
        "plain",
        &[
            "--add-host",
            "db.local:192.0.2.2",
            "--add-host",
            "hgw:host-gateway",
        ],
    );
    t.md_ok(&["network", "create", "dnsnet", "--subnet", "10.62.0.0/24"]);
    t.sleeper(
        "tuned",
        &[
            "--network",
            "dnsnet",
            "--dns",
            OTHER_DNS,
            "--dns-search",
            "lab.test",
            "--dns-option",
            "ndots:2",
            "--dns-option",
            "edns0",
            "--add-host",
            "gw6=::1",
            "--add-host",
            "hgw:host-gateway",
        ],
    );

    // /etc/hosts: the entries before the container's own line, host-gateway resolved.
    let hosts = t.exec_ok("plain", &["cat", "/etc/hosts"]);
    let own = hosts
        .find(&format!("{}\tplain", t.lab.ip_of("plain")))
        .unwrap_or_else(|| panic!("own line in\n{hosts}"));
    let db = hosts.find("192.0.2.2\tdb.local\n").expect("db.local line");
    assert!(db < own, "--add-host lines come first:\n{hosts}");
    assert!(hosts.contains(&format!("{GATEWAY}\thgw\n")), "{hosts}");
    let tuned_hosts = t.exec_ok("tuned", &["cat", "/etc/hosts"]);
    assert!(tuned_hosts.contains("10.62.0.1\thgw\n"), "{tuned_hosts}");
    assert!(tuned_hosts.contains("::1\tgw6\n"), "{tuned_hosts}");
    // Real traffic by those names.
    assert_eq!(
        t.curl("plain", "db.local:8088")
            .map(|s| s.starts_with(HOST_UPLINK_IP)),
        Some(true),
        "db.local reaches the outside server (masqueraded)"
    );
    for (c, gw) in [("plain", GATEWAY), ("tuned", "10.62.0.1")] {
        let seen = t
            .curl(c, "hgw:8099")
            .unwrap_or_else(|| panic!("{c}: GET http://hgw:8099/"));
        assert!(
            seen.ends_with(&format!("{gw}:8099")),
            "{c}: host-gateway is the host at {gw}: {seen}"
        );
    }
    drop(host_http);
    drop(outside_http);

    // resolv.conf as Docker writes it for a network with its own resolver.
    let plain = t.resolv_of("plain");
    let lines: Vec<&str> = plain.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        [
            &format!("nameserver {GATEWAY}")[..],
            "search corp.test",
            "options timeout:2 ndots:0"
        ],
        "{plain}"
    );
    let tuned = t.resolv_of("tuned");
    let lines: Vec<&str> = tuned.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        [
            "nameserver 10.62.0.1",
            "search lab.test",
            "options ndots:2 edns0"
        ],
        "{tuned}"
    );

    // --dns: tuned's other names go to the second upstream, plain's to the host's.
    assert_eq!(t.dig("tuned", None, OTHER_NAME, "A"), [OTHER_NAME_IP]);
    assert_eq!(t.dig_status("tuned", None, OUTSIDE_NAME), "REFUSED");
    assert_eq!(t.dig("plain", None, OUTSIDE_NAME, "A"), [OUTSIDE_IP]);
    assert_eq!(t.dig_status("plain", None, OTHER_NAME), "REFUSED");
    // The search domain, through the container's resolver library.
    assert_eq!(
        t.getent("tuned", SEARCH_HOST),
        BTreeSet::from([SEARCH_HOST_IP.to_string()]),
        "{SEARCH_HOST} found as {SEARCH_HOST}.lab.test"
    );
    assert!(t.getent("plain", SEARCH_HOST).is_empty());
    // Container names still come from md's resolver.
    assert_eq!(t.dig("plain", None, "plain", "A"), [t.lab.ip_of("plain")]);

    // `--dns-search .`: no search line at all.
    t.sleeper("nosearch", &["--dns-search", "."]);
    let r = t.resolv_of("nosearch");
    assert!(!r.contains("search"), "{r}");
    assert!(r.contains("options timeout:2 ndots:0"), "{r}");
}

// ---- networks -------------------------------------------------------------------------------

/// `--gateway`, `--ip-range`, the bridge name option and `network inspect` with Docker's fields;
/// everything that depends on the gateway follows it (route, resolver, masquerade).
#[test]
fn gateway_ip_range_bridge_name_and_inspect() {
    if !require_e2e() {
        return;
    }
    let t = PLab::new("parity-net");
    let _http = t
        .lab
        .spawn_outside(&["python3", &fx("peer_http.py"), "8088", OUTSIDE_IP]);
    t.lab.wait_listening_outside("tcp", 8088);
    t.md_ok(&[
        "network",
        "create",
        "ranged",
        "--subnet",
        "10.63.0.0/24",
        "--gateway",
        "10.63.0.254",
        "--ip-range",
        "10.63.0.128/30",
        "-o",
        "com.docker.network.bridge.name=br-parity",
    ]);
    let addr = t
        .lab
        .host_ok(&["ip", "-4", "-o", "addr", "show", "dev", "br-parity"]);
    assert!(
        addr.contains("10.63.0.254/24"),
        "the bridge has the gateway: {addr}"
    );
    for (i, c) in ["r0", "r1", "r2", "r3"].iter().enumerate() {
        t.sleeper(c, &["--network", "ranged"]);
        assert_eq!(
            t.lab.ip_of(c),
            format!("10.63.0.{}", 128 + i),
            "{c} from the range"
        );
    }
    // The range is full; a static address outside it is fine.
    let before = t.snapshot();
    let out = t.md(&run_args("r4", &["--network", "ranged"], &["sleep", "600"]));
    let err = assert_one_line_error(&out, "run on a full --ip-range");
    assert!(err.contains("10.63.0.128/30"), "{err}");
    assert_eq!(t.snapshot(), before, "a refused run left something");
    t.sleeper("fixed", &["--network", "ranged", "--ip", "10.63.0.1"]);
    assert_eq!(
        t.lab.ip_of("fixed"),
        "10.63.0.1",
        "not the gateway: .1 is free"
    );

    let route = t.exec_ok("r0", &["ip", "route", "show", "default"]);
    assert!(route.contains("via 10.63.0.254"), "{route}");
    assert_eq!(
        t.resolv_of("r0")
            .lines()
            .find(|l| l.starts_with("nameserver")),
        Some("nameserver 10.63.0.254")
    );
    assert_eq!(t.dig("r0", None, "r1", "A"), ["10.63.0.129"]);
    assert_eq!(
        t.curl("r0", &format!("{OUTSIDE_IP}:8088"))
            .map(|s| s.starts_with(HOST_UPLINK_IP)),
        Some(true),
        "masqueraded out of a network with its own gateway"
    );

    let n = t.inspect_net("ranged");
    for (k, want) in [("Name", "ranged"), ("Scope", "local"), ("Driver", "bridge")] {
        assert_eq!(n[k], want, "{k}: {n}");
    }
    let id = n["Id"].as_str().unwrap_or_default();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "Id: {id}"
    );
    assert!(
        n["Created"].as_str().unwrap_or_default().ends_with('Z'),
        "Created: {n}"
    );
    assert_eq!(n["EnableIPv4"], true);
    assert_eq!(n["EnableIPv6"], false);
    assert_eq!(n["Internal"], false);
    assert_eq!(n["Attachable"], false);
    assert_eq!(n["Ingress"], false);
    assert_eq!(n["ConfigOnly"], false);
    assert_eq!(n["IPAM"]["Driver"], "default");
    let cfg = &n["IPAM"]["Config"][0];
    assert_eq!(cfg["Subnet"], "10.63.0.0/24");
    assert_eq!(cfg["Gateway"], "10.63.0.254");
    assert_eq!(cfg["IPRange"], "10.63.0.128/30");
    assert_eq!(n["Options"]["com.docker.network.bridge.name"], "br-parity");
    let members = n["Containers"].as_object().expect("Containers");
    assert_eq!(members.len(), 5, "{n}");
    let r1 = t.lab.ps_entry("r1");
    let m = &members[r1["id"].as_str().unwrap()];
    assert_eq!(m["Name"], "r1");
    assert_eq!(m["IPv4Address"], "10.63.0.129/24");
    assert_eq!(
        m["MacAddress"].as_str().unwrap_or_default(),
        md_tests::helpers::mac_of(&t.lab, "r1")
    );
    let text = t.md_ok(&["network", "inspect", "ranged"]);
    for want in [
        "Bridge:      br-parity",
        "IPRange:     10.63.0.128/30",
        "Container:   r1 ",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    // The default network too; and every field of `docker network inspect` is there.
    let d = t.inspect_net("bridge");
    for k in [
        "Name",
        "Id",
        "Created",
        "Scope",
        "Driver",
        "EnableIPv4",
        "EnableIPv6",
        "IPAM",
        "Internal",
        "Attachable",
        "Ingress",
        "ConfigFrom",
        "ConfigOnly",
        "Containers",
        "Options",
        "Labels",
    ] {
        assert!(d.get(k).is_some(), "{k} missing from {d}");
    }
    assert_eq!(d["IPAM"]["Config"][0]["Gateway"], GATEWAY);

    // rm takes the named bridge with it.
    for c in ["r0", "r1", "r2", "r3", "fixed"] {
        t.md_ok(&["stop", "-t", "1", c]);
    }
    t.md_ok(&["network", "rm", "ranged"]);
    assert!(!t.lab.links().iter().any(|l| l == "br-parity"));
}

/// `--mtu`: the bridge, both ends of each veth and the container's interface; packets up to it
/// flow (to the outside through the masquerade, and 9000-byte ones between containers of a
/// jumbo network), bigger ones do not leave the container unfragmented.
#[test]
fn mtu_inside_and_big_packets() {
    if !require_e2e() {
        return;
    }
    let t = PLab::new("parity-mtu");
    t.md_ok(&["network", "create", "tunnel", "--mtu", "1400"]);
    t.md_ok(&[
        "network",
        "create",
        "jumbo",
        "-o",
        "com.docker.network.driver.mtu=9000",
    ]);
    t.sleeper("small", &["--network", "tunnel"]);
    t.sleeper("j1", &["--network", "jumbo"]);
    t.sleeper("j2", &["--network", "jumbo"]);
    let mtu_of = |c: &str| {
        let out = t.exec_ok(c, &["ip", "-o", "link", "show", "dev", "eth0"]);
        out.split(" mtu ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(mtu_of("small"), "1400");
    assert_eq!(mtu_of("j1"), "9000");
    let host_mtu = |dev: &str| {
        let out = t.lab.host_ok(&["ip", "-o", "link", "show", "dev", dev]);
        out.split(" mtu ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(host_mtu(&t.lab.host_veth_of("small")), "1400");
    assert_eq!(host_mtu(&t.lab.host_veth_of("j2")), "9000");
    let bridges: Value = serde_json::from_str(&t.md_ok(&["network", "ls", "--json"])).unwrap();
    for (net, want) in [("tunnel", "1400"), ("jumbo", "9000")] {
        let br = bridges
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == net))
            .and_then(|n| n["bridge"].as_str())
            .unwrap_or_default()
            .to_string();
        assert_eq!(host_mtu(&br), want, "bridge {br} of {net}");
        assert_eq!(
            t.inspect_net(net)["Options"]["com.docker.network.driver.mtu"],
            want
        );
    }
    // 1400 bytes with DF leave; 1401 do not.
    let ping = |c: &str, size: &str, to: &str| {
        t.lab
            .exec(c, &["ping", "-M", "do", "-c1", "-W2", "-s", size, to])
    };
    let ok = ping("small", "1372", OUTSIDE_IP);
    assert!(
        ok.status.success(),
        "1400-byte ping out\n{}",
        show_output(&ok)
    );
    let too_big = ping("small", "1373", OUTSIDE_IP);
    assert!(
        !too_big.status.success(),
        "1401 bytes with DF must not leave"
    );
    assert!(
        (stdout_str(&too_big) + &md_tests::stderr_str(&too_big)).contains("mtu=1400"),
        "{}",
        show_output(&too_big)
    );
    // Jumbo frames across the bridge, both ways.
    let j2 = t.lab.ip_of("j2");
    let big = ping("j1", "8972", &j2);
    assert!(
        big.status.success(),
        "9000-byte ping j1 -> j2\n{}",
        show_output(&big)
    );
    // A bulk TCP transfer into the 1400-MTU container (segments sized to its MTU).
    let dir = t.lab.dir().join("www");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("blob"), vec![b'x'; 2 << 20]).unwrap();
    let _srv = t.lab.spawn_outside(&[
        "python3",
        "-m",
        "http.server",
        "8090",
        "--bind",
        OUTSIDE_IP,
        "--directory",
        dir.to_str().unwrap(),
    ]);
    t.lab.wait_listening_outside("tcp", 8090);
    let got = t.exec_ok(
        "small",
        &[
            "curl",
            "-s",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("http://{OUTSIDE_IP}:8090/blob"),
        ],
    );
    assert_eq!(got.trim(), (2u64 << 20).to_string());
}

/// `--internal`: no default route, nothing leaves (even with a route the container adds itself:
/// the uplink drops it as network isolation), nothing from outside comes in, no published ports,
/// no upstream DNS; the containers and the host still reach each other. Gateway mode
/// `isolated`: not even the host (the bridge has no address), names from /etc/hosts.
#[test]
fn internal_and_isolated_networks() {
    if !require_e2e() {
        return;
    }
    let t = PLab::new("parity-internal");
    let _http = t
        .lab
        .spawn_outside(&["python3", &fx("peer_http.py"), "8088", OUTSIDE_IP]);
    t.lab.wait_listening_outside("tcp", 8088);
    t.md_ok(&[
        "network",
        "create",
        "inner",
        "--internal",
        "--subnet",
        "10.64.0.0/24",
    ]);
    t.server("in1", &["--network", "inner"], &[80]);
    // Privileged: it may add a default route of its own.
    t.sleeper("in2", &["--network", "inner", "--privileged"]);
    assert_eq!(
        t.exec_ok("in2", &["ip", "route", "show", "default"]).trim(),
        "",
        "no default route on an internal network"
    );
    let in1 = t.lab.ip_of("in1");
    assert!(
        t.pings("in2", &in1),
        "containers of an internal network talk"
    );
    assert!(
        t.pings("in2", "10.64.0.1"),
        "and reach the host on the gateway"
    );
    let from_host = t
        .lab
        .host_ok(&["curl", "-s", "--max-time", "3", &format!("http://{in1}/")]);
    assert!(!from_host.is_empty(), "the host reaches them");
    // Another network's published port, at the host's address on the internal bridge: not a
    // way out either (Docker drops what an internal network forwards to another bridge).
    t.server("pub", &["-p", "8080:80"], &[80]);
    let out = t.lab.outside_ok(&[
        "curl",
        "-s",
        "--max-time",
        "3",
        &format!("http://{HOST_UPLINK_IP}:8080/"),
    ]);
    assert!(
        !out.trim().is_empty(),
        "the published port works from outside"
    );
    let in1_isolation =
        |lab: &Lab| counter(stats_row(&lab.stats(), "in1"), "drops.network-isolation");
    let before = in1_isolation(&t.lab);
    assert!(
        t.curl("in1", "10.64.0.1:8080").is_none(),
        "an internal container reached another network's published port"
    );
    assert!(
        in1_isolation(&t.lab) > before,
        "dropped at in1's veth as network isolation"
    );
    let isolation = |lab: &Lab| {
        lab.stats()["uplink"]["drops"]["network-isolation"]
            .as_u64()
            .unwrap_or(0)
    };
    t.md_ok(&["stop", "-t", "1", "pub"]);
    assert!(t.curl("in2", &format!("{OUTSIDE_IP}:8088")).is_none());
    // With a route of its own, the packets reach the uplink and are dropped there.
    t.exec_ok(
        "in2",
        &["ip", "route", "add", "default", "via", "10.64.0.1"],
    );
    let before = isolation(&t.lab);
    assert!(t.curl("in2", &format!("{OUTSIDE_IP}:8088")).is_none());
    assert!(!t.pings("in2", OUTSIDE_IP));
    assert!(
        isolation(&t.lab) > before,
        "dropped at the uplink as network isolation: {}",
        t.lab.stats()["uplink"]
    );
    // From outside, even with a route to it: nothing.
    t.lab
        .outside_ok(&["ip", "route", "add", "10.64.0.0/24", "via", HOST_UPLINK_IP]);
    let out = t
        .lab
        .outside(&["curl", "-s", "--max-time", "3", &format!("http://{in1}/")]);
    assert!(
        !out.status.success(),
        "outside reached an internal container"
    );
    // Names answered, nothing forwarded.
    assert_eq!(t.dig("in2", None, "in1", "A"), std::slice::from_ref(&in1));
    assert_eq!(t.dig_status("in2", None, OUTSIDE_NAME), "REFUSED");
    // No published ports.
    let before = t.snapshot();
    for opts in [
        &["--network", "inner", "-p", "8080:80"][..],
        &["--network", "inner", "-P", "--expose", "80"],
    ] {
        let out = t.md(&run_args("pub", opts, &["sleep", "600"]));
        let err = assert_one_line_error(&out, &format!("run {opts:?}"));
        assert!(err.contains("internal"), "{err}");
        assert_eq!(t.snapshot(), before, "residue of run {opts:?}");
    }

    // Isolated: internal, and the bridge has no address.
    t.md_ok(&[
        "network",
        "create",
        "iso",
        "--internal",
        "--subnet",
        "10.65.0.0/24",
        "--gateway-mode",
        "isolated",
    ]);
    t.sleeper("iso1", &["--network", "iso"]);
    t.sleeper("iso2", &["--network", "iso"]);
    let br = t.inspect_net("iso")["Options"]["com.docker.network.bridge.name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        t.lab
            .host_ok(&["ip", "-4", "-o", "addr", "show", "dev", &br])
            .trim(),
        "",
        "no address on an isolated network's bridge"
    );
    let iso2 = t.lab.ip_of("iso2");
    assert!(t.pings("iso1", &iso2));
    assert!(!t.pings("iso1", "10.65.0.1"), "the host is not there");
    let out = t.lab.host(&["ping", "-c1", "-W2", &iso2]);
    assert!(!out.status.success(), "nor does the host reach them");
    let hosts = t.exec_ok("iso1", &["cat", "/etc/hosts"]);
    assert!(hosts.contains(&format!("{iso2}\tiso2")), "{hosts}");
    assert_eq!(t.getent("iso1", "iso2"), BTreeSet::from([iso2]));
    assert!(!t.resolv_of("iso1").contains("nameserver"));
    let before = t.snapshot();
    let out = t.md(&run_args(
        "hg",
        &["--network", "iso", "--add-host", "h:host-gateway"],
        &["sleep", "600"],
    ));
    assert_one_line_error(&out, "host-gateway on an isolated network");
    assert_eq!(t.snapshot(), before);
}

/// Gateway mode `routed` (also as the Docker option): no masquerade (outside sees container
/// addresses), outside reaches a container directly but only on the ports it publishes (the
/// host port is not used) and by ping; containers of other networks reach those ports directly.
#[test]
fn gateway_mode_routed() {
    if !require_e2e() {
        return;
    }
    let t = PLab::new("parity-routed");
    let _http = t
        .lab
        .spawn_outside(&["python3", &fx("peer_http.py"), "8088", OUTSIDE_IP]);
    t.lab.wait_listening_outside("tcp", 8088);
    t.md_ok(&[
        "network",
        "create",
        "direct",
        "--subnet",
        "10.66.0.0/24",
        "-o",
        "com.docker.network.bridge.gateway_mode_ipv4=routed",
    ]);
    assert_eq!(
        t.inspect_net("direct")["Options"]["com.docker.network.bridge.gateway_mode_ipv4"],
        "routed"
    );
    // The outside routes the network's subnet through the host (direct routing).
    t.lab
        .outside_ok(&["ip", "route", "add", "10.66.0.0/24", "via", HOST_UPLINK_IP]);
    t.server("web", &["--network", "direct", "-p", "8080:80"], &[80, 81]);
    t.sleeper("cli", &["--network", "direct"]);
    t.sleeper("other", &[]);
    let web = t.lab.ip_of("web");
    assert_eq!(
        t.md_ok(&["port", "web"]).trim(),
        format!("80/tcp -> {web}:80"),
        "the container's own address and port"
    );
    // Out: the outside sees the container's address.
    let seen = t
        .curl("cli", &format!("{OUTSIDE_IP}:8088"))
        .expect("GET out");
    assert!(
        seen.starts_with(&format!("{}:", t.lab.ip_of("cli"))),
        "no masquerade: {seen}"
    );
    // In: the published port at the container's address, seen from the real client.
    let out = t.lab.outside_ok(&[
        "curl",
        "-s",
        "--max-time",
        "3",
        &format!("http://{web}:80/"),
    ]);
    assert_eq!(
        out.trim(),
        format!(
            "{OUTSIDE_IP}:{} {web}:80",
            out.split([':', ' ']).nth(1).unwrap_or("")
        ),
        "outside reaches web:80 directly, untranslated"
    );
    let unsolicited = |lab: &Lab| {
        lab.stats()["uplink"]["drops"]["unsolicited"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = unsolicited(&t.lab);
    let out = t.lab.outside(&[
        "curl",
        "-s",
        "--max-time",
        "3",
        &format!("http://{web}:81/"),
    ]);
    assert!(
        !out.status.success(),
        "81 is not published: {}",
        show_output(&out)
    );
    assert!(unsolicited(&t.lab) > before, "dropped at the uplink");
    // The host port is not used in routed mode.
    let out = t.lab.outside(&[
        "curl",
        "-s",
        "--max-time",
        "3",
        &format!("http://{HOST_UPLINK_IP}:8080/"),
    ]);
    assert!(
        !out.status.success(),
        "host port 8080 answered: {}",
        stdout_str(&out)
    );
    let ping = t.lab.outside(&["ping", "-c1", "-W2", &web]);
    assert!(
        ping.status.success(),
        "ICMP echo reaches a routed container"
    );
    // From another network: the published port directly, not the others.
    let seen = t
        .curl("other", &format!("{web}:80"))
        .expect("another network's container reaches the published port");
    assert!(seen.starts_with(&t.lab.ip_of("other")), "{seen}");
    assert!(t.curl("other", &format!("{web}:81")).is_none());
    // A nat network next to it still masquerades and hides its containers.
    let seen = t.curl("other", &format!("{OUTSIDE_IP}:8088")).unwrap();
    assert!(seen.starts_with(HOST_UPLINK_IP), "{seen}");
}

// ---- containers -----------------------------------------------------------------------------

/// `--mac-address`: the container's interface has it, traffic with it passes md's anti-spoofing,
/// inspect shows it; a MAC in use on the network is refused.
#[test]
fn mac_address() {
    if !require_e2e() {
        return;
    }
    let t = PLab::new("parity-mac");
    let _http = t
        .lab
        .spawn_outside(&["python3", &fx("peer_http.py"), "8088", OUTSIDE_IP]);
    t.lab.wait_listening_outside("tcp", 8088);
    t.server("m1", &["--mac-address", "02:42:DE:AD:BE:EF"], &[80]);
    t.sleeper("m2", &[]);
    assert_eq!(md_tests::helpers::mac_of(&t.lab, "m1"), "02:42:de:ad:be:ef");
    let inspect: Value = serde_json::from_str(&t.md_ok(&["inspect", "m1", "--json"])).unwrap();
    assert_eq!(
        inspect["NetworkSettings"]["Networks"]["bridge"]["MacAddress"],
        "02:42:de:ad:be:ef"
    );
    assert!(t.pings("m1", GATEWAY));
    assert!(t
        .curl("m1", &format!("{OUTSIDE_IP}:8088"))
        .is_some_and(|s| s.starts_with(HOST_UPLINK_IP)));
    let m1 = t.lab.ip_of("m1");
    assert!(t.curl("m2", &m1).is_some(), "m2 reaches m1 at its MAC");
    let before = t.snapshot();
    let out = t.md(&run_args(
        "m3",
        &["--mac-address", "02:42:de:ad:be:ef"],
        &["sleep", "600"],
    ));
    let err = assert_one_line_error(&out, "a MAC in use");
    assert!(err.contains("already in use"), "{err}");
    assert_eq!(t.snapshot(), before);
}

/// `md-user port` prints what `docker port` does; `-p 80`, `-p 127.0.0.1::81` and `-P` with
/// `--expose` get random free host ports from the ephemeral range, different for each
/// container, and traffic through them arrives.
#[test]
fn port_command_and_random_host_ports() {
    if !require_e2e() {
        return;
    }
    let t = PLab::new("parity-port");
    t.server(
        "a",
        &[
            "-p",
            "8080:80",
            "-p",
            "82",
            "-p",
            "127.0.0.1::81",
            "-P",
            "--expose",
            "83",
            "--expose",
            "84/udp",
            "--expose",
            "80",
        ],
        &[80, 81, 82, 83],
    );
    t.server("b", &["-p", "82"], &[82]);
    let lines: Vec<String> = t
        .md_ok(&["port", "a"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 5, "{lines:?}");
    let host_port = |want: &str| -> u16 {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(want))
            .and_then(|r| r.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no {want:?} in {lines:?}"))
    };
    assert_eq!(
        host_port("80/tcp -> 0.0.0.0:"),
        8080,
        "-P does not republish 80"
    );
    let p81 = host_port("81/tcp -> 127.0.0.1:");
    let p82 = host_port("82/tcp -> 0.0.0.0:");
    let p83 = host_port("83/tcp -> 0.0.0.0:");
    let p84 = host_port("84/udp -> 0.0.0.0:");
    let range = t
        .lab
        .host_ok(&["cat", "/proc/sys/net/ipv4/ip_local_port_range"]);
    let (lo, hi): (u16, u16) = {
        let v: Vec<u16> = range
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        (v[0], v[1])
    };
    for p in [p81, p82, p83, p84] {
        assert!(
            (lo..=hi).contains(&p),
            "{p} in the ephemeral range {lo}-{hi}"
        );
    }
    // Sorted as Docker sorts: by container port, naturally.
    let order: Vec<&str> = lines
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(order, ["80/tcp", "81/tcp", "82/tcp", "83/tcp", "84/udp"]);
    assert_eq!(
        t.md_ok(&["port", "a", "82"]).trim(),
        format!("0.0.0.0:{p82}")
    );
    assert_eq!(
        t.md_ok(&["port", "a", "84/udp"]).trim(),
        format!("0.0.0.0:{p84}")
    );
    let out = t.md(&["port", "a", "85"]);
    assert_one_line_error(&out, "port a 85");
    let pb = t
        .md_ok(&["port", "b", "82"])
        .trim()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert_ne!(pb, p82.to_string(), "two containers, two random ports");
    // Traffic through the random ports: from outside, from the host (loopback-bound one).
    let a = t.lab.ip_of("a");
    for (p, port) in [(p82, 82), (p83, 83)] {
        let out = t.lab.outside_ok(&[
            "curl",
            "-s",
            "--max-time",
            "3",
            &format!("http://{HOST_UPLINK_IP}:{p}/"),
        ]);
        assert!(
            out.trim().ends_with(&format!("{a}:{port}")),
            "outside -> {p} reaches a:{port}: {out}"
        );
    }
    let out = t.lab.host_ok(&[
        "curl",
        "-s",
        "--max-time",
        "3",
        &format!("http://127.0.0.1:{p81}/"),
    ]);
    assert!(out.trim().ends_with(&format!("{a}:81")), "{out}");
    let out = t.lab.outside(&[
        "curl",
        "-s",
        "--max-time",
        "3",
        &format!("http://{HOST_UPLINK_IP}:{p81}/"),
    ]);
    assert!(
        !out.status.success(),
        "a loopback-bound random port is not reachable from outside"
    );
    // The random ports are published like any: kept out of the host's ephemeral use.
    let reserved = t
        .lab
        .host_ok(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]);
    let reserved = md_tests::helpers::parse_port_ranges(&reserved);
    for p in [p81, p82, p83, p84] {
        assert!(reserved.contains(&p), "{p} reserved: {reserved:?}");
    }
}

/// Bad values get one line and change nothing: every new flag and option.
#[test]
fn bad_values_leave_nothing() {
    if !require_e2e() {
        return;
    }
    let t = PLab::new("parity-bad");
    t.sleeper("keep", &["--mac-address", "02:42:00:00:00:99"]);
    t.md_ok(&[
        "network",
        "create",
        "inner",
        "--internal",
        "--subnet",
        "10.67.0.0/24",
    ]);
    let before = t.snapshot();
    let sleep = ["sleep", "600"];
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "mtu too small",
            vec!["network", "create", "n1", "--mtu", "67"],
        ),
        (
            "mtu not a number",
            vec![
                "network",
                "create",
                "n1",
                "-o",
                "com.docker.network.driver.mtu=big",
            ],
        ),
        (
            "mtu flag and option disagree",
            vec![
                "network",
                "create",
                "n1",
                "--mtu",
                "1400",
                "-o",
                "com.docker.network.driver.mtu=1500",
            ],
        ),
        (
            "gateway outside the subnet",
            vec![
                "network",
                "create",
                "n1",
                "--subnet",
                "10.68.0.0/24",
                "--gateway",
                "10.69.0.1",
            ],
        ),
        (
            "gateway without a subnet",
            vec!["network", "create", "n1", "--gateway", "10.68.0.1"],
        ),
        (
            "gateway the broadcast address",
            vec![
                "network",
                "create",
                "n1",
                "--subnet",
                "10.68.0.0/24",
                "--gateway",
                "10.68.0.255",
            ],
        ),
        (
            "ip-range outside the subnet",
            vec![
                "network",
                "create",
                "n1",
                "--subnet",
                "10.68.0.0/24",
                "--ip-range",
                "10.69.0.0/25",
            ],
        ),
        (
            "ip-range not CIDR",
            vec![
                "network",
                "create",
                "n1",
                "--subnet",
                "10.68.0.0/24",
                "--ip-range",
                "10.68.0.0",
            ],
        ),
        (
            "unknown option",
            vec![
                "network",
                "create",
                "n1",
                "-o",
                "com.docker.network.bridge.enable_icc=false",
            ],
        ),
        (
            "option without a value",
            vec!["network", "create", "n1", "-o", "mtu"],
        ),
        (
            "isolated without --internal",
            vec!["network", "create", "n1", "--gateway-mode", "isolated"],
        ),
        (
            "unknown gateway mode",
            vec![
                "network",
                "create",
                "n1",
                "--gateway-mode",
                "nat-unprotected",
            ],
        ),
        (
            "routed and internal",
            vec![
                "network",
                "create",
                "n1",
                "--internal",
                "--gateway-mode",
                "routed",
            ],
        ),
        (
            "bridge name of an existing interface",
            vec![
                "network",
                "create",
                "n1",
                "-o",
                "com.docker.network.bridge.name=up0",
            ],
        ),
        (
            "bridge name of another network",
            vec![
                "network",
                "create",
                "n1",
                "-o",
                "com.docker.network.bridge.name=md0",
            ],
        ),
        (
            "bridge name too long",
            vec![
                "network",
                "create",
                "n1",
                "-o",
                "com.docker.network.bridge.name=bridge-name-too-long",
            ],
        ),
        (
            "bad MAC",
            run_args("bad", &["--mac-address", "02:42:zz:00:00:01"], &sleep),
        ),
        (
            "multicast MAC",
            run_args("bad", &["--mac-address", "01:00:5e:00:00:01"], &sleep),
        ),
        (
            "MAC in use",
            run_args("bad", &["--mac-address", "02:42:00:00:00:99"], &sleep),
        ),
        (
            "--add-host without an address",
            run_args("bad", &["--add-host", "db"], &sleep),
        ),
        (
            "--add-host with a bad address",
            run_args("bad", &["--add-host", "db:10.0.0"], &sleep),
        ),
        (
            "--add-host host-gateway without a network",
            run_args(
                "bad",
                &["--network", "none", "--add-host", "h:host-gateway"],
                &sleep,
            ),
        ),
        (
            "--add-host with --network host",
            run_args(
                "bad",
                &["--network", "host", "--add-host", "h:10.0.0.1"],
                &sleep,
            ),
        ),
        (
            "--dns not an address",
            run_args("bad", &["--dns", "dns.example"], &sleep),
        ),
        (
            "--dns loopback",
            run_args("bad", &["--dns", "127.0.0.53"], &sleep),
        ),
        (
            "--dns-search not a domain",
            run_args("bad", &["--dns-search", "a b"], &sleep),
        ),
        (
            "--dns-option with ndots not a number",
            run_args("bad", &["--dns-option", "ndots:many"], &sleep),
        ),
        (
            "--dns with --network none",
            run_args("bad", &["--network", "none", "--dns", "192.0.2.2"], &sleep),
        ),
        (
            "--network-alias not a name",
            run_args("bad", &["--network-alias", "we b"], &sleep),
        ),
        (
            "--network-alias with --network host",
            run_args(
                "bad",
                &["--network", "host", "--network-alias", "x"],
                &sleep,
            ),
        ),
        (
            "--expose not a port",
            run_args("bad", &["--expose", "http"], &sleep),
        ),
        (
            "-p on an internal network",
            run_args("bad", &["--network", "inner", "-p", "80"], &sleep),
        ),
        (
            // md's gateway is a host address, but answers would leave with an md source.
            "-p on the default network's gateway",
            run_args("bad", &["-p", "172.18.0.1:8080:80"], &sleep),
        ),
        (
            "-p on an address inside an md network",
            run_args("bad", &["-p", "10.67.0.9:8080:80"], &sleep),
        ),
        (
            "-p with an empty host port",
            run_args("bad", &["-p", ":80"], &sleep),
        ),
        (
            "connect --alias not a name",
            vec!["network", "connect", "inner", "keep", "--alias", "a b"],
        ),
        ("port of nobody", vec!["port", "nobody"]),
        ("port with a bad protocol", vec!["port", "keep", "80/sctp"]),
        (
            "inspect of no network",
            vec!["network", "inspect", "nosuch"],
        ),
    ];
    for (what, args) in &cases {
        let out = t.md(args);
        assert_one_line_error(&out, what);
        assert_eq!(t.snapshot(), before, "residue after a refused {what}");
    }
    // Still working after all that.
    t.sleeper("good", &["-p", "80", "--network-alias", "fine"]);
}
