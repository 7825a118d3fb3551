//! Issue 12, item 10, and the root-only files: what a container's processes may do.
//!
//! - CMD runs as Docker runs it by default: only Docker's default capabilities (bounding,
//!   effective and permitted; inheritable and ambient empty) and a PID namespace of its own,
//!   whose PID 1 is md's init. So it cannot setns into the host's network namespace, cannot
//!   open md's pinned BPF maps, and sees only its own processes. `md-user exec` joins the same
//!   PID namespace with the same capabilities.
//! - The init forwards signals to CMD, reaps orphans and exits with CMD's status.
//! - `--privileged` brings back every capability and the host's PID namespace.
//! - md's state dir, state file and container logs are readable by root only.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use md_tests::helpers::{assert_one_line_error, run_d};
use md_tests::process::{alive, show_output};
use md_tests::{require_e2e, require_tools, stdout_str, wait_for, wait_until, Lab};

/// Docker's default set (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP,
/// NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP) as `CapBnd` shows it.
const DOCKER_CAPS: u64 = 0xa80425fb;
const RUNNING: Duration = Duration::from_secs(20);

/// Prints its own capability lines, then waits.
const SHOW_CAPS: &str = "grep ^Cap /proc/self/status; exec sleep 600";
/// Prints its own pid (as it sees it), then waits.
const SHOW_PID: &str = "echo pid=$$; exec sleep 600";

/// `Cap*` lines of a /proc/PID/status, by name.
#[track_caller]
fn caps(status: &str) -> BTreeMap<String, u64> {
    let m: BTreeMap<String, u64> = status
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_string(), u64::from_str_radix(v.trim(), 16).ok()?))
        })
        .collect();
    assert_eq!(m.len(), 5, "expected 5 Cap* lines in:\n{status}");
    m
}

#[track_caller]
fn assert_docker_caps(c: &BTreeMap<String, u64>, who: &str) {
    for k in ["CapBnd", "CapEff", "CapPrm"] {
        assert_eq!(
            c[k], DOCKER_CAPS,
            "{who}: {k} {:#x} is not Docker's set",
            c[k]
        );
    }
    for k in ["CapInh", "CapAmb"] {
        assert_eq!(c[k], 0, "{who}: {k} {:#x} is not empty", c[k]);
    }
}

/// What the test process itself (root, the harness) has: the full set.
fn full_caps() -> u64 {
    caps(&std::fs::read_to_string("/proc/self/status").unwrap())["CapBnd"]
}

/// Waits until `md-user logs NAME` has a line starting with `prefix`; returns the whole log.
#[track_caller]
fn log_with(lab: &Lab, name: &str, prefix: &str) -> String {
    wait_for(&format!("{name}'s log shows {prefix:?}"), RUNNING, || {
        let out = lab.md(&["logs", name]);
        let s = stdout_str(&out);
        s.lines().any(|l| l.starts_with(prefix)).then_some(s)
    })
}

#[test]
fn cmd_and_exec_keep_only_dockers_default_capabilities() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("caps");
    run_d(&lab, "c", &[], &["sh", "-c", SHOW_CAPS]);
    run_d(&lab, "h", &["--network", "host"], &["sh", "-c", SHOW_CAPS]);
    for name in ["c", "h"] {
        assert_docker_caps(
            &caps(&log_with(&lab, name, "CapAmb")),
            &format!("{name}'s CMD"),
        );
        let st = lab.exec_ok(name, &["cat", "/proc/self/status"]);
        assert_docker_caps(&caps(&st), &format!("exec in {name}"));
    }
    run_d(&lab, "p", &["--privileged"], &["sh", "-c", SHOW_CAPS]);
    let privileged = |n: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&lab.md_ok(&["inspect", n, "--json"])).expect("inspect --json");
        v["HostConfig"]["Privileged"].as_bool()
    };
    assert_eq!(
        (privileged("c"), privileged("p")),
        (Some(false), Some(true))
    );
    let full = full_caps();
    let p = caps(&log_with(&lab, "p", "CapAmb"));
    assert_eq!(
        (p["CapBnd"], p["CapEff"]),
        (full, full),
        "--privileged CMD: {p:?}"
    );
    let p = caps(&lab.exec_ok("p", &["cat", "/proc/self/status"]));
    assert_eq!(
        (p["CapBnd"], p["CapEff"]),
        (full, full),
        "exec in --privileged: {p:?}"
    );
}

#[test]
fn a_container_cannot_enter_the_hosts_network_namespace_or_open_mds_maps() {
    if !require_e2e() {
        return;
    }
    require_tools(&["nsenter", "bpftool"]);
    let lab = Lab::new("escape");
    run_d(&lab, "c", &[], &["sleep", "600"]);
    // The lab's host namespace is a file every container's mount namespace still shows.
    let host_ns = format!("/run/netns/{}", lab.host_ns());
    let setns = ["nsenter", &format!("--net={host_ns}"), "--", "true"];
    let out = lab.exec("c", &setns);
    assert!(
        !out.status.success(),
        "a container entered the host's network namespace\n{}",
        show_output(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{}",
        show_output(&out)
    );
    run_d(&lab, "p", &["--privileged"], &["sleep", "600"]);
    lab.exec_ok("p", &setns);

    // md's pinned maps: out of reach, neither read nor written (the container's mount namespace
    // has no bpffs, and it has no CAP_BPF or CAP_SYS_ADMIN to mount one).
    let maps = lab.pin_dir().join("maps");
    let config = maps.join("CONFIG").to_string_lossy().into_owned();
    let policy = maps.join("POLICY").to_string_lossy().into_owned();
    let dump = ["bpftool", "map", "dump", "pinned", &config];
    let out = lab.exec("c", &dump);
    assert!(
        !out.status.success(),
        "a container read CONFIG\n{}",
        show_output(&out)
    );
    let update = [
        "bpftool", "map", "update", "pinned", &policy, "key", "hex", "01", "00", "00", "00", "02",
        "00", "00", "00", "value", "hex", "02", "00", "00", "00", "00", "00", "00", "00", "00",
        "00", "00", "00", "00", "00", "00", "00",
    ];
    let out = lab.exec("c", &update);
    assert!(
        !out.status.success(),
        "a container wrote POLICY\n{}",
        show_output(&out)
    );
    assert!(
        lab.map_dump("POLICY").is_empty(),
        "POLICY: {:?}",
        lab.map_dump("POLICY")
    );
    assert!(!lab.exec("c", &["test", "-e", &config]).status.success());
    // The privileged container, with the host's mounts and every capability, can.
    lab.exec_ok("p", &dump);
}

#[test]
fn cmd_has_its_own_pid_namespace_with_an_init_as_pid_1() {
    if !require_e2e() {
        return;
    }
    require_tools(&["ps"]);
    let lab = Lab::new("pidns");
    run_d(&lab, "c", &[], &["sh", "-c", SHOW_PID]);
    run_d(&lab, "h", &["--network", "host"], &["sh", "-c", SHOW_PID]);
    for name in ["c", "h"] {
        // CMD is the first child of the namespace's init.
        let log = log_with(&lab, name, "pid=");
        assert!(
            log.lines().any(|l| l == "pid=2"),
            "{name}'s CMD sees itself as {log:?}"
        );
        let init = lab.exec_ok(name, &["cat", "/proc/1/cmdline"]);
        assert!(init.contains("__init"), "PID 1 in {name} is {init:?}");
        // Its /proc shows its own processes only: the init, CMD, and this exec's ps.
        let seen = lab.exec_ok(name, &["ps", "-e", "-o", "pid=,comm="]);
        let pids: Vec<u32> = seen
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        assert!(
            pids.len() <= 4 && pids.contains(&1) && pids.contains(&2),
            "{name}: {seen}"
        );
        assert!(
            !pids.contains(&std::process::id()),
            "{name} sees the test process: {seen}"
        );
        // ps --json shows CMD's pid as the host sees it.
        let host_pid = lab.ps_entry(name)["pid"].as_u64().expect("pid") as u32;
        let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert!(nspid.ends_with("\t2"), "{name}'s CMD {host_pid}: {nspid}");
    }
    run_d(&lab, "p", &["--privileged"], &["sh", "-c", SHOW_PID]);
    let host_pid = lab.ps_entry("p")["pid"].as_u64().expect("pid");
    let log = log_with(&lab, "p", "pid=");
    assert!(
        log.lines().any(|l| l == format!("pid={host_pid}")),
        "--privileged CMD: {log:?}"
    );
    // `exec` in a --privileged container sees the host's processes, the test among them.
    let me = format!("/proc/{}/status", std::process::id());
    lab.exec_ok("p", &["test", "-e", &me]);
}

#[test]
fn the_init_forwards_signals_reaps_orphans_and_returns_cmds_status() {
    if !require_e2e() {
        return;
    }
    require_tools(&["ps"]);
    let lab = Lab::new("init");
    // An orphan that exits after a second: reparented to the init, which must reap it.
    let mut fg = lab.spawn_md(&[
        "run",
        "--name",
        "t",
        "--",
        "sh",
        "-c",
        "(sleep 1 &); trap 'exit 7' TERM; sleep 600 & wait",
    ]);
    lab.wait_running_fg("t", &mut fg, RUNNING);
    let deadline = std::time::Instant::now() + RUNNING;
    loop {
        let ps = lab.exec_ok("t", &["ps", "-e", "-o", "stat=,args="]);
        let orphan =
            |l: &str| l.starts_with('Z') || l.split_once(' ').unwrap().1.trim() == "sleep 1";
        if !ps.lines().any(orphan) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the orphan is not reaped:\n{ps}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SIGTERM to md-user → the init → CMD's trap: md-user exits with CMD's status.
    let cmd_pid = lab.ps_entry("t")["pid"].as_i64().expect("pid") as i32;
    fg.signal(libc::SIGTERM);
    let st = fg.wait_timeout(Duration::from_secs(30));
    assert_eq!(st.code(), Some(7), "{st}\n{}", fg.stderr());
    wait_until("t's CMD is gone", Duration::from_secs(5), || {
        !alive(cmd_pid)
    });
    assert!(lab.ps().is_empty());

    // Killed by a signal: 128+N, as a shell reports it.
    let out = lab.md(&["run", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "{}", show_output(&out));
    // A command the init cannot start (its interpreter is missing): one line, nothing left.
    let bad = lab.dir().join("not-a-program");
    std::fs::write(&bad, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = lab.md(&["run", "--", bad.to_str().unwrap()]);
    let err = assert_one_line_error(&out, "run of a file that is no program");
    assert!(err.contains("not-a-program"), "{err}");
    assert!(lab.md_veths().is_empty() && lab.ps().is_empty());
}

#[test]
fn state_and_logs_are_root_only() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("modes");
    run_d(&lab, "c", &[], &["sh", "-c", "echo secret; exec sleep 600"]);
    log_with(&lab, "c", "secret");
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let dir = lab.state_dir();
    for (p, want) in [
        (dir.to_path_buf(), 0o700),
        (dir.join("state.db"), 0o600),
        (dir.join("state.db-wal"), 0o600),
        (dir.join("logs"), 0o700),
        (dir.join("logs").join("c.log"), 0o600),
    ] {
        assert_eq!(mode(&p), want, "{} is {:o}", p.display(), mode(&p));
    }
}
