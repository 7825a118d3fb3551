//! Debian's Docker 20.10 inside the lab with md as its network driver: `dockerd` and `md-user
//! docker-plugin` run in the lab's host network namespace and in one private mount namespace
//! ([`MountNs`]: /etc, /opt, /var/lib and /run are overlays on a tmpfs), so the plugin socket
//! Docker finds in /run/docker/plugins, containerd's shim sockets and /etc/docker never reach
//! the machine. Data root, exec root, pid file and API socket are in the lab's temp dir;
//! `--iptables=false --ip6tables=false --bridge=none`, so Docker writes no netfilter rule.
//! The driver is named after the lab (`md-<key>`). Dropping it removes every container, stops
//! dockerd and the plugin (whose socket goes with it) and then the mount namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::process::{run_timeout, show_output, try_run_timeout};
use crate::runtimes::MountNs;
use crate::{wait_until, Bg, Lab, MD_TIMEOUT, UPLINK};

/// Debian's client and daemon (another `docker` on PATH may be a different client).
pub const DOCKER: &str = "/usr/bin/docker";
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// The image [`Docker::import_busybox`] makes.
pub const IMAGE: &str = "md-busybox:latest";

pub struct Docker<'a> {
    lab: &'a Lab,
    pub dir: PathBuf,
    /// Docker's name for md's driver (and its IPAM driver): `md-<lab key>`.
    pub driver: String,
    mnt: MountNs,
    daemon: Option<Bg>,
    plugin: Option<Bg>,
    daemon_args: Vec<String>,
    plugin_env: Vec<(String, String)>,
}

impl<'a> Docker<'a> {
    /// Starts md's plugin (with `plugin_env` added to the lab's md environment, e.g.
    /// `MD_RESOLV_CONF`), then dockerd with `extra` options (e.g. `--live-restore`, `--dns`).
    #[track_caller]
    pub fn new(lab: &'a Lab, extra: &[&str], plugin_env: &[(&str, &str)]) -> Docker<'a> {
        let dir = lab.dir().join("docker");
        std::fs::create_dir_all(dir.join("cli")).expect("docker dir");
        std::fs::write(dir.join("daemon.json"), "{}").expect("daemon.json");
        let key = lab
            .dir()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("mdt-"))
            .expect("lab dir mdt-<key>")
            .to_string();
        let mnt = MountNs::new(lab, &dir);
        let mut d = Docker {
            lab,
            driver: format!("md-{key}"),
            mnt,
            daemon: None,
            plugin: None,
            daemon_args: extra.iter().map(|s| s.to_string()).collect(),
            plugin_env: plugin_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
        };
        d.start_plugin();
        d.start_daemon();
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// The plugin's socket, as Docker (in the private mount namespace) finds it.
    pub fn plugin_socket(&self) -> String {
        format!("/run/docker/plugins/{}.sock", self.driver)
    }

    /// A command in the mount namespace and the lab's host network namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.mnt.cmd(self.lab, program)
    }

    /// True when `path` exists in the private mount namespace.
    pub fn exists(&self, path: &str) -> bool {
        run_timeout(self.cmd("test").args(["-e", path]), MD_TIMEOUT)
            .status
            .success()
    }

    /// `md-user docker-plugin` with the lab's md environment, in the mount namespace.
    #[track_caller]
    pub fn start_plugin(&mut self) {
        assert!(self.plugin.is_none(), "the plugin runs already");
        let mut c = self.cmd(self.lab.md_bin());
        c.args(["docker-plugin", "--name", &self.driver, "--docker-host"])
            .arg(format!("unix://{}", self.socket().display()))
            .env_remove("MD_BRIDGE")
            .env_remove("MD_SUBNET")
            .env("MD_STATE_DIR", self.lab.state_dir())
            .env("MD_BPF_PIN_DIR", self.lab.pin_dir())
            .env("MD_UPLINK", UPLINK)
            .envs(self.plugin_env.iter().map(|(k, v)| (k, v)));
        let mut bg = Bg::spawn(&mut c, &self.lab.log_path("docker-plugin"));
        let sock = self.plugin_socket();
        wait_until("md's plugin listens", Duration::from_secs(30), || {
            if let Some(st) = bg.try_status() {
                panic!("md-user docker-plugin exited ({st}): {}", bg.stderr());
            }
            bg.stderr().contains("serving Docker's") && self.exists(&sock)
        });
        self.lab.track_pid(bg.pid());
        self.plugin = Some(bg);
    }

    /// Kills the plugin with `sig` and waits for it (SIGKILL leaves its socket behind).
    pub fn stop_plugin(&mut self, sig: i32) {
        if let Some(mut p) = self.plugin.take() {
            p.signal(sig);
            p.wait_timeout(Duration::from_secs(30));
        }
    }

    /// What the plugin logged so far.
    pub fn plugin_log(&self) -> String {
        self.plugin.as_ref().map(Bg::stderr).unwrap_or_default()
    }

    #[track_caller]
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "dockerd runs already");
        let d = &self.dir;
        let mut c = self.cmd(DOCKERD);
        c.arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--userland-proxy=false",
                "--storage-driver=vfs",
                "--default-ulimit",
                "nofile=1024:1024",
                "--default-ulimit",
                "nproc=4096:4096",
            ])
            .args(&self.daemon_args);
        let mut bg = Bg::spawn(&mut c, &self.lab.log_path("dockerd"));
        let sock = self.socket();
        wait_until("dockerd serves", Duration::from_secs(60), || {
            if let Some(st) = bg.try_status() {
                panic!("dockerd exited ({st}): {}", bg.stderr());
            }
            sock.exists() && self.docker(&["version"]).status.success()
        });
        self.lab.track_pid(bg.pid());
        self.daemon = Some(bg);
    }

    /// Stops dockerd (SIGTERM: with `--live-restore` its containers keep running) and waits.
    pub fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.signal(libc::SIGTERM);
            d.wait_timeout(Duration::from_secs(60));
        }
    }

    pub fn docker_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.cmd(DOCKER);
        c.env("DOCKER_CONFIG", self.dir.join("cli"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args);
        c
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        run_timeout(&mut self.docker_cmd(args), MD_TIMEOUT)
    }

    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "`docker {}` failed\n{}\n--- md-user docker-plugin ---\n{}",
            args.join(" "),
            show_output(&out),
            self.plugin_log()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `docker import` of a busybox-static root filesystem as [`IMAGE`].
    #[track_caller]
    pub fn import_busybox(&self, rootfs: &Path) {
        let tar = self.dir.join("rootfs.tar");
        let out = run_timeout(
            Command::new("tar")
                .arg("-C")
                .arg(rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
            MD_TIMEOUT,
        );
        assert!(out.status.success(), "tar: {}", show_output(&out));
        let tar = tar.to_str().expect("utf-8 path");
        self.ok(&["import", "--change", "ENV PATH=/bin", tar, IMAGE]);
    }

    /// `docker run -d --name NAME OPTS... IMAGE CMD...`; its process is tracked for the lab's
    /// cleanup. Returns the container id.
    #[track_caller]
    pub fn run_d(&self, name: &str, opts: &[&str], cmd: &[&str]) -> String {
        let mut a = vec!["run", "-d", "--name", name];
        a.extend_from_slice(opts);
        a.push(IMAGE);
        a.extend_from_slice(cmd);
        let id = self.ok(&a);
        let pid = self.ok(&["inspect", "--format", "{{.State.Pid}}", name]);
        if let Ok(pid) = pid.parse::<i32>() {
            self.lab.track_pid(pid);
        }
        id
    }
}

impl Drop for Docker<'_> {
    fn drop(&mut self) {
        // Every container and network while dockerd and the plugin run (Docker deletes the
        // endpoints through md), then dockerd, then the plugin.
        if self.daemon.is_some() {
            let list = try_run_timeout(&mut self.docker_cmd(&["ps", "-aq"]), MD_TIMEOUT);
            let ids: Vec<String> = list
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            if !ids.is_empty() {
                let mut a = vec!["rm", "-f"];
                a.extend(ids.iter().map(String::as_str));
                let _ = try_run_timeout(&mut self.docker_cmd(&a), Duration::from_secs(120));
            }
            let _ = try_run_timeout(
                &mut self.docker_cmd(&["network", "prune", "-f"]),
                MD_TIMEOUT,
            );
        }
        if let Some(mut d) = self.daemon.take() {
            d.signal(libc::SIGTERM);
            for _ in 0..600 {
                if d.try_status().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Some(mut p) = self.plugin.take() {
            // SIGTERM: it removes its socket.
            p.signal(libc::SIGTERM);
            for _ in 0..100 {
                if p.try_status().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
