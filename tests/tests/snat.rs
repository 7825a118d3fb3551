//! Containers reaching the outside world through masquerade (SNAT to the uplink address).
//!
//! EXPECTED TO FAIL until SNAT lands (a separate issue from the foundation): the outside
//! namespace has no route back to 172.18.0.0/16, so without masquerade the replies never
//! arrive. Deliberately not #[ignore]d: these turn green when SNAT works.

use md_tests::{fixture, require_e2e, require_tools, Lab, HOST_UPLINK_IP, OUTSIDE_IP};

fn assert_masqueraded(peer: &str, what: &str) {
    let peer = peer.trim();
    let (ip, port) = peer
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{what}: peer said {peer:?}, not ip:port"));
    assert_eq!(
        ip, HOST_UPLINK_IP,
        "{what}: the outside saw {peer}, not the host's uplink address"
    );
    assert!(
        port.parse::<u16>().is_ok_and(|p| p > 0),
        "{what}: port in {peer}"
    );
}

#[test]
fn container_reaches_outside_http_masqueraded() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "curl", "ss"]);
    let lab = Lab::new("snat-http");
    let server = fixture("peer_http.py");
    let _server = lab.spawn_outside(&["python3", server.to_str().unwrap(), "8080", OUTSIDE_IP]);
    lab.wait_listening_outside("tcp", 8080);

    lab.md_ok(&["run", "-d", "--name", "c", "--", "sleep", "300"]);
    let url = format!("http://{OUTSIDE_IP}:8080/");
    let body = lab.exec_ok("c", &["curl", "-sS", "--max-time", "5", &url]);
    assert_masqueraded(&body, "HTTP from container c");

    // A second container, a second flow: both translated.
    lab.md_ok(&["run", "-d", "--name", "d", "--", "sleep", "300"]);
    let body = lab.exec_ok("d", &["curl", "-sS", "--max-time", "5", &url]);
    assert_masqueraded(&body, "HTTP from container d");
}

#[test]
fn container_reaches_outside_udp_masqueraded() {
    if !require_e2e() {
        return;
    }
    require_tools(&["python3", "ss"]);
    let lab = Lab::new("snat-udp");
    let server = fixture("peer_udp.py");
    let ask = fixture("udp_ask.py");
    let _server = lab.spawn_outside(&["python3", server.to_str().unwrap(), "9090", OUTSIDE_IP]);
    lab.wait_listening_outside("udp", 9090);

    lab.md_ok(&["run", "-d", "--name", "c", "--", "sleep", "300"]);
    let reply = lab.exec_ok("c", &["python3", ask.to_str().unwrap(), OUTSIDE_IP, "9090"]);
    assert_masqueraded(&reply, "UDP from container c");
}
