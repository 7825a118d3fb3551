//! `cargo xtask bench-tool ...`: the load generator and servers the benchmark runs inside the
//! lab's namespaces (std only, one binary, the same for every datapath).
//!
//! - `serve --echo P [--iperf Q]`: TCP echo server (a pool of threads blocking in accept, each
//!   echoing one connection at a time), optionally with `iperf3 -s -p Q` as a child.
//! - `rr --addr A --secs S`: one connection, SIZE-byte request/response ping-pong.
//! - `crr --addr A --secs S`: connect, one request/response, the server closes, the client
//!   closes, as fast as possible.
//! - `wait-ok --addr A`: prints `ready`, then tries an exchange every INTERVAL until one works.
//! - `wait-fail --addr A`: waits for a first working exchange, prints `ready`, then probes with
//!   new connections until one fails.
//!
//! Each client prints one JSON object on its last line; times are CLOCK_MONOTONIC ns, the same
//! clock in every namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::stats::percentile;
use super::sys::mono_ns;

#[derive(Debug, clap::Args)]
pub struct ToolArgs {
    /// Pin this process (and the threads and children it starts) to one CPU.
    #[arg(long, global = true)]
    cpu: Option<usize>,
    #[command(subcommand)]
    cmd: ToolCmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum ToolCmd {
    /// TCP echo server.
    Serve {
        #[arg(long)]
        echo: u16,
        /// Also run `iperf3 -s -p PORT` until this server exits.
        #[arg(long)]
        iperf: Option<u16>,
        #[arg(long, default_value_t = 16)]
        workers: usize,
    },
    /// Request/response over one connection.
    Rr {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// New connections: connect, one request/response, close.
    Crr {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Probe until an exchange succeeds.
    WaitOk {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 20_000)]
        timeout_ms: u64,
        #[arg(long, default_value_t = 500)]
        interval_us: u64,
        /// Only connect (for servers that do not echo, like iperf3).
        #[arg(long)]
        connect_only: bool,
    },
    /// Probe (new connections) until an exchange fails.
    WaitFail {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 20_000)]
        timeout_ms: u64,
        /// A connection attempt that takes longer than this counts as failed.
        #[arg(long, default_value_t = 20)]
        attempt_ms: u64,
        #[arg(long, default_value_t = 200)]
        interval_us: u64,
    },
}

fn pin(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks nothing, so check `cpu` first.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            bail!("cpu {cpu} out of range");
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

pub fn run(args: ToolArgs) -> Result<()> {
    if let Some(cpu) = args.cpu {
        pin(cpu)?;
    }
    match args.cmd {
        ToolCmd::Serve {
            echo,
            iperf,
            workers,
        } => serve(echo, iperf, workers),
        ToolCmd::Rr { addr, secs, size } => rr(addr, secs, size),
        ToolCmd::Crr { addr, secs, size } => crr(addr, secs, size),
        ToolCmd::WaitOk {
            addr,
            timeout_ms,
            interval_us,
            connect_only,
        } => wait_ok(addr, timeout_ms, interval_us, connect_only),
        ToolCmd::WaitFail {
            addr,
            timeout_ms,
            attempt_ms,
            interval_us,
        } => wait_fail(addr, timeout_ms, attempt_ms, interval_us),
    }
}

fn serve(port: u16, iperf: Option<u16>, workers: usize) -> Result<()> {
    let _iperf = match iperf {
        Some(p) => {
            let mut c = std::process::Command::new("iperf3");
            c.args(["-s", "-p", &p.to_string()])
                .stdout(std::process::Stdio::null());
            // SAFETY: prctl is async-signal-safe; iperf3 dies with this server.
            unsafe {
                use std::os::unix::process::CommandExt;
                c.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            Some(c.spawn().context("starting iperf3 -s")?)
        }
        None => None,
    };
    // Both families on one socket (the IPv6 scenario); IPv4 alone where IPv6 is off.
    let l = TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .with_context(|| format!("bind :{port}"))?;
    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        let l = l.try_clone()?;
        handles.push(std::thread::spawn(move || loop {
            if let Ok((s, _)) = l.accept() {
                let _ = echo(s);
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// First byte of a request that asks the server to close after its reply (new-connection
/// runs): the server closes first, as an HTTP/1.0 server would, so TIME_WAIT stays on the
/// server side and the client's ephemeral ports never run out mid-run.
const CLOSE_AFTER_REPLY: u8 = b'C';

fn echo(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = [0u8; 16 * 1024];
    let mut first = true;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n])?;
        if first && buf[0] == CLOSE_AFTER_REPLY {
            return Ok(());
        }
        first = false;
    }
}

fn exchange(s: &mut TcpStream, msg: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    s.read_exact(&mut buf[..msg.len()])
}

fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

fn latency_json(kind: &str, n: u64, errors: u64, elapsed: Duration, lat: &mut [u64]) -> String {
    lat.sort_unstable();
    json!({
        "kind": kind,
        "n": n,
        "errors": errors,
        "secs": elapsed.as_secs_f64(),
        "rate": n as f64 / elapsed.as_secs_f64(),
        "p50_us": percentile(lat, 50.0) as f64 / 1e3,
        "p99_us": percentile(lat, 99.0) as f64 / 1e3,
    })
    .to_string()
}

fn rr(addr: SocketAddr, secs: f64, size: usize) -> Result<()> {
    let mut s = connect(addr, Duration::from_secs(2)).with_context(|| format!("connect {addr}"))?;
    let msg = vec![0x5au8; size];
    let mut buf = vec![0u8; size];
    // Warm-up: caches, conntrack entry, ARP.
    for _ in 0..50 {
        exchange(&mut s, &msg, &mut buf)?;
    }
    let mut lat: Vec<u64> = Vec::with_capacity(200_000);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        exchange(&mut s, &msg, &mut buf).context("exchange")?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let n = lat.len() as u64;
    println!("{}", latency_json("rr", n, 0, start.elapsed(), &mut lat));
    Ok(())
}

fn crr(addr: SocketAddr, secs: f64, size: usize) -> Result<()> {
    let mut msg = vec![0x5au8; size.max(1)];
    msg[0] = CLOSE_AFTER_REPLY;
    let size = msg.len();
    let mut buf = vec![0u8; size];
    let mut lat: Vec<u64> = Vec::with_capacity(100_000);
    let mut errors = 0u64;
    let mut first_error = None;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        let r = connect(addr, Duration::from_secs(1)).and_then(|mut s| {
            exchange(&mut s, &msg, &mut buf)?;
            // Wait for the server's FIN, then close: no TIME_WAIT on this side.
            match s.read(&mut buf)? {
                0 => Ok(()),
                _ => Err(std::io::Error::other("server sent more than the reply")),
            }
        });
        match r {
            Ok(()) => lat.push(t.elapsed().as_nanos() as u64),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let n = lat.len() as u64;
    if errors > n / 20 + 2 {
        bail!(
            "{errors} of {} connections failed (first: {})",
            n + errors,
            first_error.unwrap_or_default()
        );
    }
    println!(
        "{}",
        latency_json("crr", n, errors, start.elapsed(), &mut lat)
    );
    Ok(())
}

fn probe_once(addr: SocketAddr, timeout: Duration) -> bool {
    let mut buf = [0u8; 8];
    connect(addr, timeout)
        .and_then(|mut s| {
            s.set_read_timeout(Some(timeout))?;
            exchange(&mut s, b"probe!!!", &mut buf)
        })
        .is_ok()
}

fn wait_ok(addr: SocketAddr, timeout_ms: u64, interval_us: u64, connect_only: bool) -> Result<()> {
    println!("ready");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let mut attempts = 0u64;
    while Instant::now() < deadline {
        let t = mono_ns();
        attempts += 1;
        let ok = if connect_only {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        } else {
            probe_once(addr, Duration::from_millis(200))
        };
        if ok {
            let done = mono_ns();
            println!(
                "{}",
                json!({"attempt_ns": t, "ok_ns": done, "attempts": attempts})
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(interval_us));
    }
    bail!("{addr} did not answer within {timeout_ms} ms ({attempts} attempts)")
}

fn wait_fail(addr: SocketAddr, timeout_ms: u64, attempt_ms: u64, interval_us: u64) -> Result<()> {
    let attempt = Duration::from_millis(attempt_ms);
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    while !probe_once(addr, attempt) {
        if Instant::now() >= deadline {
            bail!("{addr} never answered before the change");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut last_ok = mono_ns();
    let mut attempts = 0u64;
    while Instant::now() < deadline {
        let t = mono_ns();
        attempts += 1;
        if !probe_once(addr, attempt) {
            println!(
                "{}",
                json!({"fail_ns": t, "last_ok_ns": last_ok, "attempts": attempts})
            );
            return Ok(());
        }
        last_ok = t;
        std::thread::sleep(Duration::from_micros(interval_us));
    }
    bail!("{addr} kept answering for {timeout_ms} ms ({attempts} attempts)")
}
