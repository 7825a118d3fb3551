//! `md-user run`: the container's namespaces, its interface on a network, its ports, its
//! names, then CMD. Foreground runs supervise CMD themselves; `-d` re-executes md-user as a
//! detached supervisor (Podman's conmon is the model) and returns once the network is ready.

use std::{
    ffi::CString,
    fs::File,
    io::Write,
    os::fd::FromRawFd,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use super::{exec::exit_code, runtime};
use crate::{
    attach::{self, random_u64, Ctx, IfaceSpec, Spec},
    cli::RunArgs,
    dns,
    error::{one_line, require_privileges},
    init,
    netlink::Netlink,
    netns::{Confinement, Netns, PreExec, Uts},
    portmap::{self, PortMapping},
    proc,
    state::{Container, Locked, Status},
};

/// Where a container's network comes from (`--network`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// An interface on an md network (`bridge` or one from `network create`).
    Net(String),
    /// Only loopback.
    None,
    /// The host's network namespace.
    Host,
    /// Another container's network namespace.
    Container(String),
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        Ok(match s {
            "none" => Mode::None,
            "host" => Mode::Host,
            "" => bail!("--network needs a value"),
            _ => match s.strip_prefix("container:") {
                Some("") => bail!("--network container: needs a container name"),
                Some(n) => Mode::Container(n.to_string()),
                None => Mode::Net(s.to_string()),
            },
        })
    }

    /// Refuses flags that make no sense for this mode.
    fn check(&self, ports: &[PortMapping], args: &RunArgs) -> Result<()> {
        let net = &args.network;
        if !matches!(self, Mode::Net(_)) {
            let on_a_network = [
                ("--network-alias", !args.network_alias.is_empty()),
                ("--mac-address", args.mac_address.is_some()),
                ("--dns", !args.dns.is_empty()),
                ("--dns-search", !args.dns_search.is_empty()),
                ("--dns-option", !args.dns_option.is_empty()),
            ];
            if let Some((flag, _)) = on_a_network.iter().find(|(_, given)| *given) {
                bail!("{flag} needs a bridge network, not --network {net}");
            }
        }
        if matches!(self, Mode::Host | Mode::Container(_)) && !args.add_host.is_empty() {
            bail!("--add-host does not apply to --network {net}: /etc/hosts is shared");
        }
        let why = match self {
            Mode::Net(_) => return Ok(()),
            Mode::Host => "--network host uses the host's own ports; -p does not apply",
            Mode::None => "--network none has no network to publish on",
            Mode::Container(_) => {
                "--network container:NAME shares NAME's ports; publish them on NAME"
            }
        };
        if !ports.is_empty() {
            bail!("{why}");
        }
        if args.ip.is_some() || args.ip6.is_some() {
            bail!(
                "--ip needs a bridge network, not --network {}",
                args.network
            );
        }
        if args.hostname.is_some() && matches!(self, Mode::Host | Mode::Container(_)) {
            bail!(
                "--hostname does not apply to --network {}: the hostname is shared",
                args.network
            );
        }
        Ok(())
    }
}

pub fn run(ctx: &Ctx, args: RunArgs) -> Result<ExitCode> {
    // Everything that can be refused is refused before anything is created.
    let mut ports = portmap::parse_all(&args.publish)?;
    let mut exposed = Vec::new();
    for e in &args.expose {
        for p in portmap::parse_expose(e)? {
            if !exposed.contains(&p) {
                exposed.push(p);
            }
        }
    }
    if args.publish_all {
        portmap::publish_all(&exposed, &mut ports);
    }
    let mode = Mode::parse(&args.network)?;
    mode.check(&ports, &args)?;
    for a in &args.network_alias {
        validate_hostname(a).with_context(|| format!("--network-alias {a:?}"))?;
    }
    let extra_hosts = args
        .add_host
        .iter()
        .map(|h| dns::parse_add_host(h))
        .collect::<Result<Vec<_>>>()?;
    let dns_request = dns::DnsRequest::parse(&args.dns, &args.dns_search, &args.dns_option)?;
    let mac = args
        .mac_address
        .as_deref()
        .map(crate::ipam::parse_mac)
        .transpose()?;
    let name = match &args.name {
        Some(n) => {
            validate_name(n)?;
            n.clone()
        }
        None => generate_name(),
    };
    if let Some(h) = &args.hostname {
        validate_hostname(h)?;
    }
    let program = resolve_program(&args.cmd[0])?;
    require_privileges()?;
    if args.detach {
        return detach(ctx, &args, &name);
    }
    let ready = args.ready_fd.map(|fd| {
        // Not inherited by CMD, or the caller would wait for CMD's exit to see EOF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        ReadyPipe(unsafe { File::from_raw_fd(fd) })
    });
    runtime()?.block_on(supervise(
        ctx,
        &args,
        Setup {
            name,
            mode,
            ports,
            program,
            exposed,
            extra_hosts,
            dns: dns_request,
            mac,
        },
        ready,
    ))
}

pub fn validate_hostname(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !h.starts_with('-');
    if !ok {
        bail!("invalid hostname {h:?}");
    }
    Ok(())
}

pub fn validate_name(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        bail!("invalid container name {n:?}: use letters, digits, '_', '.', '-' (max 63)");
    }
    Ok(())
}

fn generate_name() -> String {
    const ADJ: &[&str] = &[
        "brave", "calm", "eager", "fond", "keen", "lucid", "merry", "nimble", "proud", "quiet",
        "swift", "witty",
    ];
    const NOUN: &[&str] = &[
        "otter", "heron", "lynx", "panda", "raven", "tapir", "viper", "yak", "gecko", "ibis",
        "koala", "mole",
    ];
    let r = random_u64();
    format!(
        "{}_{}_{:04x}",
        ADJ[(r % ADJ.len() as u64) as usize],
        NOUN[((r >> 8) % NOUN.len() as u64) as usize],
        (r >> 16) & 0xffff
    )
}

/// Finds CMD like execvp would, so "not found" is reported before anything is created.
fn resolve_program(cmd: &str) -> Result<PathBuf> {
    let executable = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
            .is_ok_and(|c| p.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0)
    };
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        if executable(&p) {
            return Ok(p);
        }
        bail!("command not found: {cmd}");
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| executable(p))
        .with_context(|| format!("command not found: {cmd}"))
}

/// The supervisor's end of the readiness pipe of a detached run.
struct ReadyPipe(File);

impl ReadyPipe {
    fn send(mut self, msg: &str) {
        let _ = self.0.write_all(msg.as_bytes());
    }
}

/// Starts the supervisor (md-user again, in its own session) and waits until it reports the
/// network ready or fails.
fn detach(ctx: &Ctx, args: &RunArgs, name: &str) -> Result<ExitCode> {
    let mut cmd = ctx.opts.self_command();
    cmd.arg("run").arg("--name").arg(name);
    for p in &args.publish {
        cmd.arg("-p").arg(p);
    }
    cmd.arg("--network").arg(&args.network);
    if let Some(h) = &args.hostname {
        cmd.arg("--hostname").arg(h);
    }
    if let Some(ip) = &args.ip {
        cmd.arg("--ip").arg(ip.to_string());
    }
    if let Some(ip) = &args.ip6 {
        cmd.arg("--ip6").arg(ip.to_string());
    }
    if args.privileged {
        cmd.arg("--privileged");
    }
    if args.publish_all {
        cmd.arg("-P");
    }
    for (flag, values) in [
        ("--expose", &args.expose),
        ("--network-alias", &args.network_alias),
        ("--add-host", &args.add_host),
        ("--dns", &args.dns),
        ("--dns-search", &args.dns_search),
        ("--dns-option", &args.dns_option),
    ] {
        for v in values {
            cmd.arg(format!("{flag}={v}"));
        }
    }
    if let Some(m) = &args.mac_address {
        cmd.arg("--mac-address").arg(m);
    }
    let (mut child, msg) = proc::spawn_with_ready_pipe(cmd, |cmd, fd| {
        cmd.arg("--ready-fd")
            .arg(fd.to_string())
            .arg("--")
            .args(&args.cmd);
    })
    .context("starting the supervisor")?;
    if msg.starts_with("ok") {
        println!("{name}");
        // The supervisor is reparented to init when we exit; nothing to reap later.
        std::mem::forget(child);
        return Ok(ExitCode::SUCCESS);
    }
    let _ = child.wait();
    let msg = msg.trim();
    if msg.is_empty() {
        bail!("the supervisor of {name} exited before the network was ready");
    }
    bail!("{msg}")
}

/// What `run` was asked for, validated.
struct Setup {
    name: String,
    mode: Mode,
    ports: Vec<PortMapping>,
    program: PathBuf,
    exposed: Vec<(u16, portmap::Proto)>,
    extra_hosts: Vec<(String, dns::HostAddr)>,
    dns: dns::DnsRequest,
    mac: Option<[u8; 6]>,
}

/// Setup, CMD, wait, teardown. Runs in the foreground md-user or the detached supervisor.
async fn supervise(
    ctx: &Ctx,
    args: &RunArgs,
    setup: Setup,
    ready: Option<ReadyPipe>,
) -> Result<ExitCode> {
    let nl = Netlink::connect()?;
    // Registered before CMD exists so a signal can't slip between spawn and wait.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let (mut child, netns, mut locked) = match start(ctx, &nl, args, &setup).await {
        Ok(started) => started,
        Err(e) => {
            if let Some(r) = ready {
                r.send(&one_line(&e));
            }
            return Err(e);
        }
    };
    if let Some(r) = ready {
        crate::timing::mark("ready");
        r.send("ok");
    }
    // The container is up: now the peers' hosts files and the rest of the dead, then the
    // lock goes to whoever waits for it.
    if let Err(e) = attach::settle(ctx, &nl, &mut locked, &setup.name).await {
        eprintln!("md-user: {}", one_line(&e));
    }
    drop(locked);
    let pid = child.id().unwrap_or(0) as i32;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st?,
            _ = sigint.recv() => unsafe { libc::kill(pid, libc::SIGINT); },
            _ = sigterm.recv() => unsafe { libc::kill(pid, libc::SIGTERM); },
        }
    };
    // The container is over when CMD is: what it left running in its own namespace goes too
    // (as in Docker, where the whole container stops).
    if let Some(ns) = &netns {
        proc::kill_namespace_members(ns);
    }
    drop(netns);
    let mut locked = ctx.state_dir.lock()?;
    // Only our own record: after a `down` the name may already belong to a new container.
    let me = proc::self_identity();
    let ours = locked
        .state
        .containers
        .get(&setup.name)
        .is_some_and(|c| (c.supervisor_pid, c.supervisor_start) == me);
    if ours {
        let c = locked
            .state
            .containers
            .remove(&setup.name)
            .expect("checked");
        attach::detach(ctx, &nl, &mut locked.state, &c).await;
        locked.save()?;
    }
    Ok(exit_code(status))
}

/// Creates the container's network (through the core, under the state lock) and starts CMD.
/// On any failure everything created so far is removed again. Returns with the lock held:
/// [`attach::settle`] is left to do.
async fn start(
    ctx: &Ctx,
    nl: &Netlink,
    args: &RunArgs,
    setup: &Setup,
) -> Result<(tokio::process::Child, Option<Netns>, Locked)> {
    // Only the dead in this container's way are reclaimed before it is up.
    let mut locked = attach::lock_reclaiming(ctx, nl, |c| {
        c.name == setup.name
            || matches!(&setup.mode, Mode::Container(o) if *o == c.name)
            || c.ports
                .iter()
                .any(|q| setup.ports.iter().any(|p| q.conflicts_with(p)))
            || c.interfaces.iter().any(|i| {
                args.ip == Some(i.ip)
                    || (args.ip6.is_some() && args.ip6 == i.ip6)
                    || setup.mac == Some(i.mac)
            })
    })
    .await?;
    let state = &locked.state;
    let netns = match &setup.mode {
        Mode::Net(_) | Mode::None => Some(Netns::create()?),
        Mode::Container(other) => match state.containers.get(other) {
            Some(o) if o.status == Status::Running && proc::alive(o.pid, o.pid_start) => {
                Some(Netns::of_pid(o.pid)?)
            }
            Some(_) => bail!("container {other} is not running"),
            None => bail!("no such container: {other}"),
        },
        Mode::Host => None,
    };
    let spec = Spec {
        name: setup.name.clone(),
        hostname: args.hostname.clone().unwrap_or_else(|| setup.name.clone()),
        mode: args.network.clone(),
        iface: match &setup.mode {
            Mode::Net(net) => Some(IfaceSpec {
                network: net.clone(),
                ip: args.ip,
                ip6: args.ip6,
                mac: setup.mac,
                name: "eth0".to_string(),
                reserved: false,
                handover: false,
                aliases: args.network_alias.clone(),
            }),
            _ => None,
        },
        ports: setup.ports.clone(),
        cmd: args.cmd.clone(),
        detached: args.ready_fd.is_some(),
        cni: None,
        privileged: args.privileged,
        docker: None,
        dns: setup.dns.clone(),
        extra_hosts: setup.extra_hosts.clone(),
        exposed: setup.exposed.clone(),
    };
    let container =
        match attach::create_quietly(ctx, nl, &mut locked, spec.clone(), netns.as_ref()).await {
            Ok(c) => c,
            // Perhaps the dead not looked at hold what it needs (the last free address): reclaim
            // them all and try once more.
            Err(e) => {
                if attach::reconcile(ctx, nl, &mut locked.state)
                    .await
                    .is_empty()
                {
                    return Err(e);
                }
                locked.save()?;
                attach::create_quietly(ctx, nl, &mut locked, spec, netns.as_ref()).await?
            }
        };
    match spawn(ctx, &mut locked, setup, &container, netns.as_ref()) {
        // Kept for the container's life when it is its own, so its leftovers can be found.
        Ok(child) => Ok((
            child,
            netns.filter(|_| matches!(setup.mode, Mode::Net(_) | Mode::None)),
            locked,
        )),
        Err(e) => {
            attach::discard(ctx, nl, &mut locked, &setup.name).await?;
            Err(e)
        }
    }
}

/// Starts CMD in the container's namespaces with its hosts and resolv.conf files, and records
/// it as running.
fn spawn(
    ctx: &Ctx,
    locked: &mut Locked,
    setup: &Setup,
    container: &Container,
    netns: Option<&Netns>,
) -> Result<tokio::process::Child> {
    let name = setup.name.as_str();
    let cstr = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    let (hosts, resolv) = dns::files(&ctx.state_dir, name);
    let mut binds = Vec::new();
    let uts = match &setup.mode {
        Mode::Net(_) => {
            binds.push((cstr(&hosts), c"/etc/hosts".to_owned()));
            binds.push((cstr(&resolv), c"/etc/resolv.conf".to_owned()));
            Uts::New(CString::new(container.hostname.clone())?)
        }
        Mode::None => {
            let netns = netns.context("no network namespace")?;
            crate::netlink::configure_container_side(netns, None, None)?;
            binds.push((cstr(&hosts), c"/etc/hosts".to_owned()));
            Uts::New(CString::new(container.hostname.clone())?)
        }
        Mode::Host => Uts::Inherit,
        Mode::Container(other) => {
            let o = &locked.state.containers[other];
            let uts = File::open(format!("/proc/{}/ns/uts", o.pid))
                .with_context(|| format!("opening {other}'s UTS namespace"))?;
            let (oh, or) = dns::files(&ctx.state_dir, other);
            binds.push((cstr(&oh), c"/etc/hosts".to_owned()));
            if or.exists() {
                binds.push((cstr(&or), c"/etc/resolv.conf".to_owned()));
            }
            // Leaked on purpose: the fd must outlive the fork below; the process is short of
            // nothing but one descriptor.
            let fd = std::os::fd::IntoRawFd::into_raw_fd(uts);
            Uts::Join(fd)
        }
    };

    let log = if container.detached {
        Some(ctx.state_dir.create_log(name)?)
    } else {
        None
    };
    let pre = PreExec {
        netns: netns.map(|n| n.raw_fd()),
        uts,
        binds,
        parent: std::process::id() as i32,
        confine: (!container.privileged).then(Confinement::docker_default),
    };
    let (child, pid) = init::spawn(&setup.program, &container.cmd, log, pre)?;
    crate::timing::mark("spawned");
    if let Some(c) = locked.state.containers.get_mut(name) {
        c.pid = pid;
        c.pid_start = proc::start_time(pid).unwrap_or(0);
        c.status = Status::Running;
    }
    locked.save()?;
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_modes() {
        assert_eq!(Mode::parse("bridge").unwrap(), Mode::Net("bridge".into()));
        assert_eq!(Mode::parse("back").unwrap(), Mode::Net("back".into()));
        assert_eq!(Mode::parse("none").unwrap(), Mode::None);
        assert_eq!(Mode::parse("host").unwrap(), Mode::Host);
        assert_eq!(
            Mode::parse("container:web").unwrap(),
            Mode::Container("web".into())
        );
        assert!(Mode::parse("container:").is_err());
        assert!(Mode::parse("").is_err());
    }

    #[test]
    fn names_and_hostnames() {
        for ok in ["web", "a", "web-1", "db_2", "x.y", "A9"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-web", "_x", "a/b", "a b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_hostname("my-host.lab").is_ok());
        assert!(validate_hostname("-x").is_err());
        assert!(validate_hostname("a_b").is_err());
        let g = generate_name();
        assert!(validate_name(&g).is_ok(), "{g}");
    }

    #[test]
    fn program_lookup() {
        assert!(resolve_program("sh").is_ok());
        assert!(resolve_program("/bin/sh").is_ok());
        let e = resolve_program("/nonexistent/cmd").unwrap_err().to_string();
        assert_eq!(e, "command not found: /nonexistent/cmd");
        assert!(resolve_program("no-such-command-md").is_err());
    }
}
