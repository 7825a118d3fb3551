//! Issue 12, item 1 (md-user's side): a published port never takes over a port a host process
//! holds, and while published it is out of the host's ephemeral range.
//!
//! - `run -p` of a port a socket in md's host namespace already holds is refused with one line
//!   naming the port, before anything is created. TCP listeners and unconnected UDP sockets
//!   hold ports; the address rule is bind(2)'s (a wildcard on either side overlaps everything,
//!   an IPv6 wildcard counts unless it is IPv6-only).
//! - Published host ports are added to `ip_local_reserved_ports` of the lab's host namespace,
//!   and given back when unpublished (stop, kill -9 of the supervisor, down); entries md did not
//!   add stay, even for a port md published too. The root namespace's list is never touched.

use std::collections::BTreeSet;
use std::time::Duration;

use md_tests::helpers::{assert_one_line_error, parse_port_ranges, run_args, run_d};
use md_tests::process::show_output;
use md_tests::{require_e2e, require_tools, Lab, HOST_UPLINK_IP};
use serde_json::Value;

const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// A UDP socket bound to ADDR PORT that waits for nothing (an unconnected UDP "server").
const UDP_BOUND: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
time.sleep(600)
"#;

/// `ip_local_reserved_ports` of the lab's host namespace.
#[track_caller]
fn reserved(lab: &Lab) -> BTreeSet<u16> {
    parse_port_ranges(&lab.host_ok(&["cat", RESERVED]))
}

/// The same file as the test process sees it (the machine's own namespace).
fn reserved_here() -> String {
    std::fs::read_to_string(RESERVED).unwrap_or_else(|e| panic!("reading {RESERVED}: {e}"))
}

fn ports(v: &[u16]) -> BTreeSet<u16> {
    v.iter().copied().collect()
}

/// What a refused run must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    links: Vec<String>,
    ps: Vec<String>,
    state: Vec<String>,
    port_map: Vec<Value>,
    reserved: BTreeSet<u16>,
}

fn snapshot(lab: &Lab) -> Snapshot {
    let mut state = lab.state_entries();
    state.sort();
    Snapshot {
        links: lab.links(),
        ps: lab.ps_names(),
        state,
        port_map: lab.map_dump("PORT_MAP"),
        reserved: reserved(lab),
    }
}

/// `run -d -p SPEC` is refused with exactly one line naming `port/proto` as a host process's,
/// and leaves everything as it was.
#[track_caller]
fn assert_refused(lab: &Lab, spec: &str, port_proto: &str) {
    let before = snapshot(lab);
    let out = lab.md(&run_args("pub", &["-p", spec], &["sleep", "300"]));
    let err = assert_one_line_error(&out, &format!("run -p {spec}"));
    assert!(
        err.contains(&format!("port {port_proto} is in use by a host process")),
        "run -p {spec}: the error must name {port_proto} as a host process's\n{}",
        show_output(&out)
    );
    assert_eq!(snapshot(lab), before, "run -p {spec} left something behind");
}

/// `run -d -p SPEC` works; the container is stopped again.
#[track_caller]
fn assert_allowed(lab: &Lab, spec: &str) {
    run_d(lab, "pub", &["-p", spec], &["sleep", "300"]);
    lab.md_ok(&["stop", "pub"]);
}

#[test]
fn ports_held_by_host_processes_are_refused_before_anything_is_created() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "ss", "curl", "bpftool"]);
    let lab = Lab::new("hostports-held");
    // A host web server on 127.0.0.1:8080 only.
    let _web = lab.spawn_host(&[
        "python3",
        "-m",
        "http.server",
        "8080",
        "--bind",
        "127.0.0.1",
    ]);
    // A dual-stack one on [::]:8081 (python's http.server clears IPV6_V6ONLY).
    let _dual = lab.spawn_host(&["python3", "-m", "http.server", "8081", "--bind", "::"]);
    // A resolver stub's socket on 127.0.0.53:5353/udp.
    let _stub = lab.spawn_host(&["python3", "-c", UDP_BOUND, "127.0.0.53", "5353"]);
    lab.wait_listening_host("tcp", 8080);
    lab.wait_listening_host("tcp", 8081);
    lab.wait_listening_host("udp", 5353);

    // On a fresh host: refused before even the bridge or the datapath exists.
    assert_refused(&lab, "8080:80", "8080/tcp");
    assert!(!lab.has_bridge(), "a refused run created the bridge");
    assert!(
        lab.pin_entries().is_empty(),
        "a refused run loaded the datapath"
    );

    // With md in use (the datapath loaded, another container running): the same.
    run_d(&lab, "other", &[], &["sleep", "300"]);
    for (spec, held) in [
        ("8080:80", "8080/tcp"),
        ("0.0.0.0:8080:80", "8080/tcp"),
        ("127.0.0.1:8080:80", "8080/tcp"),
        ("8079-8081:79-81", "8080/tcp"),
        ("8081:80", "8081/tcp"),
        (&format!("{HOST_UPLINK_IP}:8081:80"), "8081/tcp"),
        ("5353:53/udp", "5353/udp"),
        ("127.0.0.53:5353:53/udp", "5353/udp"),
    ] {
        assert_refused(&lab, spec, held);
    }
    // The host server still serves, untouched.
    let out = lab.host(&[
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        "5",
        "http://127.0.0.1:8080/",
    ]);
    assert!(
        out.status.success(),
        "the host's own server on 8080\n{}",
        show_output(&out)
    );

    // Not the same socket: another address, or the other protocol.
    assert_allowed(&lab, &format!("{HOST_UPLINK_IP}:8080:80"));
    assert_allowed(&lab, &format!("{HOST_UPLINK_IP}:5353:53/udp"));
    assert_allowed(&lab, "5353:53");
    assert_allowed(&lab, "8080:80/udp");
    // md's own resolver listens on the gateway, port 53 (UDP and TCP): not a host process's.
    lab.wait_listening_host("udp", 53);
    assert_allowed(&lab, "53:53/udp");
    assert_allowed(&lab, "53:53");
}

#[test]
fn published_ports_are_reserved_while_published_and_given_back() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3"]);
    let machine = reserved_here();
    let lab = Lab::new("hostports-reserved");
    // Entries of the host's own: md must keep them, also one it publishes itself.
    lab.host_ok(&["sh", "-c", &format!("echo 40005,50000-50001 > {RESERVED}")]);
    let own = ports(&[40005, 50000, 50001]);
    assert_eq!(reserved(&lab), own);

    // stop gives back what md added, and only that.
    run_d(
        &lab,
        "a",
        &["-p", "40000:80/udp", "-p", "40005:81/udp"],
        &["sleep", "300"],
    );
    assert_eq!(reserved(&lab), ports(&[40000, 40005, 50000, 50001]));
    lab.md_ok(&["stop", "a"]);
    assert_eq!(reserved(&lab), own, "after stop a");

    // A port number two containers publish (TCP and UDP) stays reserved until both are gone.
    run_d(&lab, "t", &["-p", "40003:80"], &["sleep", "300"]);
    run_d(&lab, "u", &["-p", "40003:80/udp"], &["sleep", "300"]);
    lab.md_ok(&["stop", "t"]);
    assert!(
        reserved(&lab).contains(&40003),
        "u still publishes 40003/udp"
    );
    lab.md_ok(&["stop", "u"]);
    assert_eq!(reserved(&lab), own, "after stop t, u");

    // A foreground run killed with -9: the next command gives its port back.
    let mut fg = lab.spawn_md(&[
        "run",
        "--name",
        "k",
        "-p",
        "40001:80/udp",
        "--",
        "sleep",
        "300",
    ]);
    lab.wait_running_fg("k", &mut fg, Duration::from_secs(20));
    assert!(reserved(&lab).contains(&40001), "k publishes 40001/udp");
    fg.signal(libc::SIGKILL);
    fg.wait_timeout(Duration::from_secs(10));
    assert!(!lab.ps_names().contains(&"k".to_string()));
    assert_eq!(reserved(&lab), own, "after k's supervisor was killed");

    // A range, then down.
    run_d(&lab, "r", &["-p", "40010-40012:80-82"], &["sleep", "300"]);
    assert_eq!(
        reserved(&lab),
        own.union(&ports(&[40010, 40011, 40012])).copied().collect()
    );
    lab.md_ok(&["down"]);
    assert_eq!(reserved(&lab), own, "after down");

    assert_eq!(reserved_here(), machine, "the machine's own list changed");
}
