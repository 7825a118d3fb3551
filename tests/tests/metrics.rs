//! Metrics and flow logs (issue 21): Debian's Prometheus server, started in the lab's outside
//! namespace, scrapes `md-user metrics` in the host namespace under known traffic and stores
//! exactly what the traffic was; `monitor --json --output` writes flow logs with wall-clock
//! times, the tuple before and after translation and container names, rotated by size.
//!
//! Exact where the datapath counts one per thing (SNAT per new flow, DNAT and published-port
//! hits per connection, policy drops per packet, NAT ports per live flow); packet and byte
//! counters are compared with what `md-user stats --json` says at the same moment, and with the
//! traffic as lower bounds (ARP and the like also move them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md_tests::helpers::{
    assert_one_line_error, counter, fx, logged, run_d, stats_row, UDP_LOGGER, UDP_PROBE, UDP_SEND,
};
use md_tests::process::show_output;
use md_tests::{
    require_e2e, require_tools, stdout_str, wait_for, Bg, Lab, GATEWAY, HOST_UPLINK_IP, OUTSIDE_IP,
};
use serde_json::Value;

/// Where `md-user metrics` listens (the host namespace's uplink address) and Prometheus's web
/// and API address (the outside namespace): lab addresses only.
const METRICS_PORT: u16 = 9464;
const PROM_PORT: u16 = 9090;

/// The example queries of the README (section "Metrics and flow logs").
const README_DROPS_BY_REASON: &str =
    r#"sum by (reason) (rate({__name__=~"md_(container|uplink)_drops_total"}[5m]))"#;
const README_TOP_TALKERS: &str = "topk(5, sum by (container) (rate(md_container_bytes_total[5m])))";
const README_NAT_PRESSURE: &str =
    "max by (protocol) (md_nat_ports_used_busiest_destination) / scalar(md_nat_ports_capacity)";

fn need_tools() {
    require_tools(&["python3", "curl", "ping", "ss", "prometheus", "promtool"]);
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// A container serving HTTP on 80 (peer_http.py) and UDP on 53 (peer_udp.py).
#[track_caller]
fn serve(lab: &Lab, name: &str, extra: &[&str]) {
    let script = format!(
        "python3 {} 80 & python3 {} 53 & wait",
        fx("peer_http.py"),
        fx("peer_udp.py")
    );
    run_d(lab, name, extra, &["sh", "-c", &script]);
    lab.wait_listening_in(name, "tcp", 80);
    lab.wait_listening_in(name, "udp", 53);
}

/// An HTTP server outside on 192.0.2.2:8081 answering with the client's address.
#[track_caller]
fn outside_http(lab: &Lab) -> Bg {
    let bg = lab.spawn_outside(&["python3", &fx("peer_http.py"), "8081", OUTSIDE_IP]);
    lab.wait_listening_outside("tcp", 8081);
    bg
}

/// `curl` of `url` from `local_port`, asserting success; returns the body (peer_http.py: the
/// client address the server saw).
#[track_caller]
fn curl(out: std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what}\n{}", show_output(&out));
    stdout_str(&out)
}

fn curl_args<'a>(url: &'a str, local_port: &'a str) -> Vec<&'a str> {
    let mut a = vec!["curl", "-sS", "--max-time", "5", url];
    if !local_port.is_empty() {
        a.extend(["--local-port", local_port]);
    }
    a
}

// ---- Prometheus -----------------------------------------------------------------------------

/// Debian's Prometheus server in the lab's outside namespace, its config and TSDB in the lab's
/// temp dir, scraping `md-user metrics` every second.
struct Prometheus<'a> {
    lab: &'a Lab,
    _server: Bg,
}

impl<'a> Prometheus<'a> {
    #[track_caller]
    fn start(lab: &'a Lab) -> Prometheus<'a> {
        let dir = lab.dir().join("prometheus");
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: md\n    static_configs:\n      \
                 - targets: ['{HOST_UPLINK_IP}:{METRICS_PORT}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let server = lab.spawn_outside(&[
            "prometheus",
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address={OUTSIDE_IP}:{PROM_PORT}"),
        ]);
        lab.wait_listening_outside("tcp", PROM_PORT);
        let p = Prometheus {
            lab,
            _server: server,
        };
        wait_for(
            "Prometheus scraped md-user metrics successfully",
            Duration::from_secs(30),
            || (p.values(r#"up{job="md"}"#).first().map(|(_, v)| *v) == Some(1.0)).then_some(()),
        );
        p
    }

    /// The result of an instant query (API /api/v1/query, evaluated now): (labels, value).
    #[track_caller]
    fn values(&self, query: &str) -> Vec<(Value, f64)> {
        let out = self.lab.outside(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--get",
            "--data-urlencode",
            &format!("query={query}"),
            &format!("http://{OUTSIDE_IP}:{PROM_PORT}/api/v1/query"),
        ]);
        let body = curl(out, &format!("Prometheus query {query}"));
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("query {query}: not JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "query {query}: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("query {query}: no result vector: {v}"))
            .iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("query {query}: bad sample {r}"));
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// The value of a query that selects one series; 0 when it selects none (a series that
    /// does not exist yet, e.g. a rule not made yet).
    #[track_caller]
    fn value(&self, query: &str) -> f64 {
        let v = self.values(query);
        assert!(v.len() <= 1, "{query} selects several series: {v:?}");
        v.first().map(|(_, x)| *x).unwrap_or(0.0)
    }

    /// Waits until Prometheus holds a scrape that started after `t` (unix seconds).
    #[track_caller]
    fn scraped_after(&self, t: f64) {
        wait_for(
            "Prometheus scraped md-user metrics again",
            Duration::from_secs(20),
            || {
                let s = self.values(r#"timestamp(up{job="md"})"#);
                s.first().is_some_and(|(_, ts)| *ts > t).then_some(())
            },
        );
        assert_eq!(self.value(r#"up{job="md"}"#), 1.0, "the last scrape failed");
    }

    /// Every query's value once a scrape newer than now is stored.
    #[track_caller]
    fn snapshot(&self, queries: &[String]) -> BTreeMap<String, f64> {
        self.scraped_after(now_secs());
        queries.iter().map(|q| (q.clone(), self.value(q))).collect()
    }
}

/// Samples of a text exposition by series (`name{labels}`).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample line");
            (series.to_string(), value.parse().expect("sample value"))
        })
        .collect()
}

/// `promtool check metrics` on an exposition: the linter for Prometheus's naming rules.
#[track_caller]
fn promtool_lint(lab: &Lab, text: &str, what: &str) {
    let file = lab.log_path("exposition");
    std::fs::write(&file, text).expect("write exposition");
    let out = lab.host(&[
        "sh",
        "-c",
        &format!("promtool check metrics < {}", file.display()),
    ]);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics on {what} complains\n{}",
        show_output(&out)
    );
}

#[test]
fn prometheus_stores_what_the_traffic_was() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("metrics-prom");
    let _http = outside_http(&lab);
    let sink = lab.spawn_outside(&["python3", "-u", "-c", UDP_LOGGER, "9999"]);
    lab.wait_listening_outside("udp", 9999);
    serve(&lab, "c", &["-p", "8080:80", "-p", "5353:53/udp"]);
    run_d(&lab, "a", &[], &["sleep", "600"]);
    let c_ip = lab.ip_of("c");
    // a knows c's MAC before policy is in play (policy drops are counted per IP packet).
    lab.exec_ok("a", &["ping", "-n", "-c", "1", "-W", "2", &c_ip]);

    let _metrics = lab.spawn_md(&[
        "metrics",
        "--listen",
        &format!("{HOST_UPLINK_IP}:{METRICS_PORT}"),
        "--bpf-stats",
    ]);
    lab.wait_listening_host("tcp", METRICS_PORT);
    let prom = Prometheus::start(&lab);

    let a = r#"container="a",network="bridge""#;
    let c = r#"container="c",network="bridge""#;
    let q = |s: &str| s.to_string();
    let queries = vec![
        format!("md_container_snat_total{{{a}}}"),
        format!("md_container_dnat_total{{{c}}}"),
        format!("md_container_dnat_total{{{a}}}"),
        format!(r#"md_container_drops_total{{{a},reason="policy"}}"#),
        format!(r#"md_container_packets_total{{{a},direction="egress"}}"#),
        format!(r#"md_container_bytes_total{{{a},direction="egress"}}"#),
        format!(r#"md_container_packets_total{{{c},direction="ingress"}}"#),
        q(
            r#"md_port_hits_total{container="c",protocol="tcp",host_port="8080",container_port="80"}"#,
        ),
        q(
            r#"md_port_hits_total{container="c",protocol="udp",host_port="5353",container_port="53"}"#,
        ),
        q(r#"md_policy_drops_total{from="a",to="c"}"#),
        q(r#"sum by (network) (md_container_snat_total{network="bridge"})"#),
        q(r#"sum by (network) (md_container_dnat_total{network="bridge"})"#),
        q(r#"md_uplink_packets_total{interface="up0",direction="egress"}"#),
        q(r#"md_program_runs_total{program="md_veth_ingress"}"#),
        q(r#"md_program_run_time_seconds_total{program="md_veth_ingress"}"#),
    ];
    let before = prom.snapshot(&queries);

    // Container a: 5 pings out (one ICMP flow), 3 connections out, 3 UDP flows out.
    lab.exec_ok(
        "a",
        &["ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", OUTSIDE_IP],
    );
    let url_out = format!("http://{OUTSIDE_IP}:8081/");
    for _ in 0..3 {
        curl(lab.exec("a", &curl_args(&url_out, "")), "a -> outside");
    }
    for i in 0..3 {
        let msg = format!("m{i}");
        lab.exec_ok("a", &["python3", "-c", UDP_SEND, OUTSIDE_IP, "9999", &msg]);
        logged(&sink, &msg);
    }
    // Outside: 4 connections and one UDP flow to c's published ports.
    let url_in = format!("http://{HOST_UPLINK_IP}:8080/");
    for _ in 0..4 {
        let seen = curl(lab.outside(&curl_args(&url_in, "")), "outside -> 8080");
        assert!(seen.starts_with(OUTSIDE_IP), "{seen}");
    }
    let out = lab.outside(&["python3", "-c", UDP_PROBE, HOST_UPLINK_IP, "5353", "3"]);
    assert!(
        out.status.success(),
        "outside -> 5353\n{}",
        show_output(&out)
    );
    // a -> c denied: 3 echo requests dropped.
    lab.md_ok(&["policy", "deny", "a", "c"]);
    let out = lab.exec(
        "a",
        &["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", &c_ip],
    );
    assert!(
        !out.status.success(),
        "a -> c answered\n{}",
        show_output(&out)
    );

    let after = prom.snapshot(&queries);
    let d = |i: usize| {
        let (b, a) = (before[&queries[i]], after[&queries[i]]);
        assert!(a >= b, "{} went backwards: {b} -> {a}", queries[i]);
        a - b
    };
    let exact = [
        (0, 7.0, "a's SNAT: 1 ICMP + 3 TCP + 3 UDP flows"),
        (1, 5.0, "c's DNAT: 4 connections + 1 UDP flow"),
        (2, 0.0, "a's DNAT"),
        (3, 3.0, "a's policy drops: 3 echo requests"),
        (7, 4.0, "hits of 8080/tcp"),
        (8, 1.0, "hits of 5353/udp"),
        (9, 3.0, "drops of the rule a -> c"),
        (10, 7.0, "SNAT of network bridge"),
        (11, 5.0, "DNAT of network bridge"),
    ];
    let wrong: Vec<String> = exact
        .iter()
        .filter(|(i, want, _)| d(*i) != *want)
        .map(|(i, want, what)| format!("{what}: +{} (expected +{want}) [{}]", d(*i), queries[*i]))
        .collect();
    assert!(
        wrong.is_empty(),
        "Prometheus stored other counts than the traffic:\n{}",
        wrong.join("\n")
    );
    assert!(
        d(4) >= 5.0 + 3.0 * 3.0 + 3.0 + 3.0,
        "a's egress packets +{}",
        d(4)
    );
    assert!(d(5) >= 5.0 * 84.0, "a's egress bytes +{}", d(5));
    assert!(d(6) >= 4.0 * 3.0 + 1.0, "c's ingress packets +{}", d(6));
    assert!(d(12) >= 5.0, "uplink egress packets +{}", d(12));
    // Run time is counted (--bpf-stats): the veth ingress program ran for every packet a sent.
    assert!(
        d(13) >= d(4),
        "md_veth_ingress runs +{} < a's egress +{}",
        d(13),
        d(4)
    );
    assert!(d(14) > 0.0, "md_veth_ingress run time +{}", d(14));
    assert_eq!(prom.value("md_bpf_stats_enabled"), 1.0);

    // Live state: a's 3 UDP flows to one destination hold 3 NAT ports for 60 s.
    let nat_udp = prom.value(r#"md_nat_ports_used{protocol="udp"}"#);
    let busiest = prom.value(r#"md_nat_ports_used_busiest_destination{protocol="udp"}"#);
    assert_eq!((nat_udp, busiest), (3.0, 3.0), "UDP NAT ports in use");
    assert_eq!(prom.value("md_nat_ports_capacity"), 4536.0, "61000-65535");
    assert!(prom.value(r#"md_conntrack_entries{protocol="udp"}"#) >= 8.0);
    assert_eq!(prom.value("md_conntrack_capacity"), 131072.0);
    for (map, entries) in [
        ("ENDPOINTS", 2.0),
        ("VETH_OWNERS", 2.0),
        ("PORT_MAP", 2.0),
        ("POLICY", 1.0),
    ] {
        assert_eq!(
            prom.value(&format!(r#"md_map_entries{{map="{map}"}}"#)),
            entries,
            "{map} entries"
        );
    }
    assert_eq!(prom.value(r#"md_map_capacity{map="CONNTRACK"}"#), 131072.0);
    assert!(
        prom.value(r#"md_map_entries{map="CONNTRACK"}"#)
            + prom.value(r#"md_map_entries{map="CONNTRACK_NEW"}"#)
            >= prom.value(r#"sum(md_conntrack_entries)"#)
    );

    // The README's three queries answer.
    let by = |q: &str, label: &str| -> BTreeMap<String, f64> {
        prom.values(q)
            .into_iter()
            .map(|(m, v)| (m[label].as_str().unwrap_or_default().to_string(), v))
            .collect()
    };
    let drops = by(README_DROPS_BY_REASON, "reason");
    assert!(
        drops.get("policy").is_some_and(|v| *v > 0.0),
        "{README_DROPS_BY_REASON}: {drops:?}"
    );
    let talkers = by(README_TOP_TALKERS, "container");
    assert!(
        talkers.len() <= 5
            && ["a", "c"]
                .iter()
                .all(|c| talkers.get(*c).is_some_and(|v| *v > 0.0)),
        "{README_TOP_TALKERS}: {talkers:?}"
    );
    let pressure = by(README_NAT_PRESSURE, "protocol");
    assert_eq!(
        pressure.get("udp"),
        Some(&(3.0 / 4536.0)),
        "{README_NAT_PRESSURE}: {pressure:?}"
    );

    // Packet and byte counters: what Prometheus stores is what md counts at that moment.
    wait_for(
        "Prometheus stores a's and c's packet counters as stats --json shows them",
        Duration::from_secs(30),
        || {
            let s = lab.stats();
            let want = [
                (
                    format!(r#"md_container_packets_total{{{a},direction="egress"}}"#),
                    counter(stats_row(&s, "a"), "egress_packets"),
                ),
                (
                    format!(r#"md_container_bytes_total{{{a},direction="ingress"}}"#),
                    counter(stats_row(&s, "a"), "ingress_bytes"),
                ),
                (
                    format!(r#"md_container_packets_total{{{c},direction="ingress"}}"#),
                    counter(stats_row(&s, "c"), "ingress_packets"),
                ),
            ];
            prom.scraped_after(now_secs());
            want.iter()
                .all(|(q, v)| prom.value(q) == *v as f64)
                .then_some(())
        },
    );

    // The exposition passes Prometheus's own linter; `stats --prometheus` prints the same series
    // (without run time: it holds no BPF_ENABLE_STATS descriptor) with the same counts.
    // As served, final newline included (the text format requires it).
    let served = lab.host_ok(&[
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        "5",
        &format!("http://{HOST_UPLINK_IP}:{METRICS_PORT}/metrics"),
    ]);
    promtool_lint(&lab, &served, "GET /metrics");
    let printed = lab.md_ok(&["stats", "--prometheus"]);
    promtool_lint(&lab, &printed, "stats --prometheus");
    let stats_on = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .is_ok_and(|s| s.trim() == "1");
    let keys = |t: &str| -> BTreeSet<String> {
        samples(t)
            .into_keys()
            .filter(|k| {
                stats_on || !(k.starts_with("md_program_") || k.starts_with("md_bpf_stats_enabled"))
            })
            .collect()
    };
    assert_eq!(
        keys(&served),
        keys(&printed),
        "series of /metrics and stats --prometheus"
    );
    let printed = samples(&printed);
    assert!(printed.contains_key("md_bpf_stats_enabled"));
    for k in [
        r#"md_port_hits_total{container="c",protocol="tcp",host_ip="0.0.0.0",host_port="8080",container_port="80"}"#,
        r#"md_policy_drops_total{from="a",to="c"}"#,
        r#"md_container_snat_total{container="a",network="bridge"}"#,
        r#"md_container_dnat_total{container="c",network="bridge"}"#,
    ] {
        let q = k.replace(r#",host_ip="0.0.0.0""#, "");
        assert_eq!(
            printed.get(k),
            Some(&prom.value(&q)),
            "{k} in stats --prometheus"
        );
    }
}

// ---- flow logs ------------------------------------------------------------------------------

/// Seconds since the epoch of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS.fffffffffZ`.
#[track_caller]
fn parse_rfc3339(s: &str) -> f64 {
    let num = |x: &str| -> i64 {
        x.parse()
            .unwrap_or_else(|_| panic!("not an RFC 3339 UTC time: {s:?}"))
    };
    let (date, time) = s
        .strip_suffix('Z')
        .and_then(|t| t.split_once('T'))
        .unwrap_or_else(|| panic!("not an RFC 3339 UTC time: {s:?}"));
    let d: Vec<i64> = date.split('-').map(num).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(num).collect();
    assert!(d.len() == 3 && t.len() == 3, "{s:?}");
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + t[0] * 3600 + t[1] * 60 + t[2];
    secs as f64 + num(frac) as f64 / 10f64.powi(frac.len() as i32)
}

#[test]
fn rfc3339_parser_agrees_with_known_times() {
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), 0.0);
    assert_eq!(parse_rfc3339("2000-03-01T00:00:01.5Z"), 951868801.5);
    assert_eq!(
        parse_rfc3339("2026-05-28T20:26:37.500000000Z"),
        1_780_000_000.0 - 2.5
    );
}

/// Every JSON line of the flow log files, oldest file first.
fn flow_lines(files: &[PathBuf]) -> Vec<Value> {
    files
        .iter()
        .rev()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .map(|l| {
                    serde_json::from_str(l)
                        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", f.display()))
                })
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// The flow log files: FILE, FILE.1, FILE.2, … that exist, newest first.
fn flow_files(path: &Path) -> Vec<PathBuf> {
    let mut files = vec![path.to_path_buf()];
    for i in 1.. {
        let f = PathBuf::from(format!("{}.{i}", path.display()));
        if !f.exists() {
            break;
        }
        files.push(f);
    }
    files
}

/// Waits until the flow log holds a record with all of `want`'s fields; returns it.
#[track_caller]
fn wait_flow(mon: &mut Bg, path: &Path, want: &[(&str, &str)], what: &str) -> Value {
    wait_for(
        &format!("the flow log shows {what}"),
        Duration::from_secs(15),
        || {
            if let Some(st) = mon.try_status() {
                panic!("monitor exited ({st})\n{}", mon.stderr());
            }
            flow_lines(&flow_files(path))
                .into_iter()
                .find(|e| want.iter().all(|(k, v)| e[*k].as_str() == Some(*v)))
        },
    )
}

#[track_caller]
fn assert_fields(ev: &Value, want: &[(&str, Option<&str>)]) {
    for (k, v) in want {
        assert_eq!(ev[*k].as_str(), *v, "field {k} of {ev}");
    }
}

#[test]
fn flow_logs_carry_time_translation_and_names_and_rotate() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("metrics-flows");
    let _http = outside_http(&lab);
    serve(&lab, "c", &["-p", "8080:80"]);
    run_d(&lab, "a", &[], &["sleep", "600"]);
    let (a_ip, c_ip) = (lab.ip_of("a"), lab.ip_of("c"));
    let path = lab.dir().join("flows").join("flows.log");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let path_s = path.to_str().unwrap().to_string();
    let mut mon = lab.spawn_md(&[
        "monitor",
        "--json",
        "--output",
        &path_s,
        "--max-size",
        "4K",
        "--max-files",
        "3",
    ]);
    let url_in = format!("http://{HOST_UPLINK_IP}:8080/");

    // The monitor drains what was queued before it started: connect until one shows.
    wait_for(
        "the monitor logs DNAT events",
        Duration::from_secs(20),
        || {
            curl(lab.outside(&curl_args(&url_in, "")), "outside -> 8080");
            flow_lines(&flow_files(&path))
                .iter()
                .any(|e| e["reason"] == "dnat")
                .then_some(())
        },
    );

    // SNAT: the translated source is what the outside server saw.
    let t = now_secs();
    let seen = curl(
        lab.exec(
            "a",
            &curl_args(&format!("http://{OUTSIDE_IP}:8081/"), "41234"),
        ),
        "a -> outside",
    );
    let ev = wait_flow(
        &mut mon,
        &path,
        &[("reason", "snat"), ("src", &format!("{a_ip}:41234"))],
        "a's SNAT",
    );
    assert_fields(
        &ev,
        &[
            ("event", Some("nat")),
            ("verdict", Some("forwarded")),
            ("proto", Some("tcp")),
            ("dst", Some(&format!("{OUTSIDE_IP}:8081"))),
            ("src_after", Some(&seen)),
            ("dst_after", Some(&format!("{OUTSIDE_IP}:8081"))),
            ("src_container", Some("a")),
            ("dst_container", None),
        ],
    );
    assert!(seen.starts_with(&format!("{HOST_UPLINK_IP}:")), "{seen}");
    let when = parse_rfc3339(ev["time"].as_str().expect("time"));
    assert!(
        (when - t).abs() < 10.0,
        "the event's time {} is not the connection's ({t:.3})",
        ev["time"]
    );

    // DNAT from outside: the published port's client names no container, the target does.
    let seen = curl(lab.outside(&curl_args(&url_in, "42345")), "outside -> 8080");
    assert_eq!(seen, format!("{OUTSIDE_IP}:42345"));
    let ev = wait_flow(
        &mut mon,
        &path,
        &[("reason", "dnat"), ("src", &format!("{OUTSIDE_IP}:42345"))],
        "the DNAT",
    );
    assert_fields(
        &ev,
        &[
            ("dst", Some(&format!("{HOST_UPLINK_IP}:8080"))),
            ("src_after", Some(&format!("{OUTSIDE_IP}:42345"))),
            ("dst_after", Some(&format!("{c_ip}:80"))),
            ("src_container", None),
            ("dst_container", Some("c")),
            ("verdict", Some("forwarded")),
        ],
    );

    // c to its own published port: destination and source both change (the gateway).
    let seen = curl(
        lab.exec("c", &curl_args(&url_in, "43456")),
        "c -> its own 8080",
    );
    assert!(seen.starts_with(&format!("{GATEWAY}:")), "{seen}");
    let ev = wait_flow(
        &mut mon,
        &path,
        &[("src", &format!("{c_ip}:43456"))],
        "c's hairpin",
    );
    assert_fields(
        &ev,
        &[
            ("event", Some("nat")),
            ("reason", Some("hairpin")),
            ("dst", Some(&format!("{HOST_UPLINK_IP}:8080"))),
            ("src_after", Some(&seen)),
            ("dst_after", Some(&format!("{c_ip}:80"))),
            ("src_container", Some("c")),
            ("dst_container", Some("c")),
        ],
    );

    // A policy drop: dropped, nothing translated.
    lab.md_ok(&["policy", "deny", "a", "c"]);
    let out = lab.exec(
        "a",
        &[
            "curl",
            "-sS",
            "--max-time",
            "1",
            "--local-port",
            "44567",
            &format!("http://{c_ip}/"),
        ],
    );
    assert!(
        !out.status.success(),
        "a -> c must be dropped\n{}",
        show_output(&out)
    );
    let ev = wait_flow(
        &mut mon,
        &path,
        &[("event", "policy-deny"), ("src", &format!("{a_ip}:44567"))],
        "the policy drop",
    );
    assert_fields(
        &ev,
        &[
            ("verdict", Some("dropped")),
            ("reason", Some("policy")),
            ("dst", Some(&format!("{c_ip}:80"))),
            ("src_after", Some(&format!("{a_ip}:44567"))),
            ("dst_after", Some(&format!("{c_ip}:80"))),
            ("src_container", Some("a")),
            ("dst_container", Some("c")),
        ],
    );

    // Rotation: enough connections for more than three 4 KiB files.
    let mut last = 0;
    for port in 45000..45040 {
        curl(
            lab.outside(&curl_args(&url_in, &port.to_string())),
            "outside -> 8080",
        );
        last = port;
    }
    wait_flow(
        &mut mon,
        &path,
        &[("src", &format!("{OUTSIDE_IP}:{last}"))],
        "the last connection",
    );
    let files = flow_files(&path);
    let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        names,
        ["flows.log", "flows.log.1", "flows.log.2"],
        "--max-files 3"
    );
    for f in &files {
        let size = std::fs::metadata(f).unwrap().len();
        assert!(
            size <= 4096,
            "{} has {size} bytes (--max-size 4K)",
            f.display()
        );
    }
    let lines = flow_lines(&files);
    let ts: Vec<u64> = lines
        .iter()
        .map(|e| e["ts_ns"].as_u64().expect("ts_ns"))
        .collect();
    assert!(
        ts.windows(2).all(|w| w[0] <= w[1]),
        "records out of order across files"
    );
    let newest = flow_lines(&files[..1]);
    assert!(
        newest
            .last()
            .is_some_and(|e| e["src"] == format!("{OUTSIDE_IP}:{last}").as_str()),
        "the newest record is not at the end of flows.log"
    );
    assert!(
        !lines
            .iter()
            .any(|e| e["src"] == format!("{a_ip}:41234").as_str()),
        "the oldest records were not rotated away"
    );
    assert!(
        mon.stdout().is_empty(),
        "--output leaves stdout alone: {}",
        mon.stdout()
    );
}

#[test]
fn metrics_and_flow_log_bad_input_is_one_line() {
    if !require_e2e() {
        return;
    }
    need_tools();
    let lab = Lab::new("metrics-bad");
    // Before any container there is no datapath, and the exposition says only that.
    let printed = samples(&lab.md_ok(&["stats", "--prometheus"]));
    assert_eq!(
        printed.into_iter().collect::<Vec<_>>(),
        [("md_datapath_loaded".to_string(), 0.0)]
    );
    run_d(&lab, "a", &[], &["sleep", "600"]);
    let listen = format!("{HOST_UPLINK_IP}:{METRICS_PORT}");
    let _server = lab.spawn_md(&["metrics", "--listen", &listen]);
    lab.wait_listening_host("tcp", METRICS_PORT);
    let missing = lab.dir().join("no-such-dir").join("flows.log");
    let missing = missing.to_str().unwrap();
    let unmade = lab.dir().join("unmade.log");
    let unmade = unmade.to_str().unwrap();
    for (args, what) in [
        (
            vec!["metrics", "--listen", "nowhere"],
            "a listen address without a port",
        ),
        (
            vec!["metrics", "--listen", &listen],
            "a port already in use",
        ),
        (vec!["metrics"], "no --listen"),
        (
            vec!["stats", "--prometheus", "--json"],
            "two output formats",
        ),
        (
            vec!["monitor", "--json", "--max-size", "1M"],
            "--max-size without --output",
        ),
        (
            vec!["monitor", "--json", "--output", missing],
            "an output in a missing directory",
        ),
        (
            vec!["monitor", "--output", unmade, "--max-size", "0"],
            "a zero size",
        ),
        (
            vec!["monitor", "--output", unmade, "--max-files", "0"],
            "no files",
        ),
    ] {
        let out = lab.md(&args);
        let err = assert_one_line_error(&out, what);
        assert!(err.starts_with("md-user: "), "{what}: {err}");
    }
    assert!(
        !Path::new(missing).parent().unwrap().exists(),
        "a directory was created"
    );
    assert!(
        !Path::new(unmade).exists(),
        "a refused monitor created its output"
    );
}

#[test]
fn readme_shows_the_queries_tested_here() {
    let readme = include_str!("../../README.md");
    for q in [
        README_DROPS_BY_REASON,
        README_TOP_TALKERS,
        README_NAT_PRESSURE,
    ] {
        assert!(readme.contains(q), "README.md lacks the query {q}");
    }
}
