//! Issue 13: the redirect datapath. md delivers what it decided itself: from the uplink
//! straight into a container (bpf_redirect_peer), from a container straight to the uplink
//! (FIB lookup + bpf_redirect), container to container (bpf_redirect_peer). These tests prove
//! the fast path is taken (the `redirected` counters move) and that what users rely on still
//! holds there: published ports, masquerade, container to container, big transfers (GSO),
//! tcpdump inside a container, and that `--datapath stack` still works and is shown.

use std::time::Duration;

use md_tests::helpers::{counter, fx, run_d, stats_row};
use md_tests::process::show_output;
use md_tests::{require_e2e, require_tools, stdout_str, Lab, HOST_UPLINK_IP, OUTSIDE_IP};

fn curl(url: &str) -> [&str; 5] {
    ["curl", "-sS", "--max-time", "10", url]
}

#[track_caller]
fn ok(out: std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what}\n{}", show_output(&out));
    stdout_str(&out)
}

fn redirected(lab: &Lab, name: &str) -> u64 {
    counter(stats_row(&lab.stats(), name), "redirected")
}

/// Runs the everyday paths in the datapath `mode` and returns how many packets md redirected
/// for containers `web` and `cli`.
fn everyday_paths(lab: &Lab, mode: &str) -> (u64, u64) {
    let _srv = lab.spawn_outside(&["python3", &fx("peer_http.py"), "8000"]);
    lab.wait_listening_outside("tcp", 8000);
    let dp = format!("--datapath={mode}");
    lab.md_ok(&[
        &dp,
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        "8080:80",
        "--",
        "python3",
        &fx("peer_http.py"),
        "80",
    ]);
    lab.wait_listening_in("web", "tcp", 80);
    run_d(lab, "cli", &[], &["sleep", "600"]);
    let s = lab.stats();
    assert_eq!(
        s["datapath"].as_str(),
        Some(mode),
        "stats shows the datapath"
    );
    let i = lab.md_ok(&["inspect", "web", "--json"]);
    assert!(
        i.contains(&format!("\"Datapath\": \"{mode}\"")),
        "inspect: {i}"
    );

    // Outside -> published port -> web.
    let seen = ok(
        lab.outside(&curl(&format!("http://{HOST_UPLINK_IP}:8080/"))),
        "outside -> published port",
    );
    assert!(seen.starts_with(OUTSIDE_IP), "web saw the client: {seen}");
    // cli -> outside, masqueraded.
    let seen = ok(
        lab.exec("cli", &curl(&format!("http://{OUTSIDE_IP}:8000/"))),
        "container -> outside",
    );
    assert!(seen.starts_with(HOST_UPLINK_IP), "masqueraded: {seen}");
    // cli -> web directly.
    let web_ip = lab.ip_of("web");
    let seen = ok(
        lab.exec("cli", &curl(&format!("http://{web_ip}:80/"))),
        "container -> container",
    );
    assert!(seen.starts_with(&lab.ip_of("cli")), "{seen}");
    // Hairpin through the host's address.
    ok(
        lab.exec("cli", &curl(&format!("http://{HOST_UPLINK_IP}:8080/"))),
        "hairpin",
    );
    // The host's own client.
    ok(
        lab.host(&curl("http://127.0.0.1:8080/")),
        "host -> 127.0.0.1:8080",
    );
    (redirected(lab, "web"), redirected(lab, "cli"))
}

#[test]
fn redirect_datapath_is_the_default_and_carries_every_path() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "curl", "ss"]);
    let lab = Lab::new("fast-redirect");
    let (web, cli) = everyday_paths(&lab, "redirect");
    assert!(web > 0, "packets into web were redirected: {web}");
    assert!(cli > 0, "packets from and to cli were redirected: {cli}");
}

#[test]
fn stack_datapath_still_works_and_redirects_nothing() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "curl", "ss"]);
    let lab = Lab::new("fast-stack");
    let (web, cli) = everyday_paths(&lab, "stack");
    assert_eq!(
        (web, cli),
        (0, 0),
        "nothing redirected in the stack datapath"
    );
    // Switching back is live: the next command that sets up networking carries the mode.
    lab.md_ok(&[
        "--datapath",
        "redirect",
        "run",
        "-d",
        "--name",
        "x",
        "--",
        "sleep",
        "60",
    ]);
    assert_eq!(lab.stats()["datapath"].as_str(), Some("redirect"));
    ok(
        lab.outside(&curl(&format!("http://{HOST_UPLINK_IP}:8080/"))),
        "after the switch",
    );
    assert!(redirected(&lab, "web") > 0, "redirected after the switch");
}

/// Big transfers: TSO/GSO segments from a container and GRO'd ones into it keep their size
/// limits on the redirected path (10 MB each way, through masquerade and a published port).
#[test]
fn redirected_path_carries_big_transfers() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "curl", "ss", "head"]);
    let lab = Lab::new("fast-gso");
    let blob = lab.dir().join("blob");
    std::fs::write(&blob, vec![0x5a; 10 << 20]).unwrap();
    let dir = lab.dir().to_str().unwrap().to_string();
    let _srv = lab.spawn_outside(&["python3", "-m", "http.server", "8000", "--directory", &dir]);
    lab.wait_listening_outside("tcp", 8000);
    run_d(
        &lab,
        "files",
        &["-p", "8080:8080"],
        &["python3", "-m", "http.server", "8080", "--directory", &dir],
    );
    lab.wait_listening_in("files", "tcp", 8080);
    let size =
        |out: std::process::Output, what: &str| ok(out, what).trim().parse::<u64>().unwrap_or(0);
    let got = size(
        lab.exec(
            "files",
            &[
                "curl",
                "-sS",
                "--max-time",
                "30",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                &format!("http://{OUTSIDE_IP}:8000/blob"),
            ],
        ),
        "10 MB from outside into the container",
    );
    assert_eq!(got, 10 << 20);
    let got = size(
        lab.outside(&[
            "curl",
            "-sS",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("http://{HOST_UPLINK_IP}:8080/blob"),
        ]),
        "10 MB out of the container through its published port",
    );
    assert_eq!(got, 10 << 20);
    assert!(redirected(&lab, "files") > 100);
}

/// tcpdump inside a container sees what md redirected into it (bpf_redirect_peer delivers to
/// the container's eth0 as if it came off the wire).
#[test]
fn tcpdump_in_a_container_sees_redirected_traffic() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "curl", "ss", "tcpdump"]);
    let lab = Lab::new("fast-tcpdump");
    run_d(
        &lab,
        "web",
        &["-p", "8080:80"],
        &["python3", &fx("peer_http.py"), "80"],
    );
    lab.wait_listening_in("web", "tcp", 80);
    let mut dump = lab.spawn_exec(
        "web",
        &[
            "tcpdump", "-p", "-l", "-n", "-i", "eth0", "-c", "1", "tcp", "port", "80", "and",
            "src", OUTSIDE_IP,
        ],
    );
    // tcpdump needs a moment to attach; retry the request until it saw one.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while dump.try_status().is_none() && std::time::Instant::now() < deadline {
        let _ = lab.outside(&curl(&format!("http://{HOST_UPLINK_IP}:8080/")));
        std::thread::sleep(Duration::from_millis(300));
    }
    let st = dump.wait_timeout(Duration::from_secs(5));
    assert!(
        st.success() && dump.stdout().contains(OUTSIDE_IP),
        "tcpdump in the container saw nothing ({st})\n{}\n{}",
        dump.stdout(),
        dump.stderr()
    );
    assert!(redirected(&lab, "web") > 0);
}

/// The program id of a pinned program (bpftool, from the root namespace: pins are global).
fn prog_id(lab: &Lab, prog: &str) -> Option<u64> {
    let pin = lab.pin_dir().join("progs").join(prog);
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "pinned", pin.to_str()?, "-j"])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["id"].as_u64()
}

/// Programs load once per boot: `md-user watch` (md-watch.service) loads and attaches the
/// datapath when it starts, before any container, and the first `run` uses what it loaded.
#[test]
fn the_watcher_loads_the_datapath_before_the_first_container() {
    if !require_e2e() {
        return;
    }
    require_tools(&["bpftool", "sleep"]);
    let lab = Lab::new("fast-preload");
    let _watch = lab.spawn_md(&["watch"]);
    let uplink_pins = || {
        std::fs::read_dir(lab.pin_dir().join("links"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("if"))
                    .count()
            })
            .unwrap_or(0)
    };
    // up0 covered (ingress and egress) before any container.
    md_tests::wait_for(
        "the watcher loaded and attached the datapath",
        Duration::from_secs(60),
        || (uplink_pins() == 2).then_some(()),
    );
    let before = prog_id(&lab, "md_veth_ingress");
    assert!(before.is_some());
    run_d(&lab, "first", &[], &["sleep", "60"]);
    assert_eq!(
        prog_id(&lab, "md_veth_ingress"),
        before,
        "the first container used the programs the watcher loaded"
    );
}
