//! `cargo xtask install`: md-user on PATH with its shell completions, man pages and systemd
//! unit, as a package would lay them out under PREFIX (`/usr/local` by default), optionally
//! staged under DESTDIR (what packagers and the tests use: nothing outside it is touched).
//!
//! The completions and man pages are generated from md-user's CLI definition by the binary
//! being installed (`md-user completion SHELL`, `md-user __man DIR`: clap_complete and
//! clap_mangen), so they always match it.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::util;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Where md-user lives once installed (bin/, share/, lib/systemd/ under it).
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Stage everything under this directory instead of / (packaging, tests).
    #[arg(long)]
    pub destdir: Option<PathBuf>,
    /// Install this md-user binary instead of building one (release, eBPF object embedded).
    #[arg(long)]
    pub bin: Option<PathBuf>,
}

/// Where each installed file goes, relative to the filesystem root (DESTDIR not included).
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    pub bin: PathBuf,
    pub bash: PathBuf,
    pub zsh: PathBuf,
    pub fish: PathBuf,
    pub man1: PathBuf,
    pub units: PathBuf,
}

impl Layout {
    pub fn new(prefix: &Path) -> Layout {
        let share = prefix.join("share");
        Layout {
            bin: prefix.join("bin/md-user"),
            bash: share.join("bash-completion/completions/md-user"),
            zsh: share.join("zsh/site-functions/_md-user"),
            fish: share.join("fish/vendor_completions.d/md-user.fish"),
            man1: share.join("man/man1"),
            // systemd looks in /usr/lib/systemd/system and /usr/local/lib/systemd/system.
            units: prefix.join("lib/systemd/system"),
        }
    }
}

/// `path` under `destdir` (a root-relative path staged there), or `path` itself.
pub fn staged(destdir: Option<&Path>, path: &Path) -> PathBuf {
    match destdir {
        Some(d) => d.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_path_buf(),
    }
}

/// A unit file with md-user's path as installed (the repository's says /usr/local/bin).
pub fn unit_for(text: &str, bin: &Path) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("ExecStart=") {
            Some(cmd) => {
                let args = cmd.split_once(' ').map(|(_, a)| a).unwrap_or("");
                format!("ExecStart={} {args}", bin.display())
                    .trim_end()
                    .to_string()
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    println!("  {}", path.display());
    Ok(())
}

/// What `md-user ARGS` prints (generation commands only: they touch nothing).
fn generated(bin: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = util::command(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {} {}", bin.display(), args.join(" ")))?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!(
            "{} {} failed: {}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

pub fn run(opts: &Options) -> Result<()> {
    if !opts.prefix.is_absolute() {
        bail!("--prefix must be an absolute path");
    }
    let bin = match &opts.bin {
        Some(b) => b.clone(),
        None => {
            crate::build_ebpf::run()?;
            util::run(util::host_cargo().args(["build", "--release", "-p", "md-user"]))?;
            util::host_target_dir().join("release/md-user")
        }
    };
    if !bin.is_file() {
        bail!("{} is not a file", bin.display());
    }
    let layout = Layout::new(&opts.prefix);
    let dest = opts.destdir.as_deref();
    let at = |p: &Path| staged(dest, p);
    println!("installing md-user ({}):", bin.display());
    let bytes = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    write(&at(&layout.bin), &bytes, 0o755)?;
    for (shell, path) in [
        ("bash", &layout.bash),
        ("zsh", &layout.zsh),
        ("fish", &layout.fish),
    ] {
        write(&at(path), &generated(&bin, &["completion", shell])?, 0o644)?;
    }
    let pages = tempdir()?;
    let made = generated_man(&bin, &pages);
    let result = made.and_then(|()| {
        let mut names: Vec<PathBuf> = fs::read_dir(&pages)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        for page in names {
            let name = page.file_name().context("a page name")?;
            write(&at(&layout.man1).join(name), &fs::read(&page)?, 0o644)?;
        }
        Ok(())
    });
    let _ = fs::remove_dir_all(&pages);
    result?;
    let units = util::workspace_root().join("md-user/systemd");
    let mut unit_files: Vec<PathBuf> = fs::read_dir(&units)
        .with_context(|| format!("reading {}", units.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    unit_files.sort();
    for u in unit_files {
        let text = fs::read_to_string(&u)?;
        let name = u.file_name().context("a unit name")?;
        write(
            &at(&layout.units).join(name),
            unit_for(&text, &layout.bin).as_bytes(),
            0o644,
        )?;
    }
    if dest.is_none() {
        println!(
            "done: {} is on PATH if {} is; `systemctl daemon-reload` to see the unit",
            layout.bin.display(),
            opts.prefix.join("bin").display()
        );
    }
    Ok(())
}

fn generated_man(bin: &Path, dir: &Path) -> Result<()> {
    let out = util::command(bin)
        .arg("__man")
        .arg(dir)
        .output()
        .with_context(|| format!("running {} __man", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} __man failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("md-install-man-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_under_prefix_and_destdir() {
        let l = Layout::new(Path::new("/usr"));
        assert_eq!(l.bin, Path::new("/usr/bin/md-user"));
        assert_eq!(
            l.bash,
            Path::new("/usr/share/bash-completion/completions/md-user")
        );
        assert_eq!(l.zsh, Path::new("/usr/share/zsh/site-functions/_md-user"));
        assert_eq!(
            l.fish,
            Path::new("/usr/share/fish/vendor_completions.d/md-user.fish")
        );
        assert_eq!(l.man1, Path::new("/usr/share/man/man1"));
        assert_eq!(l.units, Path::new("/usr/lib/systemd/system"));
        assert_eq!(
            staged(Some(Path::new("/tmp/stage")), &l.bin),
            Path::new("/tmp/stage/usr/bin/md-user")
        );
        assert_eq!(staged(None, &l.bin), l.bin);
        let local = Layout::new(Path::new("/usr/local"));
        assert_eq!(local.units, Path::new("/usr/local/lib/systemd/system"));
    }

    #[test]
    fn unit_points_at_the_installed_binary() {
        let text = "[Service]\nExecStart=/usr/local/bin/md-user watch\nRestart=on-failure\n";
        assert_eq!(
            unit_for(text, Path::new("/usr/bin/md-user")),
            "[Service]\nExecStart=/usr/bin/md-user watch\nRestart=on-failure\n"
        );
        // The repository's unit is what gets installed.
        let repo =
            fs::read_to_string(util::workspace_root().join("md-user/systemd/md-watch.service"))
                .unwrap();
        let u = unit_for(&repo, Path::new("/opt/md/bin/md-user"));
        assert!(u.contains("\nExecStart=/opt/md/bin/md-user watch\n"), "{u}");
        assert!(u.contains("[Install]"), "{u}");
    }
}
