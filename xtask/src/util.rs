//! Small helpers shared by the xtask commands: paths, PATH lookup, running commands.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

/// The workspace root (xtask lives in `<root>/xtask`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// The host target directory: `$CARGO_TARGET_DIR` when set, else `<root>/target`.
pub fn host_target_dir() -> PathBuf {
    let root = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    }
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`): where rustup's proxies and
/// `cargo install`ed tools such as bpf-linker live.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(h).join("bin"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"))
}

/// `$PATH` with the cargo bin directory (and the sbin directories, where
/// Debian puts ip, bpftool, ...) added when missing.
pub fn augmented_path() -> OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(bin) = cargo_bin_dir() {
        if !dirs.contains(&bin) {
            dirs.insert(0, bin);
        }
    }
    for extra in [
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
    ] {
        let extra = PathBuf::from(extra);
        if !dirs.contains(&extra) {
            dirs.push(extra);
        }
    }
    std::env::join_paths(dirs).expect("PATH entries contain no ':'")
}

/// `command -v`: the first executable called `name` on the augmented PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&augmented_path())
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// A command with the augmented PATH.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env("PATH", augmented_path());
    c
}

/// Run a command quietly and return its stdout when it exits 0.
pub fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a command with inherited stdio, echoing it first; fail when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    eprintln!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// A shell-like rendering of a command with the environment it sets.
pub fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if k == "PATH" {
            continue;
        }
        if let Some(v) = v {
            s += &format!("{}={} ", k.to_string_lossy(), quote(&v.to_string_lossy()));
        }
    }
    s += &cmd.get_program().to_string_lossy();
    for a in cmd.get_args() {
        s += " ";
        s += &quote(&a.to_string_lossy());
    }
    s
}

fn quote(a: &str) -> String {
    if a.is_empty() || a.contains([' ', '"', '$', '\'']) {
        format!("'{a}'")
    } else {
        a.to_string()
    }
}

/// The effective uid, from `/proc/self/status` (no libc needed).
pub fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_euid(&status)
}

fn parse_euid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

pub fn is_root() -> bool {
    euid() == Some(0)
}

pub fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists()
}

/// Whether a Debian package is installed (`dpkg -s`).
pub fn dpkg_installed(pkg: &str) -> bool {
    output_of(Command::new("dpkg").args(["-s", pkg]))
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Status:") && l.contains(" installed"))
        })
        .unwrap_or(false)
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// `apt-get update` (once per xtask run) then `apt-get install -y <pkgs>`.
/// Only called when something is missing, so the update is affordable and
/// protects against a fresh machine's stale package lists.
pub fn apt_install(pkgs: &[&str]) -> Result<()> {
    if pkgs.is_empty() {
        return Ok(());
    }
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        run(command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"))?;
    }
    run(command("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y"])
        .args(pkgs))
}

/// The cargo running this xtask (`$CARGO`), for host builds with the same
/// toolchain as the surrounding `cargo xtask`.
/// The packages of `tools` (command, Debian package) whose command `present` says is missing
/// (deduplicated, in order).
pub fn missing_packages(
    tools: &[(&str, &'static str)],
    present: impl Fn(&str) -> bool,
) -> Vec<&'static str> {
    let mut pkgs = Vec::new();
    for &(cmd, pkg) in tools {
        if !present(cmd) && !pkgs.contains(&pkg) {
            pkgs.push(pkg);
        }
    }
    pkgs
}

/// Installs (apt, as root on Debian) the packages of `tools` whose commands are missing;
/// `what` names them in messages.
pub fn ensure_tools(what: &str, tools: &[(&str, &'static str)]) -> Result<()> {
    let missing = missing_packages(tools, |c| which(c).is_some());
    if missing.is_empty() {
        println!("{what}: nothing to install");
        return Ok(());
    }
    if !is_debian() {
        bail!(
            "missing {what}; install these (Debian package names): {}",
            missing.join(" ")
        );
    }
    // `command -v` said missing; install only packages dpkg does not know either
    // (an installed package whose binary is off PATH would not be fixed by apt).
    let to_install: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if to_install.is_empty() {
        bail!(
            "packages {} are installed but their commands are not on PATH",
            missing.join(" ")
        );
    }
    println!("{what}: installing {}", to_install.join(" "));
    apt_install(&to_install)?;
    let still = missing_packages(tools, |c| which(c).is_some());
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

pub fn host_cargo() -> Command {
    let mut c = command(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// `cargo build -p md-user` (debug); returns the absolute path of the binary.
pub fn cargo_host_build_md_user() -> Result<PathBuf> {
    run(host_cargo().args(["build", "-p", "md-user"]))?;
    let bin = host_target_dir().join("debug/md-user");
    if !bin.is_file() {
        bail!("cargo build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euid_is_the_second_uid_field() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\n";
        assert_eq!(parse_euid(status), Some(0));
        assert_eq!(parse_euid("Name:\tx\n"), None);
    }

    #[test]
    fn show_quotes_arguments_with_spaces() {
        let mut c = Command::new("cargo");
        c.env("A", "b c").args(["build", "-C debuginfo=2"]);
        assert_eq!(show(&c), "A='b c' cargo build '-C debuginfo=2'");
    }
}
