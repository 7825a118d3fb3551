//! Load generator and servers of the soak test (tests/soak.rs), run inside the lab's
//! namespaces (std only). Every client stops by itself after `--secs` and prints one JSON
//! object per status line, the last one with its totals.
//!
//! - `tcp-echo PORT`: TCP server that echoes every line, one thread per connection.
//! - `udp-echo PORT COUNT`: UDP servers on PORT..PORT+COUNT that send every datagram back.
//! - `sessions ADDR N INTERVAL_MS SECS`: N long-lived TCP connections, each echoing a line
//!   every INTERVAL_MS; a connection that fails once is counted lost (never reopened).
//! - `churn TCP_ADDR UDP_ADDR UDP_PORTS RATE SECS`: about RATE new flows per second, half TCP
//!   connections (connect, one echo, close), half UDP exchanges from fresh sockets spread over
//!   UDP_PORTS destination ports (one destination alone would run out of NAT ports first).
//! - `syn-flood DST_IP DST_PORT RATE SECS`: RATE SYNs per second from spoofed sources in
//!   198.51.100.0/24 and 203.0.113.0/24 (the lab's outside ranges), random ports; raw socket.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i}: {what}"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("tcp-echo") => tcp_echo(arg(&args, 1, "port")),
        Some("udp-echo") => udp_echo(arg(&args, 1, "port"), arg(&args, 2, "count")),
        Some("sessions") => sessions(
            arg(&args, 1, "addr"),
            arg(&args, 2, "n"),
            arg(&args, 3, "interval ms"),
            arg(&args, 4, "secs"),
        ),
        Some("churn") => churn(
            arg(&args, 1, "tcp addr"),
            arg(&args, 2, "udp addr"),
            arg(&args, 3, "udp ports"),
            arg(&args, 4, "rate"),
            arg(&args, 5, "secs"),
        ),
        Some("syn-flood") => syn_flood(
            arg(&args, 1, "dst ip"),
            arg(&args, 2, "dst port"),
            arg(&args, 3, "rate"),
            arg(&args, 4, "secs"),
        ),
        _ => {
            eprintln!("usage: md-soak tcp-echo|udp-echo|sessions|churn|syn-flood ...");
            std::process::exit(2);
        }
    }
}

fn tcp_echo(port: u16) {
    let l = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    println!("listening tcp {port}");
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let Ok(w) = s.try_clone() else { return };
            let mut w = w;
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
}

fn udp_echo(port: u16, count: u16) {
    let servers: Vec<_> = (port..port + count)
        .map(|p| {
            let s = UdpSocket::bind(("0.0.0.0", p)).expect("bind");
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                loop {
                    if let Ok((n, peer)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], peer);
                    }
                }
            })
        })
        .collect();
    println!("listening udp {port}-{}", port + count - 1);
    for t in servers {
        let _ = t.join();
    }
}

fn sessions(addr: SocketAddr, n: usize, interval_ms: u64, secs: u64) {
    let mut conns = Vec::new();
    for _ in 0..n {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        conns.push(Some((s, r)));
    }
    let start = Instant::now();
    let (mut lost, mut echoes) = (0u64, 0u64);
    let mut round = 0u64;
    let mut next_report = 10;
    while start.elapsed() < Duration::from_secs(secs) {
        round += 1;
        for c in conns.iter_mut() {
            let Some((s, r)) = c else { continue };
            let word = format!("round {round}\n");
            let mut got = String::new();
            let ok = s.write_all(word.as_bytes()).is_ok()
                && r.read_line(&mut got).is_ok()
                && got == word;
            if ok {
                echoes += 1;
            } else {
                lost += 1;
                *c = None;
            }
        }
        if start.elapsed().as_secs() >= next_report {
            next_report += 10;
            println!(
                "{{\"t\":{},\"alive\":{},\"lost\":{lost},\"echoes\":{echoes}}}",
                start.elapsed().as_secs(),
                n as u64 - lost
            );
        }
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    println!("{{\"done\":true,\"sessions\":{n},\"lost\":{lost},\"echoes\":{echoes}}}");
}

/// UDP exchanges wait for their answer: several workers keep the rate up.
const UDP_WORKERS: u64 = 8;

fn churn(tcp: SocketAddr, udp: SocketAddr, udp_ports: u16, rate: u64, secs: u64) {
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let start = Instant::now();
    let workers: Vec<_> = (0..=UDP_WORKERS)
        .map(|w| {
            let counts = counts.clone();
            // Worker 0: TCP at rate/2; the others share rate/2 of UDP.
            let per_sec = if w == 0 {
                rate / 2
            } else {
                rate / 2 / UDP_WORKERS
            };
            let period = Duration::from_secs_f64(1.0 / per_sec.max(1) as f64);
            std::thread::spawn(move || {
                let mut next = Instant::now();
                let mut i = w as u16;
                while start.elapsed() < Duration::from_secs(secs) {
                    let ok = if w == 0 {
                        tcp_once(tcp)
                    } else {
                        i = i.wrapping_add(UDP_WORKERS as u16);
                        let mut to = udp;
                        to.set_port(udp.port() + i % udp_ports.max(1));
                        udp_once(to)
                    };
                    let k = usize::from(w != 0) * 2 + usize::from(!ok);
                    counts[k].fetch_add(1, Ordering::Relaxed);
                    next += period;
                    match next.checked_duration_since(Instant::now()) {
                        Some(d) => std::thread::sleep(d),
                        // Behind schedule (a lost answer waited): do not burst to catch up.
                        None => next = Instant::now(),
                    }
                }
            })
        })
        .collect();
    let mut next_report = 10;
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(200));
        if start.elapsed().as_secs() >= next_report {
            next_report += 10;
            println!("{}", churn_json(&counts, start));
        }
    }
    for w in workers {
        let _ = w.join();
    }
    println!(
        "{}",
        churn_json(&counts, start).replace('{', "{\"done\":true,")
    );
}

fn churn_json(c: &[AtomicU64; 4], start: Instant) -> String {
    let g = |i: usize| c[i].load(Ordering::Relaxed);
    format!(
        "{{\"t\":{},\"tcp_ok\":{},\"tcp_failed\":{},\"udp_ok\":{},\"udp_failed\":{}}}",
        start.elapsed().as_secs(),
        g(0),
        g(1),
        g(2),
        g(3)
    )
}

fn tcp_once(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut r = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return false,
    });
    let mut got = String::new();
    s.write_all(b"churn\n").is_ok() && r.read_line(&mut got).is_ok() && got == "churn\n"
}

fn udp_once(addr: SocketAddr) -> bool {
    let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 64];
    s.send_to(b"churn", addr).is_ok() && s.recv_from(&mut buf).is_ok_and(|(n, _)| n == 5)
}

fn csum(data: &[u8], mut acc: u32) -> u16 {
    for w in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn syn_flood(dst: Ipv4Addr, dport: u16, rate: u64, secs: u64) {
    // SAFETY: plain socket(2)/setsockopt(2) calls on a descriptor we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let mut x: u32 = 0x9e37_79b9 ^ std::process::id();
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut next = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let r = rnd();
        let src = if r & 1 == 0 {
            [198, 51, 100, (r >> 8) as u8 | 2]
        } else {
            [203, 0, 113, (r >> 8) as u8 | 2]
        };
        let sport = 1024 + (r >> 16) as u16 % 60000;
        let mut p = [0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst.octets());
        let c = csum(&p[..20], 0);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..28].copy_from_slice(&rnd().to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x02;
        p[34..36].copy_from_slice(&64240u16.to_be_bytes());
        let mut pseudo = Vec::with_capacity(32);
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&p[20..]);
        let c = csum(&pseudo, 0);
        p[36..38].copy_from_slice(&c.to_be_bytes());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: p and sa are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                fd,
                p.as_ptr().cast(),
                p.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n == 40 {
            sent += 1;
        }
        next += period;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    println!("{{\"done\":true,\"syn_sent\":{sent}}}");
}
