//! `md-user metrics --listen ADDR:PORT`: serves `/metrics` in the Prometheus text format until
//! killed. Every scrape reads a fresh snapshot (see `crate::metrics`) on tokio's blocking pool,
//! without md's state lock.

use std::{convert::Infallible, net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, signal::unix::SignalKind};

use super::Ctx;
use crate::{datapath::Datapath, metrics, state::StateDir};

/// What a scrape reads.
struct Sources {
    state_dir: StateDir,
    dp: Datapath,
    /// This process holds a BPF_ENABLE_STATS descriptor.
    stats_held: bool,
}

pub async fn metrics(ctx: &Ctx, listen: SocketAddr, bpf_stats: bool) -> Result<ExitCode> {
    // The kernel counts program run time while any BPF_ENABLE_STATS descriptor is open and
    // stops when the last one closes: turned on for as long as we serve, nothing left behind
    // (unlike writing the kernel.bpf_stats_enabled sysctl).
    let stats_fd = if bpf_stats {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("turning on BPF run-time statistics (BPF_ENABLE_STATS)")?,
        )
    } else {
        None
    };
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let sources = Arc::new(Sources {
        state_dir: StateDir::new(&ctx.opts.state_dir),
        dp: Datapath::new(&ctx.opts.pin_dir),
        stats_held: stats_fd.is_some(),
    });
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    eprintln!("md-user: serving metrics on http://{listen}/metrics");
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let stream = match conn {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Out of descriptors and the like: keep serving once it passes.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let sources = sources.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| respond(sources.clone(), req));
                    // A client that goes away mid-request is its own business.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    drop(stats_fd);
    Ok(ExitCode::SUCCESS)
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static status and header")
}

async fn respond(
    src: Arc<Sources>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            text,
            "md-user serves /metrics\n".into(),
        ));
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "GET /metrics\n".into(),
        ));
    }
    let snap = tokio::task::spawn_blocking(move || {
        metrics::collect(&src.state_dir, &src.dp, src.stats_held)
    })
    .await;
    Ok(match snap {
        Ok(Ok(s)) => reply(StatusCode::OK, metrics::CONTENT_TYPE, metrics::encode(s)),
        Ok(Err(e)) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            text,
            format!("reading md's counters: {}\n", crate::error::one_line(&e)),
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            text,
            format!("reading md's counters: {e}\n"),
        ),
    })
}
