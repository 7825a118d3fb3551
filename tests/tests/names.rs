//! Names and network modes (issue 9): each container's own /etc/hosts and /etc/resolv.conf, the
//! per-network resolver (container names within a network, everything else forwarded to the
//! upstream of `--resolv-conf`), `--network none|host|container:NAME`, user-defined networks
//! isolated from each other until a container is connected to both, and bad input refused
//! without leftovers.
//!
//! Every lab runs an upstream resolver (dnsmasq) in the outside namespace that knows exactly
//! one name, `outside.test` → 192.0.2.2, and refuses everything else; md-user is pointed at it
//! with a resolv.conf in the lab's temp dir. So a name answered with an address came either from
//! md's resolver (container names) or through it from the upstream (outside.test), and a name md
//! must not answer comes back REFUSED from the upstream (proof it was forwarded, not dropped).
//!
//! Container names avoid single letters: `dig @srv a` would read "a" as a record type.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use md_tests::helpers::{
    assert_one_line_error, counter, fx, md_resolv, run_args, upstream_resolver, OUTSIDE_NAME,
};
use md_tests::process::{alive, ns_inode, run_timeout, show_output};
use md_tests::{
    is_md_veth, require_e2e, require_tools, stdout_str, wait_for, wait_until, Bg, Lab, GATEWAY,
    HOST_UPLINK_IP, MD_TIMEOUT, OUTSIDE_IP,
};
use serde_json::Value;

/// What a resolver must finish within after a network's last container stops.
const RESOLVER_GONE: Duration = Duration::from_millis(1500);
const HTTP_PORT: u16 = 80;

/// The host's /etc/hosts and /etc/resolv.conf, read when the test starts: md must never write
/// them (containers get their own copies, bind-mounted in private mount namespaces).
struct HostFiles {
    hosts: Vec<u8>,
    resolv: Vec<u8>,
}

impl HostFiles {
    fn read() -> HostFiles {
        let r = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("reading {p}: {e}"));
        HostFiles {
            hosts: r("/etc/hosts"),
            resolv: r("/etc/resolv.conf"),
        }
    }

    #[track_caller]
    fn assert_unchanged(&self) {
        let now = HostFiles::read();
        assert!(
            now.hosts == self.hosts,
            "the host's /etc/hosts changed during the test:\n--- before ---\n{}--- now ---\n{}",
            String::from_utf8_lossy(&self.hosts),
            String::from_utf8_lossy(&now.hosts)
        );
        assert!(
            now.resolv == self.resolv,
            "the host's /etc/resolv.conf changed during the test:\n--- before ---\n{}--- now ---\n{}",
            String::from_utf8_lossy(&self.resolv),
            String::from_utf8_lossy(&now.resolv)
        );
    }
}

/// A lab with an upstream resolver outside and md-user pointed at it.
struct NLab {
    // Dropped before the lab (fields drop in order); the lab kills it anyway.
    upstream: Bg,
    resolv: PathBuf,
    host_files: HostFiles,
    lab: Lab,
}

impl NLab {
    #[track_caller]
    fn new(name: &str) -> NLab {
        require_tools(&["dig", "dnsmasq", "getent", "ping", "curl", "python3", "ss"]);
        let host_files = HostFiles::read();
        let lab = Lab::new(name);
        let (upstream, resolv) = upstream_resolver(&lab);
        NLab {
            upstream,
            resolv,
            host_files,
            lab,
        }
    }

    /// md-user with `MD_RESOLV_CONF` set to the lab's resolv.conf.
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
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `md-user run -d --name NAME OPTS... -- CMD...`; asserts it printed the name.
    #[track_caller]
    fn run_d(&self, name: &str, opts: &[&str], cmd: &[&str]) {
        let out = self.md_ok(&run_args(name, opts, cmd));
        assert_eq!(
            out,
            format!("{name}\n"),
            "run -d {name} must print the name"
        );
    }

    #[track_caller]
    fn sleeper(&self, name: &str, opts: &[&str]) {
        self.run_d(name, opts, &["sleep", "600"]);
    }

    /// A container serving peer_http.py on port 80 (bound to `bind`), once it listens.
    #[track_caller]
    fn server(&self, name: &str, opts: &[&str], bind: &str) {
        let port = HTTP_PORT.to_string();
        self.run_d(name, opts, &["python3", &fx("peer_http.py"), &port, bind]);
        self.lab.wait_listening_in(name, "tcp", HTTP_PORT);
    }

    #[track_caller]
    fn exec_ok(&self, c: &str, args: &[&str]) -> String {
        self.lab.exec_ok(c, args)
    }

    /// `dig` inside container `c`, asking `server` (None: the container's resolv.conf).
    #[track_caller]
    fn dig(&self, c: &str, server: Option<&str>, name: &str, qtype: &str) -> Dig {
        self.dig_with(c, server, name, qtype, &[])
    }

    /// [`NLab::dig`] with more options (`+tcp`).
    #[track_caller]
    fn dig_with(
        &self,
        c: &str,
        server: Option<&str>,
        name: &str,
        qtype: &str,
        opts: &[&str],
    ) -> Dig {
        let at = server.map(|s| format!("@{s}"));
        let mut args = vec![
            "dig",
            "+noall",
            "+comments",
            "+answer",
            "+time=2",
            "+tries=2",
        ];
        args.extend_from_slice(opts);
        if let Some(at) = &at {
            args.push(at);
        }
        args.extend_from_slice(&[name, qtype]);
        let out = self.lab.exec(c, &args);
        let what = format!("[{c}] {}", args.join(" "));
        assert!(
            out.status.success(),
            "{what}: no answer at all (a resolver must answer, even if only to say no)\n{}",
            show_output(&out)
        );
        Dig::parse(&stdout_str(&out), &what)
    }

    /// `name` resolves, for `c` through `server`, to exactly `ip`.
    #[track_caller]
    fn assert_resolves(&self, c: &str, server: &str, name: &str, ip: &str) {
        let d = self.dig(c, Some(server), name, "A");
        assert_eq!(
            d.a,
            [ip.parse::<Ipv4Addr>().unwrap()],
            "{c} asking {server} for {name}: {d:?}"
        );
    }

    /// `name` does not resolve for `c` through `server`: md's resolver did not answer it, and
    /// the upstream (which knows only outside.test) refused it.
    #[track_caller]
    fn assert_not_resolved(&self, c: &str, server: &str, name: &str) {
        let d = self.dig(c, Some(server), name, "A");
        assert!(
            d.a.is_empty() && d.status != "NOERROR",
            "{c} asking {server} for {name} must get no address (it is not {c}'s to know): {d:?}"
        );
    }

    /// `getent -s files hosts NAME` in `c`: the address the container's /etc/hosts gives.
    #[track_caller]
    fn hosts_lookup(&self, c: &str, name: &str) -> Option<String> {
        let out = self.lab.exec(c, &["getent", "-s", "files", "hosts", name]);
        match out.status.code() {
            Some(0) => Some(
                stdout_str(&out)
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            Some(2) => None,
            _ => panic!("[{c}] getent -s files hosts {name}\n{}", show_output(&out)),
        }
    }

    /// `getent ahostsv4 NAME` in `c` (files, then DNS, as any program would): the addresses.
    #[track_caller]
    fn getent(&self, c: &str, name: &str) -> BTreeSet<String> {
        let out = self.lab.exec(c, &["getent", "ahostsv4", name]);
        assert!(
            out.status.success(),
            "[{c}] getent ahostsv4 {name}\n{}",
            show_output(&out)
        );
        stdout_str(&out)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// The container's /etc/hosts as (address, names) lines.
    #[track_caller]
    fn hosts_of(&self, c: &str) -> Vec<(String, Vec<String>)> {
        parse_hosts(&self.exec_ok(c, &["cat", "/etc/hosts"]))
    }

    /// `nameserver` lines of the container's /etc/resolv.conf.
    #[track_caller]
    fn nameservers_of(&self, c: &str) -> Vec<String> {
        self.exec_ok(c, &["cat", "/etc/resolv.conf"])
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .map(|s| s.trim().to_string())
            .collect()
    }

    /// True if `ping` from `c` to `ip` gets a reply.
    #[track_caller]
    fn pings(&self, c: &str, ip: &str) -> bool {
        self.lab
            .exec(c, &["ping", "-c1", "-W2", ip])
            .status
            .success()
    }

    /// A GET of `http://IP/` from `c`: Some(client address the server saw) or None.
    #[track_caller]
    fn http_peer(&self, c: &str, ip: &str) -> Option<String> {
        let url = format!("http://{ip}:{HTTP_PORT}/");
        let out = self.lab.exec(c, &["curl", "-sS", "--max-time", "3", &url]);
        out.status.success().then(|| {
            let s = stdout_str(&out);
            s.rsplit_once(':')
                .map(|(ip, _)| ip.to_string())
                .unwrap_or(s)
        })
    }

    /// `network ls --json`, parsed.
    #[track_caller]
    fn networks(&self) -> Vec<Value> {
        let out = self.md_ok(&["network", "ls", "--json"]);
        match serde_json::from_str(&out) {
            Ok(Value::Array(v)) => v,
            _ => panic!("network ls --json is not a JSON array:\n{out}"),
        }
    }

    #[track_caller]
    fn network(&self, name: &str) -> Option<Value> {
        self.networks()
            .into_iter()
            .find(|n| n["name"].as_str() == Some(name))
    }

    /// The containers `network ls` lists on `name`.
    #[track_caller]
    fn members(&self, name: &str) -> BTreeSet<String> {
        let n = self
            .network(name)
            .unwrap_or_else(|| panic!("network ls does not list {name}"));
        n["containers"]
            .as_array()
            .unwrap_or_else(|| panic!("network {name} has no containers array: {n}"))
            .iter()
            .map(|c| c.as_str().expect("container name").to_string())
            .collect()
    }

    /// Sum of every container's "network-isolation" drops (`stats --json`).
    #[track_caller]
    fn isolation_drops(&self) -> u64 {
        let s = self.lab.stats();
        s["containers"]
            .as_array()
            .unwrap_or_else(|| panic!("stats --json has no containers array: {s}"))
            .iter()
            .map(|c| counter(c, "drops.network-isolation"))
            .sum()
    }

    /// `(network, ip)` of every interface `ps` shows for `name`.
    #[track_caller]
    fn ps_networks(&self, name: &str) -> Vec<(String, String)> {
        let c = self.lab.ps_entry(name);
        c["networks"]
            .as_array()
            .unwrap_or_else(|| panic!("ps entry of {name} has no networks array: {c}"))
            .iter()
            .map(|n| {
                (
                    n["network"].as_str().unwrap_or_default().to_string(),
                    n["ip"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The lab's resolver processes for `network` (live, from /proc: what `ps` shows).
    fn resolvers(&self, network: &str) -> Vec<i32> {
        resolver_pids(self.lab.state_dir(), Some(network))
    }

    /// Everything a refused command must leave as it was.
    #[track_caller]
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            links: self.lab.links(),
            ps: self.lab.ps(),
            networks: self.networks(),
            resolvers: resolver_pids(self.lab.state_dir(), None),
            state_files: files_under(self.lab.state_dir()),
        }
    }

    /// The dnsmasq log (its queries).
    fn upstream_log(&self) -> String {
        self.upstream.stdout() + &self.upstream.stderr()
    }
}

/// What `dig +noall +comments +answer` said.
#[derive(Debug)]
struct Dig {
    status: String,
    answers: usize,
    a: Vec<Ipv4Addr>,
}

impl Dig {
    #[track_caller]
    fn parse(s: &str, what: &str) -> Dig {
        let field = |key: &str| {
            s.split_once(key).map(|(_, rest)| {
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect::<String>()
            })
        };
        let status = field("status: ").unwrap_or_else(|| panic!("{what}: no status in:\n{s}"));
        let answers = field("ANSWER: ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no ANSWER count in:\n{s}"));
        let a = s
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 5 && f[3] == "A").then(|| f[4].parse().ok())?
            })
            .collect();
        Dig { status, answers, a }
    }
}

fn parse_hosts(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let ip = f.next()?.to_string();
            Some((ip, f.map(str::to_string).collect()))
        })
        .collect()
}

/// `whose` /etc/hosts (parsed) gives `name` exactly one address, `ip`.
#[track_caller]
fn assert_hosts_entry(h: &[(String, Vec<String>)], name: &str, ip: &str, whose: &str) {
    assert_eq!(
        hosts_addrs(h, name),
        [ip.to_string()],
        "{name} in {whose}'s /etc/hosts: {h:?}"
    );
}

/// The addresses a hosts file gives `name`.
fn hosts_addrs(hosts: &[(String, Vec<String>)], name: &str) -> Vec<String> {
    hosts
        .iter()
        .filter(|(_, names)| names.iter().any(|n| n == name))
        .map(|(ip, _)| ip.clone())
        .collect()
}

/// Live `md-user ... __dns --network NET ...` processes of the md whose state dir is `state`
/// (labs run in parallel: the state dir tells ours apart), for one network or all.
fn resolver_pids(state: &Path, network: Option<&str>) -> Vec<i32> {
    let state = state.to_string_lossy();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = raw
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let pair = |k: &str, v: &str| args.windows(2).any(|w| w[0] == k && w[1] == v);
            args.iter().any(|a| a == "__dns")
                && pair("--state-dir", &state)
                && network.is_none_or(|n| pair("--network", n))
                && alive(pid)
        })
        .collect();
    pids.sort();
    pids
}

/// Files under `dir` (relative paths), lock files excluded; empty if it does not exist.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(dir)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(format!("{rel}/"));
                stack.push(p);
            } else if !(rel == "lock" || rel.ends_with(".lock")) {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    links: Vec<String>,
    ps: Vec<Value>,
    networks: Vec<Value>,
    resolvers: Vec<i32>,
    state_files: Vec<String>,
}

/// Failure with exactly one non-empty line on stderr that mentions `token`.
#[track_caller]
fn assert_refused(out: &Output, what: &str, token: &str) {
    let err = assert_one_line_error(out, what);
    assert!(
        err.contains(token),
        "{what}: the error should name {token:?}\n{}",
        show_output(out)
    );
}

fn link_names(ip_br_link: &str) -> BTreeSet<String> {
    ip_br_link
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// "net:[INODE]" of a network namespace file.
fn netns_id(path: impl AsRef<Path>) -> String {
    let p = path.as_ref();
    let ino = ns_inode(p).unwrap_or_else(|| panic!("no namespace at {}", p.display()));
    format!("net:[{ino}]")
}

// ---- tests -----------------------------------------------------------------------------------

#[test]
fn names_resolve_both_ways_and_follow_a_restart_with_a_new_address() {
    if !require_e2e() {
        return;
    }
    let t = NLab::new("names");
    t.sleeper("web1", &[]);
    t.sleeper("db1", &["--hostname", "dbhost"]);
    let web = t.lab.ip_of("web1");
    let db = t.lab.ip_of("db1");
    assert_ne!(web, db);

    // Hostnames: the name by default, --hostname when given; ps shows both.
    assert_eq!(t.exec_ok("web1", &["hostname"]).trim(), "web1");
    assert_eq!(t.exec_ok("db1", &["hostname"]).trim(), "dbhost");
    let ps_db = t.lab.container("db1").expect("db1 in ps");
    assert_eq!(ps_db["hostname"], "dbhost", "ps entry of db1: {ps_db}");
    assert_eq!(ps_db["network"], "bridge", "ps entry of db1: {ps_db}");
    assert_eq!(t.ps_networks("db1"), [("bridge".to_string(), db.clone())]);
    assert_eq!(t.lab.container("web1").unwrap()["hostname"], "web1");

    // Each container's own resolv.conf points at its network's resolver.
    for c in ["web1", "db1"] {
        assert_eq!(t.nameservers_of(c), [GATEWAY], "{c}'s /etc/resolv.conf");
    }

    // Each container's own hosts file: localhost, itself, its peer.
    let h = t.hosts_of("web1");
    assert_eq!(
        hosts_addrs(&h, "localhost").first().map(String::as_str),
        Some("127.0.0.1")
    );
    assert_hosts_entry(&h, "web1", &web, "web1");
    assert_hosts_entry(&h, "db1", &db, "web1");
    assert_hosts_entry(&h, "dbhost", &db, "web1");
    let h = t.hosts_of("db1");
    assert_hosts_entry(&h, "dbhost", &db, "db1");
    assert_hosts_entry(&h, "db1", &db, "db1");
    assert_hosts_entry(&h, "web1", &web, "db1");

    // Through /etc/hosts only (getent -s files), both ways.
    assert_eq!(t.hosts_lookup("web1", "db1"), Some(db.clone()));
    assert_eq!(t.hosts_lookup("web1", "dbhost"), Some(db.clone()));
    assert_eq!(t.hosts_lookup("db1", "web1"), Some(web.clone()));

    // Through the resolver only (dig @gateway), both ways, names and hostnames.
    t.assert_resolves("web1", GATEWAY, "db1", &db);
    t.assert_resolves("web1", GATEWAY, "dbhost", &db);
    t.assert_resolves("db1", GATEWAY, "web1", &web);
    t.assert_resolves("db1", GATEWAY, "db1", &db);
    // dig without @: the server of the container's own resolv.conf.
    let d = t.dig("web1", None, "db1", "A");
    assert_eq!(
        d.a,
        [db.parse::<Ipv4Addr>().unwrap()],
        "web1: dig db1 {d:?}"
    );
    // AAAA of a container: the name exists without an IPv6 address.
    let d = t.dig("web1", Some(GATEWAY), "db1", "AAAA");
    assert!(
        d.status == "NOERROR" && d.answers == 0,
        "AAAA db1 must be NOERROR with no answer: {d:?}"
    );
    // What any program sees (files, then DNS).
    assert_eq!(t.getent("web1", "db1"), BTreeSet::from([db.clone()]));
    assert_eq!(t.getent("db1", "web1"), BTreeSet::from([web.clone()]));

    // Restart with a new address: db1 goes, filler takes its address, db1 comes back.
    t.md_ok(&["stop", "db1"]);
    let h = t.hosts_of("web1");
    assert!(
        hosts_addrs(&h, "db1").is_empty() && hosts_addrs(&h, "dbhost").is_empty(),
        "web1's /etc/hosts still lists the stopped db1: {h:?}"
    );
    t.assert_not_resolved("web1", GATEWAY, "db1");
    t.sleeper("filler", &["--ip", &db]);
    assert_eq!(
        t.lab.ip_of("filler"),
        db,
        "filler must get the --ip it asked for"
    );
    t.sleeper("db1", &["--hostname", "dbhost"]);
    let db_new = t.lab.ip_of("db1");
    assert_ne!(db_new, db, "db1 came back on the address filler holds");

    // web1 has been running all along: its resolver and its (bind-mounted) hosts file follow.
    t.assert_resolves("web1", GATEWAY, "db1", &db_new);
    t.assert_resolves("web1", GATEWAY, "dbhost", &db_new);
    t.assert_resolves("web1", GATEWAY, "filler", &db);
    let h = t.hosts_of("web1");
    assert_hosts_entry(&h, "db1", &db_new, "web1");
    assert_hosts_entry(&h, "filler", &db, "web1");
    assert_eq!(t.hosts_lookup("web1", "db1"), Some(db_new.clone()));
    assert_eq!(t.getent("web1", "db1"), BTreeSet::from([db_new.clone()]));
    // And the new db1 knows the others.
    t.assert_resolves("db1", GATEWAY, "web1", &web);
    assert_eq!(t.hosts_lookup("db1", "web1"), Some(web.clone()));
    assert_eq!(t.hosts_lookup("db1", "filler"), Some(db.clone()));
    assert_eq!(t.hosts_lookup("filler", "db1"), Some(db_new.clone()));

    t.host_files.assert_unchanged();
}

#[test]
fn outside_name_is_forwarded_to_the_upstream() {
    if !require_e2e() {
        return;
    }
    let t = NLab::new("upstream");
    // The global option before the subcommand (instead of MD_RESOLV_CONF).
    let resolv = t.resolv.to_string_lossy().into_owned();
    let mut c = t.lab.host_md_cmd(
        t.lab.md_bin(),
        &[
            "--resolv-conf",
            &resolv,
            "run",
            "-d",
            "--name",
            "web1",
            "--",
            "sleep",
            "600",
        ],
    );
    c.env_remove("MD_RESOLV_CONF");
    let out = run_timeout(&mut c, MD_TIMEOUT);
    assert!(
        out.status.success(),
        "md-user --resolv-conf {resolv} run ...\n{}",
        show_output(&out)
    );

    t.assert_resolves("web1", GATEWAY, OUTSIDE_NAME, OUTSIDE_IP);
    // The resolver asked the upstream from the host (the lab's host has no other reason to).
    wait_until(
        "the upstream logs a query for outside.test from the host",
        Duration::from_secs(5),
        || {
            t.upstream_log()
                .contains(&format!("query[A] {OUTSIDE_NAME} from {HOST_UPLINK_IP}"))
        },
    );
    // Through the container's resolv.conf, as any program resolves.
    assert_eq!(
        t.getent("web1", OUTSIDE_NAME),
        BTreeSet::from([OUTSIDE_IP.to_string()])
    );
    // A name neither md nor the upstream knows: the upstream's own answer comes back.
    let d = t.dig("web1", Some(GATEWAY), "nosuch.test", "A");
    assert!(
        d.a.is_empty() && d.status == "REFUSED",
        "nosuch.test: expected the upstream's REFUSED relayed, got {d:?}"
    );
    t.host_files.assert_unchanged();
}

#[test]
fn network_none_has_only_loopback() {
    if !require_e2e() {
        return;
    }
    let t = NLab::new("mode-none");
    t.sleeper("lone", &["--network", "none"]);
    let links = t.exec_ok("lone", &["ip", "-br", "link"]);
    assert_eq!(
        link_names(&links),
        BTreeSet::from(["lo".to_string()]),
        "a --network none container has only lo:\n{links}"
    );
    let addrs = t.exec_ok("lone", &["ip", "-4", "-o", "addr"]);
    assert!(
        addrs.lines().all(|l| l.contains(" lo ")) && addrs.contains("127.0.0.1"),
        "addresses of lone: {addrs}"
    );
    assert_eq!(
        t.exec_ok("lone", &["ip", "-4", "route"]).trim(),
        "",
        "routes of lone"
    );
    assert!(
        !t.lab
            .exec("lone", &["ping", "-c1", "-W1", GATEWAY])
            .status
            .success(),
        "lone reached {GATEWAY}"
    );
    assert_eq!(t.exec_ok("lone", &["hostname"]).trim(), "lone");
    let c = t.lab.container("lone").expect("lone in ps");
    assert_eq!(c["network"], "none", "ps entry: {c}");
    assert_eq!(c["networks"], serde_json::json!([]), "ps entry: {c}");
    assert_eq!(t.lab.md_veths(), Vec::<String>::new(), "a veth for lone");
    assert!(
        t.resolvers("bridge").is_empty(),
        "a resolver for a none container"
    );
    t.host_files.assert_unchanged();
}

#[test]
fn network_host_uses_the_hosts_namespace() {
    if !require_e2e() {
        return;
    }
    let t = NLab::new("mode-host");
    t.sleeper("web1", &[]); // so md0 exists
    let veths = t.lab.md_veths();
    t.sleeper("hostc", &["--network", "host"]);

    let inside = link_names(&t.exec_ok("hostc", &["ip", "-br", "link"]));
    let host: BTreeSet<String> = t.lab.links().into_iter().collect();
    assert!(
        inside.contains("up0") && inside.contains("md0"),
        "hostc must see up0 and md0: {inside:?}"
    );
    assert_eq!(inside, host, "hostc's links vs the host namespace's");
    let host_ns = Path::new("/run/netns").join(t.lab.host_ns());
    assert_eq!(
        t.exec_ok("hostc", &["readlink", "/proc/self/ns/net"])
            .trim(),
        netns_id(&host_ns),
        "hostc is not in the host's network namespace"
    );
    assert!(
        t.pings("hostc", OUTSIDE_IP),
        "hostc cannot reach {OUTSIDE_IP}"
    );
    assert_eq!(
        t.lab.md_veths(),
        veths,
        "--network host must not create a veth"
    );
    let c = t.lab.container("hostc").expect("hostc in ps");
    assert_eq!(c["network"], "host", "ps entry: {c}");
    assert_eq!(c["networks"], serde_json::json!([]), "ps entry: {c}");
    t.host_files.assert_unchanged();
}

#[test]
fn network_container_shares_its_network_and_hostname() {
    if !require_e2e() {
        return;
    }
    let t = NLab::new("mode-container");
    t.server("srv", &[], "127.0.0.1");
    let veths = t.lab.md_veths();
    t.sleeper("side", &["--network", "container:srv"]);

    // srv's localhost-only service, from the sidecar.
    let peer = t.http_peer("side", "127.0.0.1");
    assert_eq!(
        peer.as_deref(),
        Some("127.0.0.1"),
        "side must reach srv's server on 127.0.0.1:{HTTP_PORT}"
    );
    assert_eq!(t.exec_ok("side", &["hostname"]).trim(), "srv");
    assert_eq!(
        t.exec_ok("side", &["readlink", "/proc/self/ns/net"]),
        t.exec_ok("srv", &["readlink", "/proc/self/ns/net"]),
        "side and srv must share one network namespace"
    );
    assert_eq!(
        t.lab.md_veths(),
        veths,
        "container: mode must not create a veth"
    );
    let c = t.lab.container("side").expect("side in ps");
    assert_eq!(c["network"], "container:srv", "ps entry: {c}");

    // -p: the ports are srv's.
    let before = t.snapshot();
    let out = t.md(&run_args(
        "side2",
        &["--network", "container:srv", "-p", "8081:80"],
        &["sleep", "600"],
    ));
    assert_refused(&out, "run --network container:srv -p 8081:80", "port");
    assert_eq!(t.snapshot(), before, "residue of a refused container: run");
    // An unknown container to join.
    let out = t.md(&run_args(
        "side3",
        &["--network", "container:nosuch"],
        &["sleep", "600"],
    ));
    assert_refused(&out, "run --network container:nosuch", "nosuch");
    assert_eq!(
        t.snapshot(),
        before,
        "residue of a refused container:nosuch run"
    );
    t.host_files.assert_unchanged();
}

#[test]
fn networks_are_isolated_until_a_container_is_connected() {
    if !require_e2e() {
        return;
    }
    let t = NLab::new("networks");
    assert_eq!(t.md_ok(&["network", "create", "net1"]), "net1\n");
    assert_eq!(
        t.md_ok(&["network", "create", "net2", "--subnet", "10.77.0.0/24"]),
        "net2\n"
    );
    let n1 = t.network("net1").expect("net1 listed");
    let n2 = t.network("net2").expect("net2 listed");
    assert_eq!(
        n1["subnet"], "172.19.0.0/16",
        "default subnet of net1: {n1}"
    );
    assert_eq!(n1["gateway"], "172.19.0.1", "{n1}");
    assert_eq!(n2["subnet"], "10.77.0.0/24", "{n2}");
    assert_eq!(n2["gateway"], "10.77.0.1", "{n2}");
    assert_eq!(n1["containers"], serde_json::json!([]), "{n1}");
    assert_eq!(n1["dns"], false, "no resolver before a container: {n1}");
    let (br1, br2) = (
        n1["bridge"].as_str().expect("bridge").to_string(),
        n2["bridge"].as_str().expect("bridge").to_string(),
    );
    for (br, n) in [(&br1, &n1), (&br2, &n2)] {
        assert_eq!(*br, format!("mdn{}", n["id"]), "bridge name of {n}");
        assert!(
            t.lab.links().contains(br),
            "bridge {br} is not in the host ns"
        );
    }
    let (gw1, gw2) = ("172.19.0.1", "10.77.0.1");

    t.server("app1", &["--network", "net1"], "0.0.0.0");
    t.sleeper("cli1", &["--network", "net1"]);
    t.server("app2", &["--network", "net2"], "0.0.0.0");
    let app1 = t.lab.ip_of("app1");
    let cli1 = t.lab.ip_of("cli1");
    let app2 = t.lab.ip_of("app2");
    assert!(
        app1.starts_with("172.19.") && cli1.starts_with("172.19."),
        "{app1} {cli1}"
    );
    assert!(app2.starts_with("10.77.0."), "{app2}");
    let c = t.lab.container("app1").unwrap();
    assert_eq!(c["network"], "net1", "ps entry: {c}");
    assert_eq!(t.ps_networks("app1"), [("net1".to_string(), app1.clone())]);
    assert_eq!(t.nameservers_of("app1"), [gw1]);
    assert_eq!(t.nameservers_of("app2"), [gw2]);
    assert_eq!(
        t.members("net1"),
        BTreeSet::from(["app1".into(), "cli1".into()])
    );
    assert_eq!(t.members("net2"), BTreeSet::from(["app2".into()]));

    // Within a network: reachable and named.
    assert_eq!(
        t.http_peer("cli1", &app1),
        Some(cli1.clone()),
        "cli1 -> app1"
    );
    t.assert_resolves("cli1", gw1, "app1", &app1);
    assert_eq!(t.hosts_lookup("cli1", "app1"), Some(app1.clone()));

    // Across networks: neither direction, dropped by the datapath.
    let d0 = t.isolation_drops();
    assert!(!t.pings("app1", &app2), "app1 (net1) pinged app2 (net2)");
    assert_eq!(
        t.http_peer("app1", &app2),
        None,
        "app1 (net1) reached app2 (net2)"
    );
    let d1 = t.isolation_drops();
    assert!(
        d1 > d0,
        "net1 -> net2 not counted as network-isolation drops ({d0} -> {d1})"
    );
    assert!(!t.pings("app2", &app1), "app2 (net2) pinged app1 (net1)");
    assert_eq!(
        t.http_peer("app2", &app1),
        None,
        "app2 (net2) reached app1 (net1)"
    );
    let d2 = t.isolation_drops();
    assert!(
        d2 > d1,
        "net2 -> net1 not counted as network-isolation drops ({d1} -> {d2})"
    );
    // Names stay within their network.
    t.assert_not_resolved("app1", gw1, "app2");
    t.assert_not_resolved("app2", gw2, "app1");
    t.assert_not_resolved("app2", gw2, "cli1");
    assert_eq!(t.hosts_lookup("app1", "app2"), None);
    assert_eq!(t.hosts_lookup("app2", "app1"), None);

    // Connected live to net2 (with a static address): app1 now reaches and names app2.
    let app1_2 = "10.77.0.50";
    t.md_ok(&["network", "connect", "net2", "app1", "--ip", app1_2]);
    let addr = t.exec_ok("app1", &["ip", "-4", "-o", "addr", "show", "dev", "eth1"]);
    assert!(
        addr.contains(&format!(" {app1_2}/24")),
        "app1's eth1: {addr}"
    );
    let default = t.exec_ok("app1", &["ip", "-4", "route", "show", "default"]);
    assert!(
        default.lines().count() == 1 && default.contains(&format!("via {gw1} dev eth0")),
        "app1's only default route must stay via {gw1} dev eth0:\n{default}"
    );
    assert_eq!(
        t.ps_networks("app1"),
        [
            ("net1".to_string(), app1.clone()),
            ("net2".to_string(), app1_2.to_string())
        ]
    );
    assert_eq!(
        t.members("net2"),
        BTreeSet::from(["app1".into(), "app2".into()])
    );
    assert_eq!(
        t.http_peer("app1", &app2).as_deref(),
        Some(app1_2),
        "app1 -> app2 after connect (from its net2 address)"
    );
    assert!(
        t.pings("app2", app1_2),
        "app2 -> app1's net2 address after connect"
    );
    assert_eq!(
        t.http_peer("app2", app1_2),
        Some(app2.clone()),
        "app2 -> app1 on net2 after connect"
    );
    t.assert_resolves("app1", gw1, "app2", &app2);
    t.assert_resolves("app2", gw2, "app1", app1_2);
    assert_eq!(t.hosts_lookup("app1", "app2"), Some(app2.clone()));
    assert_eq!(t.hosts_lookup("app2", "app1"), Some(app1_2.to_string()));
    // app2 is still not on net1: app1's net1 address and cli1 stay out of its reach.
    assert_eq!(
        t.http_peer("app2", &app1),
        None,
        "app2 reached app1's net1 address"
    );
    assert!(!t.pings("app2", &cli1), "app2 (net2) pinged cli1 (net1)");
    t.assert_not_resolved("app2", gw2, "cli1");

    // Disconnected: isolated again.
    t.md_ok(&["network", "disconnect", "net2", "app1"]);
    let links = link_names(&t.exec_ok("app1", &["ip", "-br", "link"]));
    assert!(
        !links.contains("eth1"),
        "app1 kept eth1 after disconnect: {links:?}"
    );
    assert_eq!(t.ps_networks("app1"), [("net1".to_string(), app1.clone())]);
    assert_eq!(t.members("net2"), BTreeSet::from(["app2".into()]));
    assert!(!t.pings("app1", &app2), "app1 pinged app2 after disconnect");
    assert_eq!(
        t.http_peer("app1", &app2),
        None,
        "app1 reached app2 after disconnect"
    );
    assert!(
        !t.pings("app2", app1_2),
        "app2 pinged app1's old net2 address"
    );
    t.assert_not_resolved("app1", gw1, "app2");
    t.assert_not_resolved("app2", gw2, "app1");
    assert_eq!(t.hosts_lookup("app1", "app2"), None);
    assert_eq!(t.hosts_lookup("app2", "app1"), None);
    // Still fine within net1.
    assert_eq!(
        t.http_peer("cli1", &app1),
        Some(cli1.clone()),
        "cli1 -> app1"
    );

    // rm: refused while in use, and for the default network; works once empty.
    let out = t.md(&["network", "rm", "net2"]);
    assert_refused(&out, "network rm net2 (app2 on it)", "net2");
    let out = t.md(&["network", "rm", "net1"]);
    assert_refused(&out, "network rm net1 (app1, cli1 on it)", "net1");
    let out = t.md(&["network", "rm", "bridge"]);
    assert_refused(&out, "network rm bridge", "bridge");
    assert!(t.network("net2").is_some() && t.lab.links().contains(&br2));
    t.md_ok(&["stop", "app2"]);
    assert_eq!(t.md_ok(&["network", "rm", "net2"]), "net2\n");
    assert!(t.network("net2").is_none(), "network ls still lists net2");
    assert!(
        !t.lab.links().contains(&br2),
        "bridge {br2} survived network rm"
    );
    assert!(t.network("net1").is_some());
    t.host_files.assert_unchanged();
}

#[test]
fn resolver_runs_from_first_to_last_container_of_its_network() {
    if !require_e2e() {
        return;
    }
    let t = NLab::new("resolver");
    t.md_ok(&["network", "create", "netd", "--subnet", "10.66.0.0/24"]);
    assert!(
        t.resolvers("netd").is_empty(),
        "a resolver before any container"
    );
    assert_eq!(t.network("netd").unwrap()["dns"], false);

    t.sleeper("x1", &["--network", "netd"]);
    let pids = t.resolvers("netd");
    assert_eq!(
        pids.len(),
        1,
        "one resolver for netd after its first container: {pids:?}"
    );
    let pid = pids[0];
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("--listen 10.66.0.1:53"),
        "resolver of netd: {cmdline}"
    );
    assert_eq!(t.network("netd").unwrap()["dns"], true);
    assert!(
        t.resolvers("bridge").is_empty(),
        "the bridge network has no container yet"
    );

    t.sleeper("x2", &["--network", "netd"]);
    assert_eq!(
        t.resolvers("netd"),
        [pid],
        "a second container must share the resolver"
    );
    t.sleeper("y1", &[]);
    let bridge_pids = t.resolvers("bridge");
    assert_eq!(bridge_pids.len(), 1, "bridge resolver: {bridge_pids:?}");
    assert_eq!(t.resolvers("netd"), [pid]);

    // The first container going does not take the resolver with it.
    t.md_ok(&["stop", "x1"]);
    assert_eq!(
        t.resolvers("netd"),
        [pid],
        "netd's resolver died with x1, x2 still uses it"
    );
    t.assert_resolves("x2", "10.66.0.1", "x2", &t.lab.ip_of("x2"));

    // The last one does.
    t.md_ok(&["stop", "x2"]);
    wait_until(
        "netd's resolver exits after its last container",
        RESOLVER_GONE,
        || t.resolvers("netd").is_empty(),
    );
    assert_eq!(t.network("netd").unwrap()["dns"], false);
    let listening = t.lab.host(&["ss", "-Hlun", "src", "10.66.0.1"]);
    assert_eq!(
        stdout_str(&listening),
        "",
        "something still listens on 10.66.0.1"
    );
    assert_eq!(
        t.resolvers("bridge"),
        bridge_pids,
        "the bridge resolver must be unaffected"
    );

    // A new first container starts a new one.
    t.sleeper("x3", &["--network", "netd"]);
    let again = t.resolvers("netd");
    assert_eq!(
        again.len(),
        1,
        "resolver after a new first container: {again:?}"
    );
    t.assert_resolves("x3", "10.66.0.1", "x3", &t.lab.ip_of("x3"));

    t.md_ok(&["stop", "y1"]);
    wait_until(
        "the bridge resolver exits after its last container",
        RESOLVER_GONE,
        || t.resolvers("bridge").is_empty(),
    );
    t.md_ok(&["down"]);
    wait_for("no resolver is left after down", RESOLVER_GONE, || {
        resolver_pids(t.lab.state_dir(), None)
            .is_empty()
            .then_some(())
    });
    t.host_files.assert_unchanged();
}

#[test]
fn bad_input_is_refused_without_residue() {
    if !require_e2e() {
        return;
    }
    let t = NLab::new("names-bad");
    t.sleeper("keep", &[]);
    t.md_ok(&["network", "create", "nb", "--subnet", "10.88.0.0/24"]);
    let keep = t.lab.ip_of("keep");
    let before = t.snapshot();
    assert!(
        before.links.iter().any(|l| is_md_veth(l)),
        "keep's veth: {:?}",
        before.links
    );
    let keep_links = t.exec_ok("keep", &["ip", "-br", "link"]);

    let sleep = ["sleep", "600"];
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            "run --network nosuch".into(),
            run_args("bad", &["--network", "nosuch"], &sleep),
            "nosuch",
        ),
        (
            "run --ip outside the subnet".into(),
            run_args("bad", &["--ip", "10.99.0.5"], &sleep),
            "10.99.0.5",
        ),
        (
            "run --network nb --ip outside nb's subnet".into(),
            run_args("bad", &["--network", "nb", "--ip", "172.18.0.77"], &sleep),
            "172.18.0.77",
        ),
        (
            format!("run --ip {keep} (keep's)"),
            run_args("bad", &["--ip", &keep], &sleep),
            &keep,
        ),
        (
            "run --ip the gateway".into(),
            run_args("bad", &["--ip", GATEWAY], &sleep),
            GATEWAY,
        ),
        (
            "run --network nb --ip nb's gateway".into(),
            run_args("bad", &["--network", "nb", "--ip", "10.88.0.1"], &sleep),
            "10.88.0.1",
        ),
        (
            "run --network host -p".into(),
            run_args("bad", &["--network", "host", "-p", "8080:80"], &sleep),
            "host",
        ),
        (
            "network create with an overlapping subnet".into(),
            vec!["network", "create", "nb2", "--subnet", "10.88.0.128/25"],
            "10.88.0.128/25",
        ),
        (
            "network create overlapping the default network".into(),
            vec!["network", "create", "nb3", "--subnet", "172.18.5.0/24"],
            "172.18.5.0/24",
        ),
        (
            "network create with a duplicate name".into(),
            vec!["network", "create", "nb", "--subnet", "10.89.0.0/24"],
            "nb",
        ),
        (
            "network connect to an unknown network".into(),
            vec!["network", "connect", "nosuch", "keep"],
            "nosuch",
        ),
        (
            "network connect with a reserved --ip".into(),
            vec!["network", "connect", "nb", "keep", "--ip", "10.88.0.1"],
            "10.88.0.1",
        ),
        (
            "network connect with an --ip outside the subnet".into(),
            vec!["network", "connect", "nb", "keep", "--ip", "10.99.0.5"],
            "10.99.0.5",
        ),
        (
            "network rm of an unknown network".into(),
            vec!["network", "rm", "nosuch"],
            "nosuch",
        ),
    ];
    for (what, args, token) in &cases {
        let out = t.md(args);
        assert_refused(&out, what, token);
        assert_eq!(t.snapshot(), before, "residue after a refused `{what}`");
        assert_eq!(
            t.exec_ok("keep", &["ip", "-br", "link"]),
            keep_links,
            "keep's links changed after a refused `{what}`"
        );
    }
    // Still working after all that.
    t.sleeper("good", &[]);
    t.assert_resolves("good", GATEWAY, "keep", &keep);
    t.host_files.assert_unchanged();
}

#[test]
fn the_resolver_answers_over_tcp_too() {
    if !require_e2e() {
        return;
    }
    let t = NLab::new("dns-tcp");
    t.sleeper("web1", &[]);
    t.sleeper("db1", &["--hostname", "dbhost"]);
    let (web, db) = (t.lab.ip_of("web1"), t.lab.ip_of("db1"));
    let tcp = ["+tcp"];

    // The same answers as over UDP: names, hostnames, the upstream's names, AAAA.
    let ask = |c: &str, name: &str, qtype: &str| t.dig_with(c, Some(GATEWAY), name, qtype, &tcp);
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    assert_eq!(ask("web1", "db1", "A").a, [ip(&db)]);
    assert_eq!(ask("web1", "dbhost", "A").a, [ip(&db)]);
    assert_eq!(ask("db1", "web1", "A").a, [ip(&web)]);
    assert_eq!(ask("web1", OUTSIDE_NAME, "A").a, [ip(OUTSIDE_IP)]);
    let d = ask("web1", "db1", "AAAA");
    assert!(d.status == "NOERROR" && d.answers == 0, "{d:?}");
    let d = ask("web1", "nosuch.test", "A");
    assert!(d.a.is_empty() && d.status == "REFUSED", "{d:?}");

    // Several queries on one connection.
    let out = t.exec_ok(
        "web1",
        &[
            "dig",
            "+tcp",
            "+keepopen",
            "+short",
            "+time=2",
            "+tries=1",
            "@172.18.0.1",
            "db1",
            "A",
            "web1",
            "A",
            "dbhost",
            "A",
        ],
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [db.as_str(), web.as_str(), db.as_str()],
        "three queries over one TCP connection"
    );

    // Only md's containers: the host itself is refused over TCP as over UDP.
    for opt in ["+notcp", "+tcp"] {
        let out = t
            .lab
            .host(&["dig", opt, "+time=2", "+tries=1", "@172.18.0.1", "db1", "A"]);
        let s = stdout_str(&out);
        assert!(
            s.contains("status: REFUSED") && !s.contains(&db),
            "the host asking the resolver ({opt}) must be refused\n{}",
            show_output(&out)
        );
    }
}

#[test]
fn a_hostname_never_takes_another_containers_name() {
    if !require_e2e() {
        return;
    }
    let t = NLab::new("dns-names-win");
    // One claims a running container's name, the other a name whose container comes later.
    t.sleeper("web", &[]);
    t.sleeper("impostor", &["--hostname", "web"]);
    t.sleeper("early", &["--hostname", "db"]);
    t.sleeper("db", &[]);
    assert_eq!(t.exec_ok("impostor", &["hostname"]).trim(), "web");
    let web = t.lab.ip_of("web");
    let db = t.lab.ip_of("db");
    for c in ["web", "impostor", "early", "db"] {
        for (name, ip) in [("web", &web), ("db", &db)] {
            t.assert_resolves(c, GATEWAY, name, ip);
            assert_eq!(
                t.hosts_lookup(c, name).as_deref(),
                Some(ip.as_str()),
                "{name} in {c}'s /etc/hosts"
            );
            assert_eq!(
                t.getent(c, name),
                BTreeSet::from([ip.clone()]),
                "{c}: {name}"
            );
        }
    }
    // A hostname that is nobody's name still resolves to its container.
    t.sleeper("mailer", &["--hostname", "mail"]);
    let mailer = t.lab.ip_of("mailer");
    t.assert_resolves("web", GATEWAY, "mail", &mailer);
    assert_eq!(t.hosts_lookup("web", "mail"), Some(mailer));
}
