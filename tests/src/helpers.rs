//! Helpers shared by the end-to-end test files: fixture paths, detached runs, the one-way UDP
//! logger and its scripts, `stats --json` readers, common waits and assertions.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::process::{run_timeout, show_output};
use crate::{fixture, stderr_str, wait_for, which, Bg, Lab, MD_TIMEOUT, OUTSIDE_IP};

/// Absolute path of a file under `tests/fixtures/`, as a string for command lines.
#[track_caller]
pub fn fx(name: &str) -> String {
    fixture(name)
        .to_str()
        .expect("utf-8 fixture path")
        .to_string()
}

/// The arguments of `md-user run -d --name NAME OPTS... -- CMD...`.
pub fn run_args<'a>(name: &'a str, opts: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", "-d", "--name", name];
    a.extend_from_slice(opts);
    a.push("--");
    a.extend_from_slice(cmd);
    a
}

/// `md-user run -d --name NAME OPTS... -- CMD...`, asserting success; returns its stdout.
#[track_caller]
pub fn run_d(lab: &Lab, name: &str, opts: &[&str], cmd: &[&str]) -> String {
    lab.md_ok(&run_args(name, opts, cmd))
}

// ---- one-way UDP ----------------------------------------------------------------------------
// A logger inside the receiver proves delivery (or its absence) without depending on replies.

/// UDP logger: prints "MESSAGE SRC_IP:SRC_PORT" for every datagram on PORT.
pub const UDP_LOGGER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    print("%s %s:%d" % (data.decode(errors="replace"), peer[0], peer[1]), flush=True)
"#;

/// One-way UDP: sends MESSAGE to HOST PORT, from BIND_ADDR when given.
/// usage: HOST PORT MESSAGE [BIND_ADDR]
pub const UDP_SEND: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if len(sys.argv) > 4:
    s.bind((sys.argv[4], 0))
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"#;

/// A forged UDP datagram through a raw socket (IP_HDRINCL): SRC DST PORT MESSAGE, source port
/// 40000. The kernel routes by destination and sends the header as written, whatever the
/// source says.
pub const RAW_UDP: &str = r#"
import socket, struct, sys
src, dst, port, msg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
udp = struct.pack("!HHHH", 40000, port, 8 + len(msg), 0) + msg
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(ip + udp, (dst, 0))
"#;

/// UDP probe: sends "probe" to HOST PORT up to TRIES times, waiting 1 s for a reply after
/// each, and prints the reply. Exit 0 with a reply, 3 when none came, 1 on an error such as
/// ECONNREFUSED. usage: HOST PORT TRIES
pub const UDP_PROBE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
for _ in range(int(sys.argv[3])):
    s.sendto(b"probe", (sys.argv[1], int(sys.argv[2])))
    try:
        data, _ = s.recvfrom(2048)
    except socket.timeout:
        continue
    print(data.decode())
    sys.exit(0)
sys.exit(3)
"#;

/// Starts a [`UDP_LOGGER`] inside `container` on `port`; returns once it listens.
#[track_caller]
pub fn logger(lab: &Lab, container: &str, port: u16) -> Bg {
    let bg = lab.spawn_exec(
        container,
        &["python3", "-u", "-c", UDP_LOGGER, &port.to_string()],
    );
    lab.wait_listening_in(container, "udp", port);
    bg
}

/// Waits (10 s) until `log` shows `msg`; returns its source "ip:port".
#[track_caller]
pub fn logged(log: &Bg, msg: &str) -> String {
    wait_for(
        &format!("the logger receives {msg:?}"),
        Duration::from_secs(10),
        || {
            log.stdout()
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{msg} ")).map(str::to_string))
        },
    )
}

/// The MAC of `container`'s eth0, as its own namespace sees it (not through /sys, which
/// shows whatever namespace mounted it).
#[track_caller]
pub fn mac_of(lab: &Lab, container: &str) -> String {
    let out = lab.exec_ok(container, &["ip", "-o", "link", "show", "dev", "eth0"]);
    out.split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC in {container}'s eth0: {out}"))
        .to_string()
}

/// A ports list as `ip_local_reserved_ports` writes it ("8080,40000-40002"), expanded.
pub fn parse_port_ranges(s: &str) -> std::collections::BTreeSet<u16> {
    let mut out = std::collections::BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u16, u16) = (a.parse().unwrap(), b.parse().unwrap());
        out.extend(a..=b);
    }
    out
}

// ---- stats ----------------------------------------------------------------------------------

/// The row of container `name` in `md-user stats --json` output `stats`.
#[track_caller]
pub fn stats_row<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["containers"]
        .as_array()
        .and_then(|v| v.iter().find(|c| c["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("stats --json has no container {name}: {stats}"))
}

/// A counter of a stats row or of `stats["uplink"]`, by dotted path (`"snat"`,
/// `"drops.policy"`, …).
#[track_caller]
pub fn counter(r: &Value, path: &str) -> u64 {
    path.split('.')
        .fold(r, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("stats --json has no numeric {path} in {r}"))
}

/// drops.REASON of container `name` in `md-user stats --json`.
#[track_caller]
pub fn drops_of(lab: &Lab, name: &str, reason: &str) -> u64 {
    counter(stats_row(&lab.stats(), name), &format!("drops.{reason}"))
}

// ---- waits and assertions -------------------------------------------------------------------

/// Waits (20 s) until a background tcp_session.py has printed a line starting with `prefix`
/// (panics at once if it printed an error or exited); returns the rest of that line.
#[track_caller]
pub fn session_line(s: &mut Bg, prefix: &str, what: &str) -> String {
    wait_for(
        &format!("{what} prints {prefix:?}"),
        Duration::from_secs(20),
        || {
            let out = s.stdout();
            if let Some(l) = out.lines().find_map(|l| l.strip_prefix(prefix)) {
                return Some(l.trim().to_string());
            }
            let st = s.try_status();
            if out.contains("error") || st.is_some() {
                panic!(
                    "{what} failed or exited ({st:?}) before {prefix:?}\n--- stdout ---\n{out}\
                     --- stderr ---\n{}",
                    s.stderr()
                );
            }
            None
        },
    )
}

/// The files that list the x_tables tables (IPv4, IPv6, ARP) existing in the reading process's
/// network namespace; tables are created lazily, so a namespace nobody touched has none.
pub const X_TABLES_NAMES: [&str; 3] = [
    "/proc/net/ip_tables_names",
    "/proc/net/ip6_tables_names",
    "/proc/net/arp_tables_names",
];

/// No netfilter state in the host namespace: each of `table_files` (see [`X_TABLES_NAMES`]) is
/// empty where it can be read, and iptables-save and nft show no rules when installed.
#[track_caller]
pub fn assert_no_netfilter(lab: &Lab, table_files: &[&str]) {
    for f in table_files {
        let out = lab.host(&["cat", f]);
        if out.status.success() {
            let tables = String::from_utf8_lossy(&out.stdout);
            assert!(
                tables.trim().is_empty(),
                "x_tables tables exist in the host namespace ({f}): {tables}"
            );
        }
    }
    if which("iptables-save").is_some() {
        let rules = lab.host_ok(&["iptables-save"]);
        let meaningful: Vec<&str> = rules
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .collect();
        assert!(
            meaningful.is_empty(),
            "iptables-save in the host namespace is not empty:\n{rules}"
        );
    } else {
        eprintln!("iptables-save not installed: checked /proc/net/*_tables_names only");
    }
    if which("nft").is_some() {
        let rules = lab.host_ok(&["nft", "list", "ruleset"]);
        assert!(
            rules.trim().is_empty(),
            "nft list ruleset in the host namespace is not empty:\n{rules}"
        );
    } else {
        eprintln!("nft not installed: nftables ruleset not checked");
    }
}

/// `out` is a failure with exactly one non-empty line on stderr; returns that line.
#[track_caller]
pub fn assert_one_line_error(out: &Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} must fail\n{}",
        show_output(out)
    );
    let err = stderr_str(out);
    assert!(
        !err.is_empty() && err.lines().count() == 1,
        "{what}: expected exactly one line on stderr\n{}",
        show_output(out)
    );
    err
}

// ---- upstream resolver ----------------------------------------------------------------------

/// The only name the [`upstream_resolver`] knows; it answers with [`OUTSIDE_IP`].
pub const OUTSIDE_NAME: &str = "outside.test";

/// An upstream resolver (dnsmasq) in the outside namespace on [`OUTSIDE_IP`]:53 that knows
/// exactly one name, [`OUTSIDE_NAME`] → [`OUTSIDE_IP`], and refuses everything else, and a
/// resolv.conf in the lab's dir that points at it (for `MD_RESOLV_CONF`). Returns the dnsmasq
/// process (its log shows the queries) and the resolv.conf once dnsmasq listens.
#[track_caller]
pub fn upstream_resolver(lab: &Lab) -> (Bg, PathBuf) {
    let resolv = lab.dir().join("upstream-resolv.conf");
    std::fs::write(&resolv, format!("nameserver {OUTSIDE_IP}\n"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", resolv.display()));
    let listen = format!("--listen-address={OUTSIDE_IP}");
    let address = format!("--address=/{OUTSIDE_NAME}/{OUTSIDE_IP}");
    let upstream = lab.spawn_outside(&[
        "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        &listen,
        &address,
        "--pid-file=",
        "--log-queries",
        "--log-facility=-",
    ]);
    lab.wait_listening_outside("udp", 53);
    (upstream, resolv)
}

/// md-user in the lab's host namespace with `MD_RESOLV_CONF=resolv` (e.g. the resolv.conf of
/// [`upstream_resolver`]), deadline [`MD_TIMEOUT`].
#[track_caller]
pub fn md_resolv(lab: &Lab, resolv: &Path, args: &[&str]) -> Output {
    let mut c = lab.host_md_cmd(lab.md_bin(), args);
    c.env("MD_RESOLV_CONF", resolv);
    run_timeout(&mut c, MD_TIMEOUT)
}

/// md's eBPF object as `cargo xtask build-ebpf` leaves it, or `MD_EBPF_OBJ`.
pub fn ebpf_object_path() -> std::path::PathBuf {
    match std::env::var_os("MD_EBPF_OBJ") {
        Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
        _ => {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/md-ebpf/md-ebpf.o")
        }
    }
}

/// md's eBPF object loaded privately (maps created, nothing pinned) with the TC programs
/// `names` loaded; panics on failure. The verifier gives up with EAGAIN when a signal is
/// pending for the loading thread: such a load is tried again, up to 5 times.
pub fn load_tc_programs(names: &[&str]) -> aya::Ebpf {
    let path = ebpf_object_path();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e} (run `cargo xtask build-ebpf`, or set MD_EBPF_OBJ)",
            path.display()
        )
    });
    let btf = aya::Btf::from_sys_fs().ok();
    let mut ebpf = aya::EbpfLoader::new()
        .btf(btf.as_ref())
        .load(&bytes)
        .expect("loading md's eBPF object");
    for &name in names {
        let prog: &mut aya::programs::SchedClassifier = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("program {name} missing"))
            .try_into()
            .unwrap();
        let mut tries = 0;
        while let Err(e) = prog.load() {
            let again = matches!(&e, aya::programs::ProgramError::LoadError { io_error, .. }
                if io_error.raw_os_error() == Some(libc::EAGAIN));
            tries += 1;
            if !again || tries > 5 {
                panic!("loading {name}: {e:?}");
            }
        }
    }
    ebpf
}
