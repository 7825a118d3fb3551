//! Driving md's CNI plugin the way a runtime does (and the reference plugins' integration tests
//! do): `CNI_*` in the environment, the network configuration on stdin, a result or an error
//! object on stdout. The plugin is md-user under the name `md` in a plugin directory of the lab.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::process::show_output;
use crate::{Lab, MD_TIMEOUT, UPLINK};

/// Where Debian's containernetworking-plugins installs the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// What one plugin call returned.
#[derive(Debug)]
pub struct CniOut {
    pub success: bool,
    /// stdout parsed (Null when empty).
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl CniOut {
    /// The error object's code; panics unless the call failed with one.
    #[track_caller]
    pub fn code(&self) -> u64 {
        assert!(
            !self.success,
            "expected an error, got success: {}",
            self.stdout
        );
        self.json["code"].as_u64().unwrap_or_else(|| {
            panic!(
                "no error code in {:?} (stderr {})",
                self.stdout, self.stderr
            )
        })
    }

    /// The error message.
    pub fn msg(&self) -> String {
        self.json["msg"].as_str().unwrap_or_default().to_string()
    }

    /// Asserts success; returns the parsed stdout.
    #[track_caller]
    pub fn ok(&self) -> &Value {
        assert!(
            self.success,
            "CNI call failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        &self.json
    }
}

/// One attachment's environment.
#[derive(Debug, Clone)]
pub struct Attach<'a> {
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub args: &'a str,
}

impl Lab {
    /// The lab's CNI plugin directory, holding `md` (a link to md-user).
    pub fn cni_bin_dir(&self) -> PathBuf {
        let dir = self.dir().join("cni-bin");
        let md = dir.join("md");
        if !md.exists() {
            std::fs::create_dir_all(&dir).expect("cni bin dir");
            std::os::unix::fs::symlink(self.md_bin(), &md).expect("md plugin link");
        }
        dir
    }

    /// md's plugin configuration for this lab (its state and pin dirs, uplink, upstream
    /// resolv.conf), as one conflist entry with `name`; `extra` fields are merged in.
    pub fn cni_conf(&self, version: &str, name: &str, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": name,
            "type": "md",
            "stateDir": self.state_dir(),
            "pinDir": self.pin_dir(),
            "uplink": UPLINK,
        });
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    }

    /// Runs the plugin in the host namespace with `command` and `stdin` (raw text).
    pub fn cni_raw(&self, command: Option<&str>, a: Option<&Attach>, stdin: &str) -> CniOut {
        let bin = self.cni_bin_dir().join("md");
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host_ns()))
            .arg("--")
            .arg(&bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_PATH", self.cni_bin_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cmd) = command {
            c.env("CNI_COMMAND", cmd);
        }
        if let Some(a) = a {
            c.env("CNI_CONTAINERID", a.container_id)
                .env("CNI_NETNS", a.netns)
                .env("CNI_IFNAME", a.ifname)
                .env("CNI_ARGS", a.args);
        }
        run_with_stdin(&mut c, stdin)
    }

    /// Runs one of Debian's reference plugins (`/usr/lib/cni/<plugin>`) the same way.
    pub fn cni_reference(&self, plugin: &str, command: &str, a: &Attach, conf: &Value) -> CniOut {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host_ns()))
            .arg("--")
            .arg(Path::new(REFERENCE_PLUGINS).join(plugin))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", a.container_id)
            .env("CNI_NETNS", a.netns)
            .env("CNI_IFNAME", a.ifname)
            .env("CNI_ARGS", a.args)
            .env("CNI_PATH", REFERENCE_PLUGINS);
        run_with_stdin(&mut c, &conf.to_string())
    }

    /// Runs the plugin with a JSON configuration.
    pub fn cni(&self, command: &str, a: Option<&Attach>, conf: &Value) -> CniOut {
        self.cni_raw(Some(command), a, &conf.to_string())
    }
}

/// Runs `c` feeding `stdin`, within [`MD_TIMEOUT`].
pub fn run_with_stdin(c: &mut Command, stdin: &str) -> CniOut {
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("spawning {c:?}: {e}"));
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin.as_bytes());
    }
    let deadline = std::time::Instant::now() + MD_TIMEOUT;
    loop {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("plugin output");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let json = if stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}):\n{}", show_output(&out)))
    };
    CniOut {
        success: out.status.success(),
        json,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

/// The configuration a runtime passes on DEL and CHECK: the plugin's own entry with the ADD's
/// result as `prevResult`.
pub fn with_prev(conf: &Value, result: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = result.clone();
    c
}
