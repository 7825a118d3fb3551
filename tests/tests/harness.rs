//! Self-tests of the lab harness. They need root but not md-user: run them with
//! `MD_E2E=1 MD_USER_BIN=/bin/true cargo test -p md-tests lab_selftest`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use md_tests::helpers::fx;
use md_tests::process::alive;
use md_tests::{
    is_mountpoint, remove_pin_dir, require_e2e, require_tools, stdout_str, wait_for, Lab,
    HOST_UPLINK_IP, OUTSIDE_IP, UPLINK,
};

/// What a lab leaves on the machine if its cleanup fails.
struct Traces {
    netns: Vec<String>,
    pin_dir: PathBuf,
    dir: PathBuf,
}

impl Traces {
    fn of(lab: &Lab) -> Traces {
        Traces {
            netns: vec![lab.host_ns().to_string(), lab.outside_ns().to_string()],
            pin_dir: lab.pin_dir().to_path_buf(),
            dir: lab.dir().to_path_buf(),
        }
    }

    fn assert_gone(&self) {
        let list = String::from_utf8_lossy(
            &std::process::Command::new("ip")
                .args(["netns", "list"])
                .output()
                .expect("ip netns list")
                .stdout,
        )
        .into_owned();
        for ns in &self.netns {
            assert!(
                !list
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(ns)),
                "netns {ns} left behind:\n{list}"
            );
            assert!(!Path::new("/run/netns").join(ns).exists());
        }
        assert!(
            !self.pin_dir.exists(),
            "{} left behind",
            self.pin_dir.display()
        );
        assert!(!self.dir.exists(), "{} left behind", self.dir.display());
    }
}

/// Pids of every process in a namespace (`ip netns pids`).
fn netns_pids(ns: &str) -> Vec<i32> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn lab_selftest() {
    if !require_e2e() {
        return;
    }
    require_tools(&["ping", "python3", "curl", "ss"]);
    let lab = Lab::new("selftest");
    let traces = Traces::of(&lab);

    // Uplink: the host reaches the outside namespace, its default route points there.
    lab.host_ok(&["ping", "-c1", "-W2", OUTSIDE_IP]);
    let route = lab.host_ok(&["ip", "-4", "route", "show", "default"]);
    assert!(
        route.contains(&format!("via {OUTSIDE_IP} dev {UPLINK}")),
        "host default route: {route}"
    );
    assert_eq!(
        lab.links(),
        ["lo", UPLINK],
        "host ns starts with lo and the uplink only"
    );

    // The outside cannot route back to containers: only masquerade can make replies work.
    let routes = lab.outside_ok(&["ip", "-4", "route", "show"]);
    assert!(
        !routes.contains("172.18") && !routes.contains("default"),
        "{routes}"
    );
    let get = lab.outside(&["ip", "route", "get", "172.18.0.2"]);
    assert!(
        !get.status.success(),
        "outside has a route to 172.18.0.2: {}",
        stdout_str(&get)
    );

    // Fixtures: the peer servers report the client address they saw.
    let _http = lab.spawn_outside(&["python3", &fx("peer_http.py"), "8080", OUTSIDE_IP]);
    lab.wait_listening_outside("tcp", 8080);
    let body = lab.host_ok(&["curl", "-sS", "--max-time", "5", "http://192.0.2.2:8080/"]);
    assert!(
        body.trim().starts_with(&format!("{HOST_UPLINK_IP}:")),
        "http peer said {body}"
    );

    let _udp = lab.spawn_outside(&["python3", &fx("peer_udp.py"), "9090", OUTSIDE_IP]);
    lab.wait_listening_outside("udp", 9090);
    let reply = lab.host_ok(&["python3", &fx("udp_ask.py"), OUTSIDE_IP, "9090"]);
    assert!(
        reply.trim().starts_with(&format!("{HOST_UPLINK_IP}:")),
        "udp peer said {reply}"
    );

    // A process that escaped every guard (daemonised in the host ns) must die with the lab.
    lab.host_ok(&["sh", "-c", "sleep 300 >/dev/null 2>&1 </dev/null &"]);
    let stray = wait_for("the stray sleep shows up", Duration::from_secs(5), || {
        netns_pids(lab.host_ns())
            .into_iter()
            .find(|&p| md_tests::process::comm(p).as_deref() == Some("sleep"))
    });
    let server = _http.pid();

    drop(_udp);
    drop(_http);
    drop(lab);
    traces.assert_gone();
    assert!(!alive(stray), "stray process {stray} survived the lab");
    assert!(
        !alive(server),
        "background server {server} survived the lab"
    );
}

#[test]
fn lab_selftest_cleans_up_after_panic() {
    if !require_e2e() {
        return;
    }
    let mut traces = None;
    let mut pid = 0;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::new("panic");
        traces = Some(Traces::of(&lab));
        let bg = lab.spawn_outside(&["sleep", "300"]);
        pid = bg.pid();
        // Leak the guard: the lab alone has to find and kill the process.
        std::mem::forget(bg);
        panic!("deliberate failure inside a lab");
    }));
    assert!(r.is_err());
    traces.expect("lab was built").assert_gone();
    // The forgotten child is ours and unreaped: reap it if it was killed.
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid out-pointer.
    let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    assert!(
        reaped == pid && libc::WIFSIGNALED(status),
        "process {pid} in the panicked lab was not killed (waitpid -> {reaped})"
    );
}

#[test]
fn lab_selftest_pin_dir_cleanup_unmounts() {
    if !require_e2e() {
        return;
    }
    // Stands in for a bpffs pin dir: a tmpfs mounted on a directory of our own, with files and
    // a subdirectory inside.
    let dir = std::env::temp_dir().join(format!("md-tests-pin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "md-tests-pin", dir.to_str().unwrap()])
        .status()
        .expect("mount");
    assert!(st.success(), "mount tmpfs on {}", dir.display());
    assert!(is_mountpoint(&dir));
    std::fs::create_dir(dir.join("maps")).unwrap();
    std::fs::write(dir.join("maps/x"), b"x").unwrap();
    std::fs::write(dir.join("prog"), b"p").unwrap();
    let r = remove_pin_dir(&dir);
    let gone = !dir.exists();
    // Clean up by hand whatever remove_pin_dir missed, before asserting.
    if is_mountpoint(&dir) {
        let _ = std::process::Command::new("umount").arg(&dir).status();
    }
    let _ = std::fs::remove_dir_all(&dir);
    r.expect("remove_pin_dir");
    assert!(gone, "remove_pin_dir left {}", dir.display());
    // A missing pin dir is fine.
    remove_pin_dir(&dir).expect("missing dir");
}
