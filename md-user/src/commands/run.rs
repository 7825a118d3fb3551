//! `md-user run`: the container's network namespace, its interface on the bridge, its ports,
//! then CMD. Foreground runs supervise CMD themselves; `-d` re-executes md-user as a detached
//! supervisor (Podman's conmon is the model) and returns once the network is ready.

use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use super::{exec::exit_code, reconcile, runtime, Ctx};
use crate::{
    cli::RunArgs,
    endpoint,
    error::{one_line, require_privileges},
    host,
    ipam::mac_for,
    netlink::Netlink,
    netns::{Netns, PreExec},
    portmap::{self, PortMapping},
    proc,
    state::{Container, Interface, Locked, Status, DEFAULT_NETWORK},
};

pub fn run(ctx: &Ctx, args: RunArgs) -> Result<ExitCode> {
    // Everything that can be refused is refused before anything is created.
    let ports = portmap::parse_all(&args.publish)?;
    let name = match &args.name {
        Some(n) => {
            validate_name(n)?;
            n.clone()
        }
        None => generate_name(),
    };
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
    runtime()?.block_on(supervise(ctx, &args, name, ports, program, ready))
}

fn validate_name(n: &str) -> Result<()> {
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

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32);
    }
    u64::from_ne_bytes(b)
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
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let o = &ctx.opts;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg("--state-dir")
        .arg(&o.state_dir)
        .arg("--pin-dir")
        .arg(&o.pin_dir)
        .arg("--bridge")
        .arg(&o.bridge)
        .arg("--subnet")
        .arg(&o.subnet);
    if let Some(u) = &o.uplink {
        cmd.arg("--uplink").arg(u);
    }
    cmd.arg("run").arg("--name").arg(name);
    for p in &args.publish {
        cmd.arg("-p").arg(p);
    }
    cmd.arg("--ready-fd").arg(wr.as_raw_fd().to_string());
    cmd.arg("--").args(&args.cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let wfd = wr.as_raw_fd();
    unsafe {
        cmd.pre_exec(move || {
            // Its own session: the supervisor outlives this command and its terminal.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(wfd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the supervisor")?;
    drop(wr);
    let mut msg = String::new();
    File::from(rd).read_to_string(&mut msg)?;
    match msg.strip_prefix("ok") {
        Some(_) => {
            println!("{name}");
            // The supervisor is reparented to init when we exit; nothing to reap later.
            std::mem::forget(child);
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let _ = child.wait();
            let msg = msg.trim();
            if msg.is_empty() {
                bail!("the supervisor of {name} exited before the network was ready");
            }
            bail!("{msg}")
        }
    }
}

/// Setup, CMD, wait, teardown. Runs in the foreground md-user or the detached supervisor.
async fn supervise(
    ctx: &Ctx,
    args: &RunArgs,
    name: String,
    ports: Vec<PortMapping>,
    program: PathBuf,
    ready: Option<ReadyPipe>,
) -> Result<ExitCode> {
    let nl = Netlink::connect()?;
    // Registered before CMD exists so a signal can't slip between spawn and wait.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut child = match start(ctx, &nl, args, &name, &ports, &program).await {
        Ok(child) => child,
        Err(e) => {
            if let Some(r) = ready {
                r.send(&one_line(&e));
            }
            return Err(e);
        }
    };
    if let Some(r) = ready {
        r.send("ok");
    }
    let pid = child.id().unwrap_or(0) as i32;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st?,
            _ = sigint.recv() => unsafe { libc::kill(pid, libc::SIGINT); },
            _ = sigterm.recv() => unsafe { libc::kill(pid, libc::SIGTERM); },
        }
    };
    let mut locked = ctx.state_dir.lock()?;
    if let Some(c) = locked.state.containers.remove(&name) {
        for e in endpoint::teardown(&nl, &ctx.dp, &c).await {
            eprintln!("md-user: tearing down {name}: {}", one_line(&e));
        }
        locked.state.prune_identities();
        locked.save()?;
    }
    Ok(exit_code(status))
}

/// Creates the container's network and starts CMD, under the state lock. On any failure
/// everything created so far is removed again.
async fn start(
    ctx: &Ctx,
    nl: &Netlink,
    args: &RunArgs,
    name: &str,
    ports: &[PortMapping],
    program: &Path,
) -> Result<tokio::process::Child> {
    let mut locked = ctx.state_dir.lock()?;
    if !reconcile(ctx, nl, &mut locked.state).await.is_empty() {
        locked.save()?;
    }
    let state = &mut locked.state;
    if state.containers.contains_key(name) {
        bail!("container name {name} is already in use");
    }
    for c in state.containers.values() {
        for p in ports {
            if let Some(q) = c.ports.iter().find(|q| q.conflicts_with(p)) {
                bail!(
                    "port {p} is already published by container {} ({q})",
                    c.name
                );
            }
        }
    }
    host::ensure_default_network(state, &ctx.opts)?;
    host::ensure_datapath(nl, &ctx.dp, state, &ctx.opts).await?;
    let net = state.networks[DEFAULT_NETWORK].clone();
    let bridge_ifindex = host::ensure_bridge(nl, &ctx.dp, &net).await?;

    let ip = net.subnet.allocate(&state.used_ips(DEFAULT_NETWORK))?;
    let id = format!("{:012x}", random_u64() & 0xffff_ffff_ffff);
    let identity = state.identity_for(name);
    let (supervisor_pid, supervisor_start) = proc::self_identity();
    let container = Container {
        name: name.to_string(),
        id: id.clone(),
        hostname: name.to_string(),
        interfaces: vec![Interface {
            network: DEFAULT_NETWORK.to_string(),
            ip,
            mac: mac_for(ip),
            veth: format!("md{}", &id[..8]),
            ifindex: 0,
            name: "eth0".to_string(),
        }],
        ports: ports.to_vec(),
        cmd: args.cmd.clone(),
        pid: 0,
        pid_start: 0,
        supervisor_pid,
        supervisor_start,
        status: Status::Creating,
        detached: args.ready_fd.is_some(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    };
    // Recorded before anything exists, so a crash mid-setup is reclaimed by the next command.
    state.containers.insert(name.to_string(), container.clone());
    locked.save()?;

    match create(
        ctx,
        nl,
        &mut locked,
        &container,
        bridge_ifindex,
        identity,
        program,
    )
    .await
    {
        Ok(child) => Ok(child),
        Err(e) => {
            let c = locked.state.containers.remove(name).unwrap_or(container);
            for te in endpoint::teardown(nl, &ctx.dp, &c).await {
                eprintln!("md-user: cleaning up {name}: {}", one_line(&te));
            }
            locked.state.prune_identities();
            locked.save()?;
            Err(e)
        }
    }
}

async fn create(
    ctx: &Ctx,
    nl: &Netlink,
    locked: &mut Locked,
    container: &Container,
    bridge_ifindex: u32,
    identity: u32,
    program: &Path,
) -> Result<tokio::process::Child> {
    let name = &container.name;
    let net = locked.state.networks[DEFAULT_NETWORK].clone();
    let netns = Netns::create()?;
    let iface = &container.interfaces[0];
    let ifindex =
        endpoint::setup(nl, &ctx.dp, &netns, &net, bridge_ifindex, iface, identity).await?;
    if let Some(c) = locked.state.containers.get_mut(name) {
        c.interfaces[0].ifindex = ifindex;
    }
    locked.save()?;
    endpoint::publish(&ctx.dp, &locked.state.containers[name], identity)?;

    let mut cmd = tokio::process::Command::new(program);
    cmd.arg0(&container.cmd[0]).args(&container.cmd[1..]);
    if container.detached {
        let log = ctx.state_dir.log_file(name);
        fs::create_dir_all(log.parent().expect("log dir"))?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
    }
    let pre = PreExec {
        netns: netns.raw_fd(),
        join_uts: None,
        hostname: Some(CString::new(container.hostname.clone())?),
    };
    unsafe {
        cmd.pre_exec(move || pre.apply());
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", container.cmd[0]))?;
    let pid = child.id().context("CMD exited at once")?;
    if let Some(c) = locked.state.containers.get_mut(name) {
        c.pid = pid;
        c.pid_start = proc::start_time(pid).unwrap_or(0);
        c.status = Status::Running;
    }
    locked.save()?;
    // `netns` can go: CMD now holds the namespace.
    Ok(child)
}
