//! `cargo xtask demo`: md's main job on an embedded default topology.
//!
//! Builds a throwaway lab (a "host" namespace whose uplink veth leads to an "outside"
//! namespace on 192.0.2.0/24), runs md-user inside the host namespace, starts containers,
//! shows them talking (masquerade, published ports from outside and from the host, hairpin,
//! names, policy), prints what the datapath counted, and tears everything down — also when a
//! step fails or on Ctrl-C. Nothing touches the machine's real interfaces.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::util;

/// Commands the demo uses, and the Debian package providing each.
pub const DEMO_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("bpftool", "bpftool"),
];

struct Lab {
    host: String,
    outside: String,
    dir: PathBuf,
    pin: PathBuf,
    md_user: PathBuf,
    bg: Vec<Child>,
}

impl Lab {
    fn new(md_user: PathBuf) -> Result<Lab> {
        let tag = format!("mddemo{}", std::process::id() % 100000);
        let lab = Lab {
            host: format!("{tag}-h"),
            outside: format!("{tag}-o"),
            dir: std::env::temp_dir().join(&tag),
            pin: PathBuf::from("/sys/fs/bpf").join(&tag),
            md_user,
            bg: Vec::new(),
        };
        std::fs::create_dir_all(&lab.dir)?;
        std::fs::write(lab.dir.join("resolv.conf"), "nameserver 192.0.2.2\n")?;
        let (h, o) = (lab.host.as_str(), lab.outside.as_str());
        for args in [
            vec!["netns", "add", h],
            vec!["netns", "add", o],
            vec![
                "-n", h, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", o,
            ],
            vec!["-n", h, "addr", "add", "192.0.2.1/24", "dev", "up0"],
            vec!["-n", h, "link", "set", "up0", "up"],
            vec!["-n", h, "link", "set", "lo", "up"],
            vec!["-n", h, "route", "add", "default", "via", "192.0.2.2"],
            vec!["-n", o, "addr", "add", "192.0.2.2/24", "dev", "eth0"],
            vec!["-n", o, "link", "set", "eth0", "up"],
            vec!["-n", o, "link", "set", "lo", "up"],
        ] {
            util::run(util::command("ip").args(&args))?;
        }
        Ok(lab)
    }

    /// md-user in the host namespace (nsenter keeps the mount namespace, so /sys/fs/bpf stays).
    fn md_cmd(&self, args: &[&str]) -> Command {
        let mut c = util::command("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host))
            .arg("--")
            .arg(&self.md_user)
            .args(args)
            .env("MD_STATE_DIR", self.dir.join("state"))
            .env("MD_BPF_PIN_DIR", &self.pin)
            .env("MD_UPLINK", "up0")
            .env("MD_RESOLV_CONF", self.dir.join("resolv.conf"));
        c
    }

    fn md(&self, args: &[&str]) -> Result<String> {
        let shown = format!("md-user {}", args.join(" "));
        println!("\x1b[1m$ {shown}\x1b[0m");
        let out = self.md_cmd(args).output().with_context(|| shown.clone())?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("`{shown}` failed");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A command in a namespace, shown and echoed; returns stdout.
    fn in_ns(&self, label: &str, ns: &str, args: &[&str]) -> Result<String> {
        println!("\x1b[1m[{label}]$ {}\x1b[0m", args.join(" "));
        let out = util::command("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()?;
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        print!("{s}");
        if !s.ends_with('\n') && !s.is_empty() {
            println!();
        }
        Ok(s.trim().to_string())
    }

    fn spawn_outside(&mut self, args: &[&str]) -> Result<()> {
        let child = util::command("ip")
            .args(["netns", "exec", &self.outside])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.bg.push(child);
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.md_cmd(&["down"]).stdout(Stdio::null()).status();
        for c in &mut self.bg {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.host, &self.outside] {
            let _ = util::command("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.pin);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out waiting for {what}")
}

fn section(title: &str) {
    println!("\n\x1b[1;36m== {title}\x1b[0m");
}

fn expect(what: &str, got: &str, want: &str) -> Result<()> {
    if got.contains(want) {
        println!("   \x1b[32m✓ {what}\x1b[0m");
        Ok(())
    } else {
        bail!("{what}: expected {want:?}, got {got:?}")
    }
}

pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!("the demo creates network namespaces: run it as root (sudo -E cargo xtask demo)");
    }
    // Like the test tools: installed from Debian when missing (bpftool for the last step).
    util::ensure_tools("demo tools", DEMO_TOOLS)?;
    crate::build_ebpf::run()?;
    let md_user = util::cargo_host_build_md_user()?;
    let fixtures = util::workspace_root().join("tests/fixtures");
    let peer_http = fixtures.join("peer_http.py");
    let peer_http = peer_http.to_str().context("path")?;
    let mut lab = Lab::new(md_user)?;
    // Ctrl-C ends the demo through Drop (namespaces, pins and containers go).
    ctrlc_cleanup();
    demo(&mut lab, peer_http)
}

fn demo(lab: &mut Lab, peer_http: &str) -> Result<()> {
    section("The lab: host namespace (uplink up0 192.0.2.1) ↔ outside namespace (192.0.2.2)");
    println!("An HTTP server in the outside namespace answers with the client address it saw.");
    lab.spawn_outside(&["python3", peer_http, "80"])?;
    wait_for("the outside server", || {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.outside,
                "curl",
                "-s",
                "-m1",
                "http://192.0.2.2/",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    })?;

    section("Containers: web publishes 8080 → 80, client is a plain shell");
    lab.md(&[
        "run", "-d", "--name", "web", "-p", "8080:80", "--", "python3", peer_http, "80",
    ])?;
    lab.md(&["run", "-d", "--name", "client", "--", "sleep", "600"])?;
    lab.md(&["ps"])?;
    wait_for("web to listen", || {
        lab.md_cmd(&[
            "exec",
            "web",
            "--",
            "curl",
            "-s",
            "-m1",
            "http://127.0.0.1/",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
    })?;

    section("Masquerade: client → outside is seen as the host's uplink address");
    let seen = lab.md(&[
        "exec",
        "client",
        "--",
        "curl",
        "-s",
        "-m3",
        "http://192.0.2.2/",
    ])?;
    expect(
        "outside saw 192.0.2.1 (SNAT in eBPF at the uplink)",
        &seen,
        "192.0.2.1:",
    )?;

    section("Published port from outside, from the host, and hairpin from a container");
    let seen = lab.in_ns(
        "outside",
        &lab.outside.clone(),
        &["curl", "-s", "-m3", "http://192.0.2.1:8080/"],
    )?;
    expect(
        "outside → 192.0.2.1:8080 reached web (DNAT at uplink ingress)",
        &seen,
        "192.0.2.2:",
    )?;
    let seen = lab.in_ns(
        "host",
        &lab.host.clone(),
        &["curl", "-s", "-m3", "http://127.0.0.1:8080/"],
    )?;
    expect(
        "host → 127.0.0.1:8080 reached web (cgroup connect4)",
        &seen,
        "172.18.0.1:",
    )?;
    let client_ip = lab.md(&["exec", "client", "--", "hostname", "-I"])?;
    let seen = lab.md(&[
        "exec",
        "client",
        "--",
        "curl",
        "-s",
        "-m3",
        "http://192.0.2.1:8080/",
    ])?;
    expect(
        "client → 192.0.2.1:8080 reached web (hairpin at the veth)",
        &seen,
        client_ip.trim(),
    )?;

    section("Names: each container resolves the others through its network's resolver");
    let seen = lab.md(&["exec", "client", "--", "curl", "-s", "-m3", "http://web/"])?;
    expect("client → http://web/ by name", &seen, client_ip.trim())?;

    section("Policy: deny client → web, in BPF maps only");
    lab.md(&["policy", "deny", "client", "web"])?;
    let out = lab
        .md_cmd(&["exec", "client", "--", "curl", "-s", "-m2", "http://web/"])
        .output()?;
    println!(
        "\x1b[1m$ md-user exec client -- curl -m2 http://web/\x1b[0m  → {}",
        out.status
    );
    if out.status.success() {
        bail!("the deny rule did not stop client → web");
    }
    println!("   \x1b[32m✓ refused (and via 192.0.2.1:8080 too: the rule follows the published port)\x1b[0m");
    let seen = lab.md(&[
        "exec",
        "web",
        "--",
        "curl",
        "-s",
        "-m3",
        "http://192.0.2.2/",
    ])?;
    expect(
        "unrelated flows keep working (web → outside)",
        &seen,
        "192.0.2.1:",
    )?;
    lab.md(&["policy", "list"])?;

    section("What the datapath counted");
    lab.md(&["stats"])?;
    lab.md(&["inspect", "web"])?;
    lab.md(&["port", "web"])?;
    section("Pinned maps carry BTF: bpftool prints field names");
    let port_map = lab.pin.join("maps/PORT_MAP");
    println!(
        "\x1b[1m$ bpftool map dump pinned {}\x1b[0m",
        port_map.display()
    );
    let out = util::command("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&port_map)
        .output()?;
    let dump = String::from_utf8_lossy(&out.stdout);
    print!("{dump}");
    if !out.status.success() {
        bail!(
            "bpftool map dump failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    expect(
        "PORT_MAP maps host port 8080 to web's port 80 (field names from BTF)",
        &dump,
        "\"port\": 8080",
    )?;

    section("Tear down: md-user down removes containers, bridge, programs, pins and state");
    lab.md(&["down"])?;
    let left = Path::new(&lab.pin).exists();
    expect(
        "pin directory gone",
        if left { "left" } else { "gone" },
        "gone",
    )?;
    println!("\nDemo finished; the lab namespaces are deleted on exit.");
    Ok(())
}

/// On Ctrl-C the demo must still clean up: xtask catches SIGINT (a no-op handler, reset to
/// the default in the programs it starts), the step in progress fails because its command
/// died, and the lab's Drop removes everything.
fn ctrlc_cleanup() {
    extern "C" fn on_sigint(_: i32) {}
    extern "C" {
        fn signal(sig: i32, handler: extern "C" fn(i32)) -> usize;
    }
    const SIGINT: i32 = 2;
    unsafe {
        signal(SIGINT, on_sigint);
    }
}
