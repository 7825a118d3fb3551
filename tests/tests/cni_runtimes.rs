//! md's CNI plugin under real runtimes from Debian (issue 15): Podman 4.3 with its CNI backend
//! and containerd 1.6 with `ctr run --cni`, both inside the lab (see `md_tests::runtimes`),
//! on busybox-static containers. Their containers and an `md-user run` container share md's
//! network: a published port answers from the outside namespace, names resolve through md's
//! resolver in every direction, `md-user policy deny` drops traffic between them, and md-user's
//! ps/stats show them by the runtime's names.

use std::time::Duration;

use md_tests::helpers::{fx, run_d, stats_row};
use md_tests::runtimes::{busybox_rootfs, image_tar, Containerd, Podman};
use md_tests::{require_e2e, require_tools, stdout_str, wait_for, Lab, GATEWAY, HOST_UPLINK_IP};
use serde_json::{json, Value};

/// The conflist of CNI network `name` with md as its only plugin; `extra` goes into md's entry.
fn conflist(lab: &Lab, name: &str, extra: Value) -> Value {
    let mut md = lab.cni_conf("1.0.0", name, extra);
    md["capabilities"] = json!({"portMappings": true, "aliases": true, "ips": true, "mac": true});
    json!({"cniVersion": "1.0.0", "name": name, "plugins": [md]})
}

/// The last address busybox's `nslookup` printed (the answer; the server's comes first).
fn answer(nslookup: &str) -> Option<String> {
    nslookup
        .lines()
        .filter(|l| l.starts_with("Address"))
        .filter_map(|l| l.split_whitespace().last())
        .map(|a| a.trim_end_matches("#53").to_string())
        .rfind(|a| a != GATEWAY && !a.starts_with(&format!("{GATEWAY}:")))
}

/// A shell line for a busybox container: GET / from `ip`:80 with nc, printing the response
/// (busybox-static's wget goes through glibc's resolver, which a static binary cannot load).
fn http_get(ip: &str) -> String {
    format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80")
}

/// `dig +short` in an md-user run container (its resolv.conf names md's resolver).
fn dig(lab: &Lab, container: &str, name: &str) -> String {
    stdout_str(&lab.exec(container, &["dig", "+short", "+time=2", "+tries=2", name]))
}

/// What `md-user ps` says about a name.
fn ps_ip(lab: &Lab, name: &str) -> Option<String> {
    lab.container(name)
        .and_then(|c| c["ip"].as_str().map(String::from))
}

#[track_caller]
fn published_port_answers(lab: &Lab, port: u16) {
    let url = format!("http://{HOST_UPLINK_IP}:{port}/index.html");
    let got = wait_for(
        "the published port answers outside",
        Duration::from_secs(30),
        || {
            let o = lab.outside(&["curl", "-s", "--max-time", "2", &url]);
            o.status.success().then(|| stdout_str(&o))
        },
    );
    assert_eq!(got, "hello from md");
}

#[test]
fn podman_containers_on_md() {
    if !require_e2e() {
        return;
    }
    require_tools(&[
        "podman", "runc", "conmon", "busybox", "curl", "dig", "python3",
    ]);
    let lab = Lab::new("cni podman");
    let rootfs = lab.dir().join("rootfs");
    busybox_rootfs(&rootfs, GATEWAY);
    let podman = Podman::new(
        &lab,
        &[("mdnet.conflist", conflist(&lab, "mdnet", json!({})))],
    );
    let httpd = ["httpd", "-f", "-p", "80", "-h", "/tmp"];
    podman.run_d(
        "web",
        &[
            "--network",
            "mdnet",
            "-p",
            "8080:80",
            "--network-alias",
            "www",
        ],
        &rootfs,
        &httpd,
    );
    // --ip and --mac-address reach md's IPAM through CNI_ARGS.
    let api_opts = [
        "--network",
        "mdnet",
        "--ip",
        "172.18.0.50",
        "--mac-address",
        "02:00:00:00:00:50",
    ];
    podman.run_d("api", &api_opts, &rootfs, &httpd);
    run_d(&lab, "runner", &[], &["python3", &fx("peer_http.py"), "80"]);

    // md-user sees Podman's containers by their Podman names.
    let web_ip = ps_ip(&lab, "web").expect("web in md-user ps");
    let api_ip = ps_ip(&lab, "api").expect("api in md-user ps");
    let runner_ip = lab.ip_of("runner");
    assert_eq!(lab.ps_entry("web")["ports"][0], "8080:80/tcp");
    assert_eq!(api_ip, "172.18.0.50");
    let mac = podman.ok(&["exec", "api", "cat", "/sys/class/net/eth0/address"]);
    assert_eq!(mac, "02:00:00:00:00:50");
    // Podman's own view agrees with md's IPAM.
    let inspect = podman.ok(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.Networks.mdnet.IPAddress}}",
        "web",
    ]);
    assert_eq!(inspect, web_ip);

    // -p: reachable from the outside namespace through md's eBPF DNAT.
    published_port_answers(&lab, 8080);
    assert!(stats_row(&lab.stats(), "web")["dnat"].as_u64().unwrap() > 0);

    // Names, every direction, through md's resolver (first in Podman's resolv.conf).
    let resolv = podman.ok(&["exec", "web", "cat", "/etc/resolv.conf"]);
    assert!(
        resolv.lines().next() == Some(&*format!("nameserver {GATEWAY}")),
        "{resolv}"
    );
    let lookup = |from: &str, name: &str| answer(&podman.ok(&["exec", from, "nslookup", name]));
    assert_eq!(lookup("web", "api").as_deref(), Some(api_ip.as_str()));
    assert_eq!(lookup("api", "www").as_deref(), Some(web_ip.as_str()));
    assert_eq!(lookup("api", "runner").as_deref(), Some(runner_ip.as_str()));
    assert_eq!(dig(&lab, "runner", "web"), web_ip);

    // Policy between a Podman container and the others.
    let wget = |from: &str, ip: &str| {
        let o = podman.run(&["exec", from, "sh", "-c", &http_get(ip)]);
        stdout_str(&o).contains(" 200 ")
    };
    assert!(wget("web", &api_ip), "web cannot reach api before any rule");
    lab.wait_listening_in("runner", "tcp", 80);
    assert!(
        wget("web", &runner_ip),
        "web cannot reach runner before any rule"
    );
    lab.md_ok(&["policy", "deny", "web", "api"]);
    assert!(
        !wget("web", &api_ip),
        "web still reaches api after policy deny"
    );
    assert!(
        wget("api", &web_ip),
        "the deny web -> api must not stop api -> web"
    );
    lab.md_ok(&["policy", "deny", "runner", "web"]);
    let url = format!("http://{web_ip}/index.html");
    let from_runner = lab.exec("runner", &["curl", "-s", "--max-time", "2", &url]);
    assert!(
        !from_runner.status.success(),
        "runner reaches web after policy deny"
    );

    // Podman's rm runs the CNI DEL: md forgets web and frees its port.
    podman.ok(&["rm", "-f", "-t", "0", "web"]);
    assert!(lab.container("web").is_none(), "web still in md-user ps");
    podman.run_d(
        "web2",
        &["--network", "mdnet", "-p", "8080:80"],
        &rootfs,
        &httpd,
    );
    published_port_answers(&lab, 8080);
}

#[test]
fn containerd_containers_on_md() {
    if !require_e2e() {
        return;
    }
    require_tools(&[
        "containerd",
        "ctr",
        "runc",
        "busybox",
        "curl",
        "dig",
        "python3",
    ]);
    let lab = Lab::new("cni containerd");
    let rootfs = lab.dir().join("rootfs");
    busybox_rootfs(&rootfs, GATEWAY);
    let tar = image_tar(&rootfs, &lab.dir().join("image"), "md.test/busybox:latest");
    let ctd = Containerd::new(&lab);
    ctd.ctr_ok(&["image", "import", tar.to_str().unwrap()]);
    let image = "md.test/busybox:latest";
    let httpd = ["httpd", "-f", "-p", "80", "-h", "/tmp"];
    // ctr has no -p: the first container's conflist carries the mapping as the runtimeConfig
    // a CRI runtime would pass through the portMappings capability.
    let ports = json!({"runtimeConfig": {"portMappings": [
        {"hostPort": 8081, "containerPort": 80, "protocol": "tcp"}]}});
    ctd.set_conflist(&conflist(&lab, "mdnet", ports));
    ctd.run_d(image, "web", &httpd);
    ctd.set_conflist(&conflist(&lab, "mdnet", json!({})));
    ctd.run_d(image, "api", &httpd);
    run_d(&lab, "runner", &[], &["python3", &fx("peer_http.py"), "80"]);

    // ctr passes no name: md names them by their CNI container id (namespace-id).
    let web_ip = ps_ip(&lab, "default-web").expect("default-web in md-user ps");
    let api_ip = ps_ip(&lab, "default-api").expect("default-api in md-user ps");
    let runner_ip = lab.ip_of("runner");
    published_port_answers(&lab, 8081);

    let exec = |id: &str, n: usize, args: &[&str]| {
        let exec_id = format!("x{n}");
        let mut a = vec!["task", "exec", "--exec-id", &exec_id, id];
        a.extend_from_slice(args);
        ctd.ctr(&a)
    };
    let lookup = |from: &str, n: usize, name: &str| {
        answer(&stdout_str(&exec(from, n, &["nslookup", name, GATEWAY])))
    };
    assert_eq!(
        lookup("web", 1, "default-api").as_deref(),
        Some(api_ip.as_str())
    );
    assert_eq!(
        lookup("api", 2, "runner").as_deref(),
        Some(runner_ip.as_str())
    );
    assert_eq!(dig(&lab, "runner", "default-web"), web_ip);

    let wget = |from: &str, n: usize, ip: &str| {
        stdout_str(&exec(from, n, &["sh", "-c", &http_get(ip)])).contains(" 200 ")
    };
    assert!(
        wget("web", 3, &api_ip),
        "web cannot reach api before any rule"
    );
    lab.md_ok(&["policy", "deny", "default-web", "default-api"]);
    assert!(
        !wget("web", 4, &api_ip),
        "web still reaches api after policy deny"
    );
    assert!(wget("api", 5, &web_ip), "the deny must not stop api -> web");

    // A detached ctr container gets no CNI DEL when its task is killed: md reclaims it once
    // its namespace (and so its veth) is gone.
    ctd.remove("web");
    wait_for("md forgets default-web", Duration::from_secs(10), || {
        lab.container("default-web").is_none().then_some(())
    });
    let gone = lab.outside(&[
        "curl",
        "-s",
        "--max-time",
        "2",
        &format!("http://{HOST_UPLINK_IP}:8081/"),
    ]);
    assert!(
        !gone.status.success(),
        "the port of a removed container still answers"
    );
}
