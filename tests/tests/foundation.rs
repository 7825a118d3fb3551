//! End-to-end tests of md's foundation: containers on the bridge, ps/stop/exec/down, clean
//! teardown on every path, no external programs. Each test builds its own [`Lab`]; run with
//! `MD_E2E=1 MD_USER_BIN=target/debug/md-user` as root (`cargo xtask test` does).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use md_tests::helpers::{self, assert_one_line_error};
use md_tests::process::{alive, children, comm, run_timeout, show_output};
use md_tests::{
    is_md_veth, require_e2e, require_tools, stderr_str, wait_for, wait_until, Bg, Lab, GATEWAY,
    MD_TIMEOUT,
};
use serde_json::Value;

const RUNNING: Duration = Duration::from_secs(20);

/// `md-user run -d --name NAME -- CMD...`; asserts it printed exactly the name.
#[track_caller]
fn run_d(lab: &Lab, name: &str, cmd: &[&str]) {
    let out = helpers::run_d(lab, name, &[], cmd);
    assert_eq!(
        out,
        format!("{name}\n"),
        "run -d must print the name, one line"
    );
}

#[track_caller]
fn pid_of(c: &Value) -> i32 {
    c["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("ps entry without numeric pid: {c}")) as i32
}

#[track_caller]
fn ip_field(c: &Value) -> Ipv4Addr {
    c["ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("ps entry without an IPv4 ip: {c}"))
}

fn in_default_subnet(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 172 && o[1] == 18 && ip != GATEWAY.parse::<Ipv4Addr>().unwrap() && o[3] != 255
}

#[track_caller]
fn assert_failed(out: &Output, what: &str) {
    assert!(
        !out.status.success(),
        "{what} must fail\n{}",
        show_output(out)
    );
    assert!(
        !stderr_str(out).is_empty(),
        "{what}: failed without a word on stderr\n{}",
        show_output(out)
    );
}

#[test]
fn two_containers_ping_each_other_across_the_bridge() {
    if !require_e2e() {
        return;
    }
    require_tools(&["ping"]);
    let lab = Lab::new("ping");
    run_d(&lab, "a", &["sleep", "300"]);
    run_d(&lab, "b", &["sleep", "300"]);
    let ip_a = lab.ip_of("a");
    let ip_b = lab.ip_of("b");
    assert_ne!(ip_a, ip_b, "two containers got the same address");

    lab.exec_ok("a", &["ping", "-c1", "-W2", &ip_b]);
    lab.exec_ok("b", &["ping", "-c1", "-W2", &ip_a]);
    lab.exec_ok("a", &["ping", "-c1", "-W2", GATEWAY]);

    for (name, ip) in [("a", &ip_a), ("b", &ip_b)] {
        let host = lab.exec_ok(name, &["hostname"]);
        assert_eq!(host.trim(), name, "hostname inside {name}");
        let addr = lab.exec_ok(name, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
        assert!(
            addr.contains(&format!(" {ip}/")),
            "{name}'s eth0 should carry {ip} (from ps): {addr}"
        );
        let route = lab.exec_ok(name, &["ip", "-4", "route", "show", "default"]);
        assert!(
            route.contains(&format!("via {GATEWAY}")) && route.contains("dev eth0"),
            "{name}'s default route should be via {GATEWAY} dev eth0: {route}"
        );
    }
}

#[test]
fn ps_stop_and_down() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("psstop");
    let baseline = lab.links();
    run_d(&lab, "a", &["sleep", "300"]);
    run_d(&lab, "b", &["sleep", "300"]);

    let ps = lab.ps();
    assert_eq!(lab.ps_names(), ["a", "b"], "ps: {ps:?}");
    for c in &ps {
        assert_eq!(c["status"], "running", "{c}");
        assert!(c["id"].as_str().is_some_and(|s| !s.is_empty()), "id: {c}");
        assert!(c["ports"].is_array(), "ports: {c}");
        assert!(in_default_subnet(ip_field(c)), "ip: {c}");
        assert!(alive(pid_of(c)), "pid of {c} is not a live process");
    }
    let pid_a = pid_of(&lab.container("a").unwrap());
    let pid_b = pid_of(&lab.container("b").unwrap());
    let veth_a = lab.host_veth_of("a");
    let veth_b = lab.host_veth_of("b");
    assert!(
        is_md_veth(&veth_a) && is_md_veth(&veth_b),
        "{veth_a} {veth_b}"
    );
    assert_ne!(veth_a, veth_b);

    lab.md_ok(&["stop", "a"]);
    assert_eq!(lab.ps_names(), ["b"], "after stop a");
    let links = lab.links();
    assert!(
        !links.contains(&veth_a),
        "a's veth {veth_a} survived stop: {links:?}"
    );
    assert!(
        links.contains(&veth_b),
        "b's veth {veth_b} vanished: {links:?}"
    );
    wait_until("a's process is gone", Duration::from_secs(5), || {
        !alive(pid_a)
    });
    assert!(alive(pid_b), "stop a killed b");

    lab.md_ok(&["down"]);
    assert_eq!(
        lab.links(),
        baseline,
        "down must remove every veth and the bridge"
    );
    assert!(!lab.has_bridge());
    assert_eq!(
        lab.pin_entries(),
        Vec::<String>::new(),
        "pin dir after down"
    );
    assert_eq!(
        lab.state_entries(),
        Vec::<String>::new(),
        "state dir after down"
    );
    wait_until("b's process is gone", Duration::from_secs(5), || {
        !alive(pid_b)
    });

    lab.md_ok(&["down"]); // idempotent
    assert_eq!(lab.links(), baseline);
    assert!(lab.ps().is_empty(), "ps after down");
}

#[test]
fn hundred_foreground_runs_leave_nothing_and_propagate_status() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("cycles");
    // The first run may create things that stay up while md is in use (the bridge): take the
    // baseline after it.
    lab.md_ok(&["run", "--", "true"]);
    let baseline = lab.links();
    assert!(
        !baseline.iter().any(|l| is_md_veth(l)),
        "veth left after one run: {baseline:?}"
    );
    for i in 1..100 {
        let out = lab.md(&["run", "--", "true"]);
        assert!(out.status.success(), "cycle {i}\n{}", show_output(&out));
    }
    assert_eq!(lab.links(), baseline, "links after 100 run/exit cycles");
    assert!(lab.ps().is_empty(), "ps after 100 run/exit cycles");

    let out = lab.md(&["run", "--", "sh", "-c", "exit 3"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit status must propagate\n{}",
        show_output(&out)
    );
    let out = lab.md(&["run", "--", "false"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "`false` must exit 1\n{}",
        show_output(&out)
    );
    assert_eq!(lab.links(), baseline);
    assert!(lab.ps().is_empty());
}

#[test]
fn kill9_of_a_foreground_run_is_reclaimed_by_the_next_command() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("kill9");
    let mut fg = lab.spawn_md(&["run", "--name", "k", "--", "sleep", "300"]);
    let k = lab.wait_running_fg("k", &mut fg, RUNNING);
    let ip = k["ip"].as_str().expect("ip").to_string();
    let cmd_pid = pid_of(&k);
    let veth = lab.host_veth_of("k");

    fg.signal(libc::SIGKILL);
    fg.wait_timeout(Duration::from_secs(10));

    // The next command (here ps) notices the dead owner and reclaims everything.
    let names = lab.ps_names();
    assert!(
        !names.iter().any(|n| n == "k"),
        "k still listed after its md-user was killed: {names:?}"
    );
    wait_until(
        &format!("k's veth {veth} is gone from the host ns"),
        Duration::from_secs(3),
        || !lab.links().contains(&veth),
    );
    wait_until(
        &format!("k's process {cmd_pid} is gone"),
        Duration::from_secs(5),
        || !alive(cmd_pid),
    );

    // Name and address are free again (IPAM hands out the lowest free address; k had the only one).
    run_d(&lab, "k", &["sleep", "300"]);
    assert_eq!(
        lab.ip_of("k"),
        ip,
        "the reclaimed address should be handed out again"
    );
}

#[test]
fn ten_parallel_detached_runs_get_distinct_addresses() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("par10");
    let names: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    let outs: Vec<Output> = std::thread::scope(|s| {
        let lab = &lab;
        let handles: Vec<_> = names
            .iter()
            .map(|n| s.spawn(move || lab.md(&["run", "-d", "--name", n, "--", "sleep", "300"])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n, out) in names.iter().zip(&outs) {
        assert!(
            out.status.success(),
            "run -d --name {n}\n{}",
            show_output(out)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{n}\n"));
    }
    let ps = lab.ps();
    assert_eq!(lab.ps_names(), names, "ps: {ps:?}");
    let ips: HashSet<Ipv4Addr> = ps.iter().map(ip_field).collect();
    assert_eq!(ips.len(), 10, "addresses are not distinct: {ps:?}");
    assert!(ips.iter().all(|&ip| in_default_subnet(ip)), "{ips:?}");
    for c in &ps {
        assert_eq!(c["status"], "running", "{c}");
        assert!(alive(pid_of(c)), "{c}");
    }
    assert_eq!(lab.md_veths().len(), 10, "one host veth per container");
}

#[test]
fn failed_runs_leave_nothing_behind() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("fail");
    run_d(&lab, "x", &["sleep", "300"]);
    let snapshot = || {
        let mut ps: Vec<String> = lab
            .ps()
            .iter()
            .map(|c| format!("{} {} {}", c["name"], c["ip"], c["pid"]))
            .collect();
        ps.sort();
        let mut state = lab.state_entries();
        state.sort();
        (lab.links(), ps, state)
    };
    let before = snapshot();

    let out = lab.md(&["run", "-d", "--name", "x", "--", "sleep", "300"]);
    assert_one_line_error(&out, "run -d --name x while x exists");
    assert_eq!(snapshot(), before, "after the name-taken failure");

    let out = lab.md(&["run", "--", "/nonexistent/cmd"]);
    assert_failed(&out, "run -- /nonexistent/cmd");
    assert_eq!(snapshot(), before, "after the command-not-found failure");

    let out = lab.md(&["run", "-p", "99999:80", "--", "true"]);
    assert_failed(&out, "run -p 99999:80");
    assert_eq!(snapshot(), before, "after the bad-flag failure");

    // x itself was left alone by all that.
    assert_eq!(lab.container("x").expect("x listed")["status"], "running");
}

#[test]
fn detached_network_is_removed_when_cmd_exits() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("detexit");
    assert!(lab.md_veths().is_empty());
    run_d(&lab, "s", &["sleep", "2"]);
    let veths = lab.md_veths();
    assert_eq!(veths.len(), 1, "one veth for s: {veths:?}");
    assert!(
        lab.container("s").is_some(),
        "s not listed right after run -d"
    );

    wait_until(
        "s leaves ps after its command exits",
        Duration::from_secs(10),
        || lab.container("s").is_none(),
    );
    wait_until("s's veth is removed", Duration::from_secs(3), || {
        !lab.links().contains(&veths[0])
    });
}

/// Programs that an strace output shows being exec'd (successfully or not).
fn execs(trace: &Path) -> Vec<String> {
    let text =
        std::fs::read_to_string(trace).unwrap_or_else(|e| panic!("read {}: {e}", trace.display()));
    text.lines()
        .filter_map(|l| {
            let i = l.find("execve(").or_else(|| l.find("execveat("))?;
            let rest = &l[i..];
            let start = rest.find('"')? + 1;
            let len = rest[start..].find('"')?;
            Some(rest[start..start + len].to_string())
        })
        .collect()
}

#[test]
fn md_user_never_executes_external_tools() {
    if !require_e2e() {
        return;
    }
    require_tools(&["strace"]);
    let lab = Lab::new("strace");
    let bin = lab.md_bin().to_path_buf();
    let bin_s = bin.to_str().expect("utf-8 path");
    let strace = |trace: &Path, args: &[&str]| {
        let mut a = vec!["-f", "-qq", "-e", "trace=execve,execveat", "-o"];
        a.push(trace.to_str().unwrap());
        a.push(bin_s);
        a.extend_from_slice(args);
        lab.host_md_cmd("strace", &a)
    };

    // strace -f follows the detached supervisor and md's host watcher, so it returns only when
    // both exit (after stop and down).
    let t_run = lab.log_path("strace-run.txt");
    let mut traced_run = Bg::spawn(
        &mut strace(&t_run, &["run", "-d", "--name", "st", "--", "sleep", "300"]),
        &lab.log_path("strace-run"),
    );
    lab.wait_running_fg("st", &mut traced_run, RUNNING);
    let t_stop = lab.log_path("strace-stop.txt");
    let out = run_timeout(&mut strace(&t_stop, &["stop", "st"]), MD_TIMEOUT);
    assert!(out.status.success(), "traced stop\n{}", show_output(&out));
    let t_down = lab.log_path("strace-down.txt");
    let out = run_timeout(&mut strace(&t_down, &["down"]), MD_TIMEOUT);
    assert!(out.status.success(), "traced down\n{}", show_output(&out));
    let st = traced_run.wait_timeout(Duration::from_secs(30));
    assert!(st.success(), "traced run -d: {st}\n{}", traced_run.stderr());

    let md_name = bin.file_name().unwrap().to_string_lossy().into_owned();
    let allowed = |p: &str| {
        let base = p.rsplit('/').next().unwrap_or(p);
        p == bin_s
            || base == md_name
            || base == "sleep"
            || (p.starts_with("/proc/") && p.ends_with("/exe"))
    };
    let all: Vec<String> = [&t_run, &t_stop, &t_down]
        .into_iter()
        .flat_map(|t| execs(t))
        .collect();
    let run_execs = execs(&t_run);
    assert!(
        run_execs.iter().any(|p| p.ends_with("/sleep")),
        "the trace does not even show the container's command being exec'd: {run_execs:?}"
    );
    let bad: Vec<&String> = all.iter().filter(|p| !allowed(p)).collect();
    assert!(
        bad.is_empty(),
        "md-user exec'd programs other than itself and the container's command: {bad:?}"
    );
}

#[test]
fn sigterm_to_a_foreground_run_is_forwarded_and_its_status_returned() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("sigterm");
    let mut fg = lab.spawn_md(&[
        "run",
        "--name",
        "t",
        "--",
        "sh",
        "-c",
        "trap 'exit 7' TERM; sleep 300 & wait",
    ]);
    let t = lab.wait_running_fg("t", &mut fg, RUNNING);
    let sh = pid_of(&t);
    // Once the shell has started its sleep, the trap is installed.
    let sleep = wait_for("t's shell starts sleep", Duration::from_secs(10), || {
        children(sh)
            .into_iter()
            .find(|&c| comm(c).as_deref() == Some("sleep"))
    });
    lab.track_pid(sleep);

    fg.signal(libc::SIGTERM);
    let st = fg.wait_timeout(Duration::from_secs(30));
    assert_eq!(
        st.code(),
        Some(7),
        "md-user should exit with CMD's status after forwarding SIGTERM ({st})\n{}",
        fg.stderr()
    );
    assert!(lab.ps().is_empty(), "t still listed after its run returned");
    assert!(
        lab.md_veths().is_empty(),
        "veth left after the run returned: {:?}",
        lab.links()
    );
}

/// Keys of a pinned map as `bpftool map dump` shows them, sorted.
fn map_keys(lab: &Lab, map: &str) -> Vec<String> {
    let mut keys: Vec<String> = lab
        .map_dump(map)
        .iter()
        .map(|e| e["key"].to_string())
        .collect();
    keys.sort();
    keys
}

#[test]
fn a_failed_endpoint_setup_leaves_no_map_entries() {
    if !require_e2e() {
        return;
    }
    require_tools(&["bpftool"]);
    let lab = Lab::new("setup-fail");
    run_d(&lab, "x", &["sleep", "300"]);
    // Fill ENDPOINTS with addresses nobody uses: the next setup fails at its last write, after
    // its veth, its IF_STATS and VETH_OWNERS entries and its programs exist.
    let endpoints = lab.pin_dir().join("maps").join("ENDPOINTS");
    let path = endpoints.to_str().unwrap();
    let show = run_timeout(
        std::process::Command::new("bpftool").args(["map", "show", "pinned", path, "-j"]),
        MD_TIMEOUT,
    );
    let info: Value = serde_json::from_slice(&show.stdout).expect("bpftool map show -j");
    let max = info["max_entries"].as_u64().expect("max_entries") as usize;
    let free = max - lab.map_dump("ENDPOINTS").len();
    let zeros = vec!["0"; 24].join(" ");
    let batch: String = (0..free)
        .map(|i| {
            format!(
                "map update pinned {path} key 10 200 {} {} value {zeros}\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    let file = lab.dir().join("fill-endpoints");
    std::fs::write(&file, batch).unwrap();
    let out = run_timeout(
        std::process::Command::new("bpftool").args(["batch", "file", file.to_str().unwrap()]),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "filling ENDPOINTS\n{}",
        show_output(&out)
    );
    let before = (
        map_keys(&lab, "VETH_OWNERS"),
        map_keys(&lab, "IF_STATS"),
        lab.links(),
    );

    let out = lab.md(&["run", "-d", "--name", "y", "--", "sleep", "300"]);
    let err = assert_one_line_error(&out, "run with ENDPOINTS full");
    assert!(err.contains("ENDPOINTS"), "{err}");
    let after = (
        map_keys(&lab, "VETH_OWNERS"),
        map_keys(&lab, "IF_STATS"),
        lab.links(),
    );
    assert_eq!(
        after, before,
        "(VETH_OWNERS, IF_STATS, links) after the failed setup"
    );
    assert_eq!(lab.ps_names(), ["x"]);
}
