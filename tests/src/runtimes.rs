//! Real container runtimes (Podman 4.3 with its CNI backend, containerd 1.6 with `ctr run
//! --cni`) on md's CNI plugin, inside the lab and with every file of theirs in the lab's temp
//! dir.
//!
//! Both runtimes also write where no option moves them: libcni's result cache (/var/lib/cni),
//! ctr's CNI directories (/etc/cni/net.d, /opt/cni/bin) and containerd's shim sockets
//! (/run/containerd). So they run in a private mount namespace held by a sleeping process, where
//! /etc, /opt, /var/lib and /run are overlays whose upper layers live on a tmpfs of that
//! namespace: they read the machine's files and write only into the lab. Their network namespace
//! is the lab's host namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::process::{run_timeout, show_output};
use crate::{wait_until, Bg, Lab, MD_TIMEOUT};

/// A root filesystem of busybox-static (every applet linked), with /etc/passwd, /etc/group and
/// a resolv.conf naming `nameserver`.
pub fn busybox_rootfs(dir: &Path, nameserver: &str) {
    let bin = dir.join("bin");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
        std::fs::create_dir_all(dir.join(d)).expect("rootfs dir");
    }
    let busybox = crate::which("busybox").expect("busybox (busybox-static) on PATH");
    std::fs::copy(&busybox, bin.join("busybox")).expect("copy busybox");
    // The applets from the original: executing the fresh copy races with other test threads'
    // forks, which hold its write descriptor until they exec (ETXTBSY).
    let list = run_timeout(
        Command::new(&busybox).arg("--list"),
        Duration::from_secs(10),
    );
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    let w = |p: &str, s: &str| std::fs::write(dir.join(p), s).expect("rootfs file");
    w("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
    w("etc/group", "root:x:0:\n");
    w("etc/resolv.conf", &format!("nameserver {nameserver}\n"));
    w("tmp/index.html", "hello from md\n");
}

/// A docker-archive tar (`ctr image import` reads it) of one layer: `rootfs`, tagged `tag`.
pub fn image_tar(rootfs: &Path, work: &Path, tag: &str) -> PathBuf {
    std::fs::create_dir_all(work).expect("image work dir");
    let layer = work.join("layer.tar");
    let out = run_timeout(
        Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg("."),
        MD_TIMEOUT,
    );
    assert!(out.status.success(), "tar: {}", show_output(&out));
    let sum = run_timeout(Command::new("sha256sum").arg(&layer), MD_TIMEOUT);
    let digest = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
    });
    std::fs::write(work.join("config.json"), config.to_string()).expect("config.json");
    let manifest = serde_json::json!([
        {"Config": "config.json", "RepoTags": [tag], "Layers": ["layer.tar"]}
    ]);
    std::fs::write(work.join("manifest.json"), manifest.to_string()).expect("manifest.json");
    let tar = work.join("image.tar");
    let out = run_timeout(
        Command::new("tar")
            .arg("-C")
            .arg(work)
            .arg("-cf")
            .arg(&tar)
            .args(["manifest.json", "config.json", "layer.tar"]),
        MD_TIMEOUT,
    );
    assert!(out.status.success(), "tar: {}", show_output(&out));
    tar
}

/// The holder script: overlays over /etc, /opt, /var/lib and /run with upper layers on a tmpfs
/// at $1, an empty /etc/cni/net.d and /opt/cni/bin, then sleep.
const HOLDER: &str = r#"set -e
mount -t tmpfs md-test-overlays "$1"
for d in etc opt var/lib run; do
  n=$(echo "$d" | tr / _)
  mkdir -p "$1/$n/up" "$1/$n/work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$1/$n/up,workdir=$1/$n/work" "/$d"
done
rm -rf /etc/cni/net.d /opt/cni/bin
mkdir -p /etc/cni/net.d /opt/cni/bin
echo ready
exec sleep 86400
"#;

/// A private mount namespace (see the module docs), alive while the guard is.
pub struct MountNs {
    holder: Bg,
}

impl MountNs {
    #[track_caller]
    pub fn new(lab: &Lab, dir: &Path) -> MountNs {
        let tmpfs = dir.join("overlays");
        std::fs::create_dir_all(&tmpfs).expect("overlay dir");
        let mut holder = Bg::spawn(
            Command::new("unshare")
                .args([
                    "-m",
                    "--propagation",
                    "slave",
                    "--",
                    "sh",
                    "-c",
                    HOLDER,
                    "holder",
                ])
                .arg(&tmpfs),
            &lab.log_path("mount-holder"),
        );
        wait_until(
            "the mount namespace is ready",
            Duration::from_secs(10),
            || {
                if let Some(st) = holder.try_status() {
                    panic!("mount holder exited ({st}): {}", holder.stderr());
                }
                holder.stdout().contains("ready")
            },
        );
        lab.track_pid(holder.pid());
        MountNs { holder }
    }

    /// `program args` in this mount namespace and the lab's host network namespace.
    pub fn cmd(&self, lab: &Lab, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{}/ns/mnt", self.holder.pid()))
            .arg(format!("--net=/run/netns/{}", lab.host_ns()))
            .arg("--")
            .arg(program);
        c
    }
}

#[track_caller]
fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "`{what}` failed\n{}",
        show_output(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Podman 4.3 with `network_backend = "cni"`, its configuration, storage and CNI directories in
/// `dir`, runc, the ulimits this machine allows.
pub struct Podman<'a> {
    lab: &'a Lab,
    pub dir: PathBuf,
    mnt: MountNs,
}

impl<'a> Podman<'a> {
    /// Sets Podman up with `conflists` (file name, content) in its CNI configuration directory,
    /// whose plugin directory holds md.
    #[track_caller]
    pub fn new(lab: &'a Lab, conflists: &[(&str, Value)]) -> Podman<'a> {
        let dir = lab.dir().join("podman");
        let conf = dir.join("cni-conf");
        for d in ["cni-conf", "root", "runroot", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).expect("podman dirs");
        }
        for (name, c) in conflists {
            std::fs::write(conf.join(name), c.to_string()).expect("conflist");
        }
        let d = dir.display();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}"]
network_config_dir = "{d}/cni-conf"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{d}/events.log"
tmp_dir = "{d}/tmp"
"#,
                bin = lab.cni_bin_dir().display()
            ),
        )
        .expect("containers.conf");
        std::fs::write(
            dir.join("storage.conf"),
            format!("[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/runroot\"\ngraphroot = \"{d}/root\"\n"),
        )
        .expect("storage.conf");
        let mnt = MountNs::new(lab, &dir);
        Podman { lab, dir, mnt }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.mnt.cmd(self.lab, "podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run_timeout(&mut self.cmd(args), MD_TIMEOUT)
    }

    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        ok(self.run(args), &format!("podman {}", args.join(" ")))
    }

    /// `podman run -d --name NAME OPTS... --rootfs ROOTFS CMD...`; its process is tracked for the
    /// lab's cleanup.
    #[track_caller]
    pub fn run_d(&self, name: &str, opts: &[&str], rootfs: &Path, cmd: &[&str]) {
        let rootfs = rootfs.to_str().expect("utf-8 rootfs");
        let mut a = vec!["run", "-d", "--name", name];
        a.extend_from_slice(opts);
        a.extend_from_slice(&["--rootfs", rootfs]);
        a.extend_from_slice(cmd);
        self.ok(&a);
        let pid = self.ok(&["inspect", "--format", "{{.State.Pid}}", name]);
        if let Ok(pid) = pid.parse::<i32>() {
            self.lab.track_pid(pid);
        }
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        // Every container, with its CNI DEL, before the mount namespace goes.
        let _ = crate::process::try_run_timeout(
            &mut self.cmd(&["rm", "-f", "-a", "-t", "0"]),
            Duration::from_secs(60),
        );
    }
}

/// containerd 1.6 (root, state, socket and configuration in `dir`) and `ctr`, whose `--cni`
/// reads /etc/cni/net.d and /opt/cni/bin: those of the private mount namespace, holding md.
pub struct Containerd<'a> {
    lab: &'a Lab,
    pub dir: PathBuf,
    mnt: MountNs,
    _daemon: Bg,
}

impl<'a> Containerd<'a> {
    #[track_caller]
    pub fn new(lab: &'a Lab) -> Containerd<'a> {
        let dir = lab.dir().join("containerd");
        std::fs::create_dir_all(&dir).expect("containerd dir");
        let d = dir.display();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n[grpc]\n  address = \"{d}/containerd.sock\"\n"
            ),
        )
        .expect("config.toml");
        let mnt = MountNs::new(lab, &dir);
        let link = mnt
            .cmd(lab, "ln")
            .arg("-s")
            .arg(lab.md_bin())
            .arg("/opt/cni/bin/md")
            .output()
            .expect("ln");
        assert!(link.status.success(), "{}", show_output(&link));
        let mut daemon = Bg::spawn(
            mnt.cmd(lab, "containerd")
                .arg("--config")
                .arg(dir.join("config.toml")),
            &lab.log_path("containerd"),
        );
        let sock = dir.join("containerd.sock");
        wait_until("containerd serves", Duration::from_secs(30), || {
            if let Some(st) = daemon.try_status() {
                panic!("containerd exited ({st}): {}", daemon.stderr());
            }
            sock.exists()
        });
        Containerd {
            lab,
            dir,
            mnt,
            _daemon: daemon,
        }
    }

    /// Writes the CNI configuration `ctr run --cni` loads (it takes the first conflist).
    pub fn set_conflist(&self, conf: &Value) {
        let mut c = self.mnt.cmd(self.lab, "sh");
        c.args(["-c", "cat > /etc/cni/net.d/10-md.conflist"]);
        let out = crate::cni::run_with_stdin(&mut c, &conf.to_string());
        assert!(out.success, "writing the conflist: {}", out.stderr);
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut c = self.mnt.cmd(self.lab, "ctr");
        c.arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(args);
        run_timeout(&mut c, MD_TIMEOUT)
    }

    #[track_caller]
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        ok(self.ctr(args), &format!("ctr {}", args.join(" ")))
    }

    /// `ctr run -d --cni IMAGE ID CMD...`; its task is tracked for the lab's cleanup.
    #[track_caller]
    pub fn run_d(&self, image: &str, id: &str, cmd: &[&str]) {
        let mut a = vec!["run", "-d", "--cni", image, id];
        a.extend_from_slice(cmd);
        self.ctr_ok(&a);
        let tasks = self.ctr_ok(&["task", "ls"]);
        for line in tasks
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(id))
        {
            if let Some(pid) = line.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                self.lab.track_pid(pid);
            }
        }
    }

    /// Kills a task and deletes it and its container (as `ctr` leaves it: no CNI DEL).
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "KILL", id]);
        for _ in 0..50 {
            if self.ctr(&["task", "delete", id]).status.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.ctr(&["container", "delete", id]);
    }
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        let list = self.ctr(&["container", "ls", "-q"]);
        for id in String::from_utf8_lossy(&list.stdout).lines() {
            self.remove(id.trim());
        }
    }
}
