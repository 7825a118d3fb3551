//! `cargo xtask install` (issue 18): md-user, its shell completions and man pages generated from
//! the CLI definition, and the systemd unit, laid out under a prefix and staged under a
//! temporary DESTDIR (never the machine's /usr); the installed md-user works from PATH and
//! `--version` names the git revision it was built from.
//!
//! Every md-user and xtask process here runs inside the lab's host namespace.

use std::path::{Path, PathBuf};
use std::process::Command;

use md_tests::process::{run_timeout, show_output};
use md_tests::{md_user_bin, require_e2e, require_tools, stdout_str, Lab, MD_TIMEOUT};

/// The xtask binary: `MD_XTASK_BIN` (what `cargo xtask test` sets), else the workspace's debug
/// build.
fn xtask_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MD_XTASK_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xtask");
    assert!(
        p.is_file(),
        "no xtask binary: set MD_XTASK_BIN or build it (cargo build -p xtask)"
    );
    p
}

/// A command in the lab's host namespace.
fn in_host(lab: &Lab, program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", lab.host_ns()])
        .arg(program)
        .args(args);
    c
}

#[track_caller]
fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

#[test]
fn install_into_a_destdir() {
    if !require_e2e() {
        return;
    }
    require_tools(&["bash", "git", "ip", "python3"]);
    let lab = Lab::new("install");
    let dest = lab.dir().join("destdir");
    let real = ["/usr/bin/md-user", "/usr/share/man/man1/md-user.1"];
    let existed: Vec<bool> = real.iter().map(|p| Path::new(p).exists()).collect();
    let bin = md_user_bin();
    let out = run_timeout(
        &mut in_host(
            &lab,
            &xtask_bin(),
            &[
                "install",
                "--prefix",
                "/usr",
                "--destdir",
                dest.to_str().unwrap(),
                "--bin",
                bin.to_str().unwrap(),
            ],
        ),
        MD_TIMEOUT,
    );
    assert!(out.status.success(), "xtask install\n{}", show_output(&out));
    // Nothing outside DESTDIR.
    for (p, was) in real.iter().zip(&existed) {
        assert_eq!(Path::new(p).exists(), *was, "{p} touched");
    }
    let usr = dest.join("usr");
    let installed = usr.join("bin/md-user");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&bin).unwrap(),
        "the binary installed as is"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&installed).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o755);

    // Completions for three shells, from the CLI definition (new subcommands and flags are in).
    let bash = usr.join("share/bash-completion/completions/md-user");
    let zsh = read(&usr.join("share/zsh/site-functions/_md-user"));
    let fish = read(&usr.join("share/fish/vendor_completions.d/md-user.fish"));
    assert!(
        zsh.starts_with("#compdef md-user"),
        "{}",
        &zsh[..80.min(zsh.len())]
    );
    assert!(fish.contains("complete -c md-user"));
    for (shell, text) in [("bash", read(&bash)), ("zsh", zsh), ("fish", fish)] {
        for word in ["network", "port", "mac-address", "gateway-mode"] {
            assert!(text.contains(word), "{shell} completion lacks {word}");
        }
    }
    // bash loads it and completes a subcommand.
    let script = format!(
        "source {}; COMP_WORDS=(md-user net); COMP_CWORD=1; COMP_LINE='md-user net'; \
         COMP_POINT=11; $(complete -p md-user | sed 's/.*-F \\([^ ]*\\) .*/\\1/') md-user net md-user; \
         echo \"${{COMPREPLY[@]}}\"",
        bash.display()
    );
    let out = run_timeout(Command::new("bash").args(["-c", &script]), MD_TIMEOUT);
    assert!(
        stdout_str(&out).split_whitespace().any(|w| w == "network"),
        "bash completes `md-user net` to network\n{}",
        show_output(&out)
    );

    // Man pages: the command and each subcommand, with their options.
    let man1 = usr.join("share/man/man1");
    let page = read(&man1.join("md-user.1"));
    assert!(
        page.contains(".TH md-user 1"),
        "{}",
        &page[..200.min(page.len())]
    );
    let create = read(&man1.join("md-user-network-create.1"));
    for opt in ["mtu", "internal", "ip\\-range", "gateway\\-mode"] {
        assert!(create.contains(opt), "network create page lacks {opt}");
    }
    assert!(man1.join("md-user-port.1").is_file());
    assert!(man1.join("md-user-run.1").is_file());
    if md_tests::which("man").is_some() {
        let out = run_timeout(
            Command::new("man")
                .args(["-l", "-P", "cat"])
                .arg(man1.join("md-user-run.1"))
                .env("MANWIDTH", "100"),
            MD_TIMEOUT,
        );
        assert!(
            stdout_str(&out).contains("--network-alias"),
            "man renders md-user-run\n{}",
            show_output(&out)
        );
    }

    // The systemd unit, pointing at the installed binary.
    let unit = read(&usr.join("lib/systemd/system/md-watch.service"));
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/usr/bin/md-user watch"),
        "{unit}"
    );
    assert!(unit.contains("[Install]"));

    // On PATH: --version names the revision md-user was built from, and it runs containers.
    let rev = run_timeout(
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR")),
        MD_TIMEOUT,
    );
    let rev = stdout_str(&rev).trim().to_string();
    assert_eq!(rev.len(), 12, "git rev-parse");
    let path = format!(
        "{}:{}",
        usr.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run_timeout(
        in_host(&lab, Path::new("env"), &["md-user", "--version"]).env("PATH", &path),
        MD_TIMEOUT,
    );
    assert_eq!(
        stdout_str(&out).trim(),
        format!("md-user 0.1.0 (git {rev})"),
        "{}",
        show_output(&out)
    );
    let mut run = lab.host_md_cmd(
        "env",
        &[
            "md-user", "run", "-d", "--name", "fromPATH", "--", "sleep", "600",
        ],
    );
    run.env("PATH", &path);
    let out = run_timeout(&mut run, MD_TIMEOUT);
    assert!(out.status.success(), "{}", show_output(&out));
    assert!(lab.ps_names().contains(&"fromPATH".to_string()));
}
