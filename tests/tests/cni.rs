//! md as a CNI plugin (issue 15), driven directly the way the reference plugins' integration
//! tests drive theirs: the lab makes a network namespace as a runtime would, calls the plugin
//! (md-user linked as `md`) with `CNI_*` and a configuration on stdin, and checks the result,
//! the namespace, md's state and real traffic. Every verb and error path: ADD, CHECK (with
//! drift), DEL (twice, and after the namespace is gone), GC, STATUS, VERSION, bad input, and a
//! plugin killed in the middle of ADD.

use std::path::Path;
use std::time::Duration;

use md_tests::cni::{with_prev, Attach, CniOut};
use md_tests::helpers::{fx, run_d, stats_row};
use md_tests::{require_e2e, require_tools, stdout_str, wait_for, Lab, GATEWAY, HOST_UPLINK_IP};
use serde_json::{json, Value};

const NET: &str = "mdnet";

fn attach<'a>(id: &'a str, netns: &'a Path, args: &'a str) -> Attach<'a> {
    Attach {
        container_id: id,
        netns,
        ifname: "eth0",
        args,
    }
}

/// The address ADD gave the container interface (without the prefix).
fn ip_of(result: &Value) -> String {
    let ips = result["ips"].as_array().expect("ips");
    let a = ips.last().expect("an address")["address"]
        .as_str()
        .expect("address string");
    a.split('/').next().unwrap().to_string()
}

/// A container name's `ps --json` entry, if listed.
fn ps_of(lab: &Lab, name: &str) -> Option<Value> {
    lab.ps().into_iter().find(|c| c["name"] == name)
}

/// Keys of a pinned hash map, as bpftool prints them (arrays of hex strings).
fn map_has_ip(lab: &Lab, map: &str, ip: &str) -> bool {
    let want: Vec<String> = ip
        .split('.')
        .map(|o| format!("0x{:02x}", o.parse::<u8>().unwrap()))
        .collect();
    lab.map_dump(map).iter().any(|e| {
        e["key"].as_array().is_some_and(|k| {
            k.iter()
                .map(|b| b.as_str().unwrap_or(""))
                .eq(want.iter().map(String::as_str))
        })
    })
}

#[track_caller]
fn assert_nothing_left(lab: &Lab) {
    assert!(lab.ps().is_empty(), "containers left: {:?}", lab.ps());
    assert!(
        lab.md_veths().is_empty(),
        "veths left: {:?}",
        lab.md_veths()
    );
    for map in ["ENDPOINTS", "VETH_OWNERS", "PORT_MAP"] {
        let left = lab.map_dump(map);
        assert!(left.is_empty(), "{map} not empty: {left:?}");
    }
}

#[test]
fn cni_version_lists_supported_versions() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("cni version");
    let out = lab.cni_raw(Some("VERSION"), None, r#"{"cniVersion":"1.1.0"}"#);
    let v = out.ok();
    assert_eq!(v["cniVersion"], "1.1.0");
    let versions: Vec<&str> = v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&want), "{want} missing from {versions:?}");
    }
}

/// ADD gives the namespace an interface on md's network with a published port and a name,
/// CHECK finds it intact, md-user's own commands see it, traffic flows; DEL removes all of it
/// and a second DEL still succeeds.
#[test]
fn cni_add_check_del_round_trip() {
    if !require_e2e() {
        return;
    }
    require_tools(&["curl", "python3", "bpftool"]);
    let lab = Lab::new("cni add check del");
    let ns = lab.add_netns("c1");
    let conf = lab.cni_conf(
        "1.0.0",
        NET,
        json!({"runtimeConfig": {
            "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}],
            "aliases": {NET: ["www"]},
        }}),
    );
    let a = attach("c0ffee01", &ns, "IgnoreUnknown=1;K8S_POD_NAME=web");
    let out = lab.cni("ADD", Some(&a), &conf);
    let result = out.ok().clone();
    assert_eq!(result["cniVersion"], "1.0.0");
    let ip = ip_of(&result);
    let eth0 = &result["interfaces"][1];
    assert_eq!(eth0["name"], "eth0");
    assert_eq!(eth0["sandbox"].as_str(), ns.to_str());
    assert_eq!(result["ips"][0]["gateway"], GATEWAY);
    assert_eq!(result["routes"][0]["gw"], GATEWAY);
    assert_eq!(result["dns"]["nameservers"][0], GATEWAY);
    // The namespace got the address and the default route.
    let addr = stdout_str(&lab.in_netns(&ns, &["ip", "-4", "-o", "addr", "show", "eth0"]));
    assert!(addr.contains(&format!("{ip}/16")), "{addr}");
    let route = stdout_str(&lab.in_netns(&ns, &["ip", "route", "show", "default"]));
    assert!(route.contains(GATEWAY), "{route}");

    // md-user sees it under the runtime's name.
    let c = ps_of(&lab, "web").expect("web in ps");
    assert_eq!(c["ip"], ip.as_str());
    assert_eq!(c["cni"]["container_id"], "c0ffee01");
    assert_eq!(c["ports"][0], "8080:80/tcp");
    let inspect: Value = serde_json::from_str(&lab.md_ok(&["inspect", "web", "--json"])).unwrap();
    assert_eq!(inspect["Cni"]["ContainerID"], "c0ffee01");
    assert_eq!(inspect["Aliases"][0], "www");

    // The published port answers from outside, through md's eBPF DNAT.
    let _srv = lab.spawn_in_netns(&ns, &["python3", &fx("peer_http.py"), "80"]);
    let url = format!("http://{HOST_UPLINK_IP}:8080/");
    let got = wait_for(
        "the published port answers",
        Duration::from_secs(30),
        || {
            let o = lab.outside(&["curl", "-s", "--max-time", "2", &url]);
            o.status.success().then(|| stdout_str(&o))
        },
    );
    assert!(got.starts_with("192.0.2.2:"), "{got}");
    let stats = lab.stats();
    assert!(
        stats_row(&stats, "web")["dnat"].as_u64().unwrap() > 0,
        "{stats}"
    );

    // CHECK with the ADD's result: no drift.
    lab.cni("CHECK", Some(&a), &with_prev(&conf, &result)).ok();

    // DEL removes the veth, map entries and the record; DEL again is fine.
    lab.cni("DEL", Some(&a), &with_prev(&conf, &result)).ok();
    assert!(ps_of(&lab, "web").is_none());
    assert!(!map_has_ip(&lab, "ENDPOINTS", &ip));
    let gone = lab.in_netns(&ns, &["ip", "link", "show", "eth0"]);
    assert!(!gone.status.success(), "eth0 is still in the namespace");
    lab.cni("DEL", Some(&a), &with_prev(&conf, &result)).ok();
    assert_nothing_left(&lab);
}

/// Bad input gets the spec's error codes, on stdout, with a non-zero exit, and leaves nothing.
#[test]
fn cni_errors_have_spec_codes() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("cni errors");
    let ns = lab.add_netns("c1");
    let a = attach("c0ffee02", &ns, "");
    let conf = lab.cni_conf("1.0.0", NET, json!({}));
    let code = |o: CniOut| (o.code(), o.msg());

    // 6: undecodable configuration; 1: a version md does not speak; 7: no name.
    assert_eq!(code(lab.cni_raw(Some("ADD"), Some(&a), "{not json")).0, 6);
    let (c, m) = code(lab.cni("ADD", Some(&a), &lab.cni_conf("0.2.0", NET, json!({}))));
    assert_eq!(c, 1, "{m}");
    let mut nameless = conf.clone();
    nameless.as_object_mut().unwrap().remove("name");
    assert_eq!(code(lab.cni("ADD", Some(&a), &nameless)).0, 7);
    // 2: another IPAM (md allocates itself); 7: a bad subnet or port.
    let other_ipam = lab.cni_conf("1.0.0", NET, json!({"ipam": {"type": "host-local"}}));
    assert_eq!(code(lab.cni("ADD", Some(&a), &other_ipam)).0, 2);
    let bad_port = lab.cni_conf(
        "1.0.0",
        NET,
        json!({"runtimeConfig": {"portMappings": [{"hostPort": 70000, "containerPort": 80}]}}),
    );
    assert_eq!(code(lab.cni("ADD", Some(&a), &bad_port)).0, 7);
    // 4: the environment: no command, an unknown one, a bad interface name, no netns on ADD.
    assert_eq!(code(lab.cni_raw(None, Some(&a), &conf.to_string())).0, 4);
    assert_eq!(code(lab.cni("FROB", Some(&a), &conf)).0, 4);
    let bad_if = Attach {
        ifname: "eth0/x",
        ..a.clone()
    };
    assert_eq!(code(lab.cni("ADD", Some(&bad_if), &conf)).0, 4);
    let no_ns = Attach {
        netns: Path::new(""),
        ..a.clone()
    };
    assert_eq!(code(lab.cni("ADD", Some(&no_ns), &conf)).0, 4);
    // 3: a namespace that does not exist.
    let missing = Attach {
        netns: Path::new("/run/netns/mdt-no-such-ns"),
        ..a.clone()
    };
    assert_eq!(code(lab.cni("ADD", Some(&missing), &conf)).0, 3);
    // CHECK needs its prevResult (7) and an attachment md knows (3); GC and STATUS need 1.1.0.
    assert_eq!(code(lab.cni("CHECK", Some(&a), &conf)).0, 7);
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [], "ips": []});
    assert_eq!(
        code(lab.cni("CHECK", Some(&a), &with_prev(&conf, &prev))).0,
        3
    );
    let old = lab.cni_conf("0.3.1", NET, json!({}));
    assert_eq!(
        code(lab.cni("CHECK", Some(&a), &with_prev(&old, &prev))).0,
        1
    );
    assert_eq!(code(lab.cni("GC", None, &conf)).0, 1);
    assert_eq!(code(lab.cni("STATUS", None, &conf)).0, 1);
    // A static address outside the subnet: refused by md's IPAM, nothing made.
    let outside = lab.cni_conf(
        "1.0.0",
        NET,
        json!({"runtimeConfig": {"ips": ["10.9.9.9/24"]}}),
    );
    let o = lab.cni("ADD", Some(&a), &outside);
    assert!(o.msg().contains("outside subnet"), "{}", o.stdout);
    // Errors answer in the configuration's version.
    let o = lab.cni(
        "ADD",
        Some(&missing),
        &lab.cni_conf("0.4.0", NET, json!({})),
    );
    assert_eq!(o.json["cniVersion"], "0.4.0");
    // ADD twice for the same attachment is refused; the first one stays intact.
    let first = lab.cni("ADD", Some(&a), &conf).ok().clone();
    let again = lab.cni("ADD", Some(&a), &conf);
    assert!(
        !again.success && again.msg().contains("DEL it first"),
        "{}",
        again.stdout
    );
    lab.cni("CHECK", Some(&a), &with_prev(&conf, &first)).ok();
    lab.cni("DEL", Some(&a), &conf).ok();
    assert_nothing_left(&lab);
}

/// CHECK reports drift: a missing address, map entry, program or veth.
#[test]
fn cni_check_reports_drift() {
    if !require_e2e() {
        return;
    }
    require_tools(&["bpftool", "tc"]);
    let lab = Lab::new("cni check drift");
    let ns = lab.add_netns("c1");
    let a = attach("c0ffee03", &ns, "K8S_POD_NAME=drifty");
    let conf = lab.cni_conf("1.1.0", NET, json!({}));
    let result = lab.cni("ADD", Some(&a), &conf).ok().clone();
    let checked = with_prev(&conf, &result);
    lab.cni("CHECK", Some(&a), &checked).ok();
    let ip = ip_of(&result);
    let drift = |what: &str| {
        let o = lab.cni("CHECK", Some(&a), &checked);
        assert_eq!(o.code(), 100, "{}", o.stdout);
        assert!(
            o.msg().contains(what),
            "CHECK said {:?}, expected {what:?}",
            o.msg()
        );
    };

    // The address inside the namespace.
    let cidr = format!("{ip}/16");
    lab.in_netns(&ns, &["ip", "addr", "del", &cidr, "dev", "eth0"]);
    drift(&format!("address {cidr} is missing"));
    lab.in_netns(&ns, &["ip", "addr", "add", &cidr, "dev", "eth0"]);
    lab.in_netns(&ns, &["ip", "route", "add", "default", "via", GATEWAY]);
    lab.cni("CHECK", Some(&a), &checked).ok();

    // The datapath's entry for the address.
    let endpoints = lab.pin_dir().join("maps/ENDPOINTS");
    let key: Vec<String> = ip.split('.').map(String::from).collect();
    let mut del = vec![
        "bpftool",
        "map",
        "delete",
        "pinned",
        endpoints.to_str().unwrap(),
        "key",
    ];
    del.extend(key.iter().map(String::as_str));
    // From the root namespace: pin paths are global, and `ip netns exec` remounts /sys.
    let out = md_tests::process::run_timeout(
        std::process::Command::new(del[0]).args(&del[1..]),
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "{}",
        md_tests::process::show_output(&out)
    );
    drift("ENDPOINTS has no entry");
    // Put it back the way md does: the next ADD of another container does not, so restore
    // by DEL + ADD and go on with a fresh result.
    lab.cni("DEL", Some(&a), &checked).ok();
    let result = lab.cni("ADD", Some(&a), &conf).ok().clone();
    let checked = with_prev(&conf, &result);
    lab.cni("CHECK", Some(&a), &checked).ok();

    // A program detached from the host veth (its clsact filter deleted).
    let veth = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    lab.host_ok(&["tc", "filter", "del", "dev", &veth, "ingress"]);
    let o = wait_for(
        "CHECK sees the detached program",
        Duration::from_secs(10),
        || {
            let o = lab.cni("CHECK", Some(&a), &checked);
            (!o.success).then_some(o)
        },
    );
    assert_eq!(o.code(), 100, "{}", o.stdout);
    assert!(o.msg().contains("is not attached to"), "{}", o.msg());

    // The host veth deleted: the pair is gone, md reclaims the attachment, CHECK says so.
    lab.host_ok(&["ip", "link", "del", &veth]);
    let o = lab.cni("CHECK", Some(&a), &checked);
    assert_eq!(o.code(), 3, "{}", o.stdout);
    lab.cni("DEL", Some(&a), &checked).ok();
    assert_nothing_left(&lab);
}

/// DEL succeeds for a namespace that is already gone, and md reclaims a container whose
/// namespace went away even before any DEL.
#[test]
fn cni_del_after_the_namespace_is_gone() {
    if !require_e2e() {
        return;
    }
    require_tools(&["bpftool"]);
    let lab = Lab::new("cni netns gone");
    let conf = lab.cni_conf("1.0.0", NET, json!({}));
    let ns1 = lab.add_netns("c1");
    let a1 = attach("c0ffee04", &ns1, "");
    let r1 = lab.cni("ADD", Some(&a1), &conf).ok().clone();
    lab.del_netns(&ns1);
    lab.cni("DEL", Some(&a1), &with_prev(&conf, &r1)).ok();
    // Again with no CNI_NETNS at all (allowed on DEL).
    let a1_no_ns = Attach {
        netns: Path::new(""),
        ..a1.clone()
    };
    lab.cni("DEL", Some(&a1_no_ns), &conf).ok();

    let ns2 = lab.add_netns("c2");
    let a2 = attach("c0ffee05", &ns2, "");
    let r2 = lab.cni("ADD", Some(&a2), &conf).ok().clone();
    let ip2 = ip_of(&r2);
    assert!(map_has_ip(&lab, "ENDPOINTS", &ip2));
    lab.del_netns(&ns2);
    // No DEL yet: the next md-user command finds the veth gone and reclaims the rest. The
    // kernel dismantles a deleted namespace (and the veth with it) in the background: wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut left = lab.ps();
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        left = lab.ps();
    }
    assert!(left.is_empty(), "{left:?}");
    assert!(!map_has_ip(&lab, "ENDPOINTS", &ip2));
    lab.cni("DEL", Some(&a2), &conf).ok();
    assert_nothing_left(&lab);
}

/// GC keeps the attachments the runtime lists and removes this network's others; another CNI
/// network's attachments and `md-user run` containers are not its to touch.
#[test]
fn cni_gc_removes_attachments_not_listed() {
    if !require_e2e() {
        return;
    }
    let lab = Lab::new("cni gc");
    let conf = lab.cni_conf("1.1.0", NET, json!({}));
    let other = lab.cni_conf("1.1.0", "othernet", json!({}));
    let (n1, n2, n3) = (
        lab.add_netns("c1"),
        lab.add_netns("c2"),
        lab.add_netns("c3"),
    );
    let keep = attach("keep01", &n1, "");
    let stale = attach("stale01", &n2, "");
    let foreign = attach("other01", &n3, "");
    lab.cni("ADD", Some(&keep), &conf).ok();
    lab.cni("ADD", Some(&stale), &conf).ok();
    lab.cni("ADD", Some(&foreign), &other).ok();
    run_d(&lab, "runner", &[], &["sleep", "600"]);
    // STATUS: ready.
    lab.cni("STATUS", None, &conf).ok();

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep01", "ifname": "eth0"}]);
    lab.cni("GC", None, &gc).ok();
    let names = lab.ps_names();
    assert_eq!(names, ["keep01", "other01", "runner"], "after GC");
    let gone = lab.in_netns(&n2, &["ip", "link", "show", "eth0"]);
    assert!(
        !gone.status.success(),
        "GC left eth0 in the stale namespace"
    );
    // Without the list GC refuses (it would otherwise remove everything).
    let o = lab.cni("GC", None, &conf);
    assert_eq!(o.code(), 7, "{}", o.stdout);
}

/// ADD under strace in the lab's host namespace, `strace_args` before the plugin.
fn traced_add(lab: &Lab, strace_args: &[String], id: &str, ns: &Path, conf: &Value) -> CniOut {
    let mut c = std::process::Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", lab.host_ns()))
        .args(["--", "strace", "-f"])
        .args(strace_args)
        .arg(lab.cni_bin_dir().join("md"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", ns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", lab.cni_bin_dir());
    md_tests::cni::run_with_stdin(&mut c, &conf.to_string())
}

/// The main thread's `bpf` calls of a traced ADD, in order (strace -f output: "PID bpf(CMD,").
fn bpf_calls(trace: &str) -> Vec<String> {
    let lines: Vec<&str> = trace.lines().collect();
    let main = lines
        .first()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    lines
        .iter()
        .filter(|l| l.split_whitespace().next() == Some(main.as_str()))
        .filter_map(|l| l.split_once("bpf(").map(|(_, rest)| rest))
        .map(|rest| rest.split(',').next().unwrap_or_default().to_string())
        .collect()
}

/// A plugin killed in the middle of ADD (SIGKILL injected with strace at a chosen syscall)
/// leaves a record that the next command reclaims with everything made so far: the veth pair
/// at the first setns (the container side being configured), and the datapath's entries too
/// at the last map update of ADD (VETH_OWNERS written, the veth's index not yet saved: it is
/// found by address and MAC). The last update is found in a traced ADD of the same build.
#[test]
fn cni_plugin_killed_midway_is_reclaimed() {
    if !require_e2e() {
        return;
    }
    require_tools(&["strace", "bpftool"]);
    let lab = Lab::new("cni killed midway");
    let conf = lab.cni_conf("1.0.0", NET, json!({}));
    // A first container loads the datapath, so the kill points below fall in the attach.
    let n0 = lab.add_netns("c0");
    lab.cni("ADD", Some(&attach("first01", &n0, "")), &conf)
        .ok();
    // A probe ADD like the killed ones, traced: where is its last map update?
    let probe_ns = lab.add_netns("probe");
    let trace = lab.log_path("probe-trace");
    let t = trace.to_string_lossy().into_owned();
    let args = ["-e", "trace=bpf", "-o", &t].map(String::from);
    traced_add(&lab, &args, "probe01", &probe_ns, &conf).ok();
    let calls = bpf_calls(&std::fs::read_to_string(&trace).expect("strace output"));
    let last_update = calls
        .iter()
        .rposition(|c| c == "BPF_MAP_UPDATE_ELEM")
        .unwrap_or_else(|| panic!("no map update in the traced ADD: {calls:?}"));
    lab.cni("DEL", Some(&attach("probe01", &probe_ns, "")), &conf)
        .ok();

    for (i, inject) in [
        "setns:signal=SIGKILL:when=1".to_string(),
        format!("bpf:signal=SIGKILL:when={}", last_update + 1),
    ]
    .iter()
    .enumerate()
    {
        let ns = lab.add_netns(&format!("k{i}"));
        let id = format!("killed0{i}");
        let args = ["-o", "/dev/null", "-e", &format!("inject={inject}")].map(String::from);
        let out = traced_add(&lab, &args, &id, &ns, &conf);
        assert!(!out.success, "ADD survived inject={inject}: {}", out.stdout);
        // It was killed after making something: the namespace has its eth0.
        let made = lab.in_netns(&ns, &["ip", "link", "show", "eth0"]);
        assert!(
            made.status.success(),
            "inject={inject} killed ADD before the veth"
        );
        // The next command reclaims it: no record, no veth, no map entries of its own.
        assert_eq!(lab.ps_names(), ["first01"], "after inject={inject}");
        assert_eq!(lab.md_veths().len(), 1, "veths after inject={inject}");
        assert_eq!(
            lab.map_dump("ENDPOINTS").len(),
            1,
            "ENDPOINTS after {inject}"
        );
        assert_eq!(
            lab.map_dump("VETH_OWNERS").len(),
            1,
            "VETH_OWNERS after {inject}"
        );
        let left = lab.in_netns(&ns, &["ip", "link", "show", "eth0"]);
        assert!(!left.status.success(), "eth0 survived inject={inject}");
        // And the same attachment can be added afresh.
        let a = attach(&id, &ns, "");
        lab.cni("ADD", Some(&a), &conf).ok();
        lab.cni("DEL", Some(&a), &conf).ok();
    }
}

/// `dig +short NAME @GATEWAY` from a namespace: md's resolver for the network.
fn dig_in(lab: &Lab, ns: &Path, name: &str) -> String {
    let o = lab.in_netns(
        ns,
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=2",
            &format!("@{GATEWAY}"),
            name,
        ],
    );
    stdout_str(&o)
}

/// A CNI container and an `md-user run` container resolve each other (and the CNI
/// container's alias) through md's resolver, and `md-user policy deny` between them drops
/// their traffic one way while the other way still flows.
#[test]
fn cni_containers_share_names_and_policy_with_run_containers() {
    if !require_e2e() {
        return;
    }
    require_tools(&["dig", "curl", "python3"]);
    let lab = Lab::new("cni names policy");
    let ns = lab.add_netns("c1");
    let conf = lab.cni_conf(
        "1.0.0",
        NET,
        json!({"runtimeConfig": {"aliases": {NET: ["alias-of-alpha"]}}}),
    );
    let a = attach("c0ffee06", &ns, "K8S_POD_NAME=alpha");
    let alpha_ip = ip_of(lab.cni("ADD", Some(&a), &conf).ok());
    run_d(&lab, "runner", &[], &["python3", &fx("peer_http.py"), "80"]);
    let runner_ip = lab.ip_of("runner");

    assert_eq!(dig_in(&lab, &ns, "runner"), runner_ip);
    let from_runner = |name: &str| {
        stdout_str(&lab.exec("runner", &["dig", "+short", "+time=2", "+tries=2", name]))
    };
    assert_eq!(from_runner("alpha"), alpha_ip);
    assert_eq!(from_runner("alias-of-alpha"), alpha_ip);

    let _srv = lab.spawn_in_netns(&ns, &["python3", &fx("peer_http.py"), "80"]);
    lab.wait_listening_in("runner", "tcp", 80);
    // TCP from runner to alpha (true) or from alpha to runner (false) gets an answer.
    let curl_ok = |from_runner: bool| {
        let out = if from_runner {
            let url = format!("http://{alpha_ip}/");
            lab.exec("runner", &["curl", "-sS", "--max-time", "2", &url])
        } else {
            let url = format!("http://{runner_ip}/");
            lab.in_netns(&ns, &["curl", "-sS", "--max-time", "2", &url])
        };
        out.status.success()
    };
    wait_for("alpha serves", Duration::from_secs(30), || {
        curl_ok(true).then_some(())
    });
    assert!(curl_ok(false), "alpha cannot reach runner before any rule");

    lab.md_ok(&["policy", "deny", "runner", "alpha"]);
    assert!(!curl_ok(true), "runner still reaches alpha after the deny");
    assert!(curl_ok(false), "alpha lost runner: the deny is one way");
    let stats = lab.stats();
    assert!(
        stats_row(&stats, "runner")["drops"]["policy"]
            .as_u64()
            .unwrap_or(0)
            + stats_row(&stats, "alpha")["drops"]["policy"]
                .as_u64()
                .unwrap_or(0)
            > 0,
        "no policy drop counted: {stats}"
    );
    lab.md_ok(&["policy", "allow", "runner", "alpha"]);
    assert!(curl_ok(true), "the allow did not lift the deny");
    lab.cni("DEL", Some(&a), &conf).ok();
}

/// md in a chain as a runtime runs a conflist, between two reference plugins: Debian's
/// `loopback` before it (md keeps its result in front of its own) and `tuning` after it (which
/// takes md's result as its prevResult and sets a sysctl in the namespace). CHECK accepts the
/// chain's final result; DEL runs in reverse.
#[test]
fn cni_chain_passes_prev_result_through() {
    if !require_e2e() {
        return;
    }
    let lo_bin = format!("{}/loopback", md_tests::cni::REFERENCE_PLUGINS);
    let tuning_bin = format!("{}/tuning", md_tests::cni::REFERENCE_PLUGINS);
    require_tools(&[&lo_bin, &tuning_bin]);
    let lab = Lab::new("cni chain");
    let ns = lab.add_netns("c1");
    let a = attach("chain01", &ns, "IgnoreUnknown=1;K8S_POD_NAME=chained");
    let lo_conf = json!({"cniVersion": "1.0.0", "name": NET, "type": "loopback"});
    let lo = lab
        .cni_reference("loopback", "ADD", &a, &lo_conf)
        .ok()
        .clone();
    let md_conf = lab.cni_conf("1.0.0", NET, json!({}));
    let md = lab
        .cni("ADD", Some(&a), &with_prev(&md_conf, &lo))
        .ok()
        .clone();
    let n_lo = lo["interfaces"].as_array().unwrap().len();
    assert_eq!(md["interfaces"][0], lo["interfaces"][0], "{md}");
    assert_eq!(md["ips"][0], lo["ips"][0], "{md}");
    let mine = md["ips"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(mine["interface"], n_lo + 1, "{md}");
    assert_eq!(md["interfaces"][n_lo + 1]["name"], "eth0");

    let tuning_conf = json!({
        "cniVersion": "1.0.0",
        "name": NET,
        "type": "tuning",
        "sysctl": {"net.core.somaxconn": "321"},
    });
    let tuned = lab
        .cni_reference("tuning", "ADD", &a, &with_prev(&tuning_conf, &md))
        .ok()
        .clone();
    assert_eq!(
        tuned["ips"], md["ips"],
        "tuning must pass md's addresses through"
    );
    let somax = lab.in_netns(&ns, &["cat", "/proc/sys/net/core/somaxconn"]);
    assert_eq!(stdout_str(&somax), "321");
    let ip = ip_of(&md);
    assert_eq!(ps_of(&lab, "chained").unwrap()["ip"], ip.as_str());
    lab.cni("CHECK", Some(&a), &with_prev(&md_conf, &tuned))
        .ok();

    lab.cni_reference("tuning", "DEL", &a, &with_prev(&tuning_conf, &tuned))
        .ok();
    lab.cni("DEL", Some(&a), &with_prev(&md_conf, &tuned)).ok();
    lab.cni_reference("loopback", "DEL", &a, &with_prev(&lo_conf, &tuned))
        .ok();
    assert_nothing_left(&lab);
}

/// A runtime may hold the host port of a mapping itself (Podman's conmon listens on it to
/// reserve it): a CNI-published port is translated even though a host socket listens there,
/// from outside and from the host, as the reference portmap plugin's DNAT is. `md-user run`
/// still refuses a port a host process holds.
#[test]
fn cni_published_port_wins_over_the_runtimes_own_listener() {
    if !require_e2e() {
        return;
    }
    require_tools(&["curl", "python3"]);
    let lab = Lab::new("cni port reserved");
    // The runtime's reservation: a host listener on 8080 that answers (so a wrong winner shows).
    let _reservation = lab.spawn_host(&["python3", &fx("where_http.py"), "8080", "8081"]);
    lab.wait_listening_host("tcp", 8080);
    let ns = lab.add_netns("c1");
    let conf = lab.cni_conf(
        "1.0.0",
        NET,
        json!({"runtimeConfig": {"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}}),
    );
    let a = attach("c0ffee07", &ns, "K8S_POD_NAME=reserved");
    let ip = ip_of(lab.cni("ADD", Some(&a), &conf).ok());
    let _srv = lab.spawn_in_netns(&ns, &["python3", &fx("where_http.py"), "80"]);
    let served_by = |from_host: bool, port: u16| {
        let url = format!("http://{HOST_UPLINK_IP}:{port}/");
        wait_for("an answer", Duration::from_secs(30), || {
            let args = ["curl", "-s", "--max-time", "2", url.as_str()];
            let o = if from_host {
                lab.host(&args)
            } else {
                lab.outside(&args)
            };
            let out = stdout_str(&o);
            (o.status.success() && !out.is_empty())
                .then(|| out.split_whitespace().nth(1).unwrap_or("").to_string())
        })
    };
    assert_eq!(served_by(false, 8080), format!("{ip}:80"), "from outside");
    assert_eq!(served_by(true, 8080), format!("{ip}:80"), "from the host");
    // md-user run refuses a port a host process holds (there is no runtime holding it for
    // the container).
    let refused = lab.md(&md_tests::helpers::run_args(
        "runner",
        &["-p", "8081:80"],
        &["sleep", "60"],
    ));
    assert!(
        !refused.status.success(),
        "md-user run took a host process's port"
    );
    assert!(
        md_tests::stderr_str(&refused).contains("in use by a host process"),
        "{}",
        md_tests::stderr_str(&refused)
    );
    lab.cni("DEL", Some(&a), &conf).ok();
}
