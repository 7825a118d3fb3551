//! `md-user docker-plugin`: md as Docker's network driver and IPAM driver, the remote plugin
//! protocol of Docker's libnetwork (JSON over HTTP POSTs on a unix socket in
//! `/run/docker/plugins/`, where Docker finds plugins by name). `docker network create -d md
//! --ipam-driver md NET` then puts Docker's containers on md's datapath: no iptables, by md or
//! by a dockerd started with `--iptables=false`.
//!
//! The plugin is a thin front end on the core in `attach.rs`, like the CNI plugin: everything
//! it does is in md's state store and pinned datapath, so Docker's containers keep their
//! network while the plugin (or dockerd, with `--live-restore`) restarts, and a restarted
//! plugin carries on from the store. Requests are served one at a time: each takes md's
//! state lock.

pub mod api;
mod driver;
mod ipam;
pub mod protocol;

use std::{
    convert::Infallible,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::ExitCode,
    rc::Rc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::UnixListener, signal::unix::SignalKind, sync::Mutex};

use crate::{attach::Ctx, netlink::Netlink, state::Locked};

/// Where Docker looks for plugin sockets (`NAME.sock` is plugin NAME).
pub const PLUGIN_DIR: &str = "/run/docker/plugins";
const CONTENT: &str = "application/vnd.docker.plugins.v1+json";

pub struct Plugin {
    pub ctx: Ctx,
    pub docker: api::Docker,
    pub(crate) serial: Mutex<()>,
}

impl Plugin {
    /// One request at a time (md's state lock is a blocking flock held across awaits), then
    /// the state lock, reconciled.
    async fn lock(&self, nl: &Netlink) -> Result<(tokio::sync::MutexGuard<'_, ()>, Locked)> {
        let guard = self.serial.lock().await;
        let locked = crate::attach::lock(&self.ctx, nl).await?;
        Ok((guard, locked))
    }
}

/// The socket of plugin `name`, unless given.
pub fn socket_path(name: &str, socket: Option<PathBuf>) -> Result<PathBuf> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        bail!("invalid plugin name {name:?}: use letters, digits, '-', '_', '.'");
    }
    Ok(socket.unwrap_or_else(|| Path::new(PLUGIN_DIR).join(format!("{name}.sock"))))
}

pub fn serve(ctx: Ctx, socket: PathBuf, docker_host: &str) -> Result<ExitCode> {
    let rt = crate::commands::runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = claim(&socket)?;
        let ino = std::fs::metadata(&socket)?.ino();
        let pl = Rc::new(Plugin {
            ctx,
            docker: api::Docker::new(docker_host),
            serial: Mutex::new(()),
        });
        // Whatever a killed plugin or Docker left half done is reclaimed now.
        {
            let nl = Netlink::connect()?;
            let (_g, mut locked) = pl.lock(&nl).await?;
            locked.save()?;
        }
        eprintln!(
            "md-user docker-plugin: serving Docker's network and IPAM driver protocol on {}",
            socket.display()
        );
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        let mut reap = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                conn = listener.accept() => {
                    let Ok((stream, _)) = conn else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let pl = pl.clone();
                    tokio::task::spawn_local(async move {
                        let service = service_fn(move |req| respond(pl.clone(), req));
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                _ = reap.tick() => reap_children(),
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
            }
        }
        // Only our own socket: a plugin started since may have taken the path.
        if std::fs::metadata(&socket).is_ok_and(|m| m.ino() == ino) {
            let _ = std::fs::remove_file(&socket);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Binds the socket. One left by a killed plugin is replaced; one a live plugin serves is not.
fn claim(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Ok(m) = std::fs::symlink_metadata(socket) {
        if !m.file_type().is_socket() {
            bail!("{} exists and is not a socket", socket.display());
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("another plugin serves {} already", socket.display());
        }
        std::fs::remove_file(socket).with_context(|| format!("removing {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    // Docker (root) is the only client.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// md's resolvers and watcher are this process's children once started from here: collect
/// them when they exit.
fn reap_children() {
    loop {
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, CONTENT)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static status and header")
}

async fn respond(
    pl: Rc<Plugin>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.uri().path().trim_start_matches('/').to_string();
    if req.method() != Method::POST {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"Err": "POST only"}),
        ));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                json!({"Err": e.to_string()}),
            ))
        }
    };
    let args = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return Ok(reply(
                    StatusCode::BAD_REQUEST,
                    json!({"Err": format!("{method}: {e}")}),
                ))
            }
        }
    };
    // The two protocols name their error field differently.
    let err_field = if method.starts_with("IpamDriver.") {
        "Error"
    } else {
        "Err"
    };
    match dispatch(&pl, &method, args).await {
        None => Ok(reply(
            StatusCode::NOT_FOUND,
            json!({ err_field: format!("md does not implement {method}") }),
        )),
        Some(Ok(v)) => Ok(reply(StatusCode::OK, v)),
        Some(Err(e)) => {
            let msg = crate::error::one_line(&e);
            eprintln!("md-user docker-plugin: {method}: {msg}");
            Ok(reply(StatusCode::OK, json!({ err_field: msg })))
        }
    }
}

async fn dispatch(pl: &Rc<Plugin>, method: &str, args: Value) -> Option<Result<Value>> {
    use driver as d;
    Some(match method {
        "Plugin.Activate" => Ok(json!({"Implements": ["NetworkDriver", "IpamDriver"]})),
        "NetworkDriver.GetCapabilities" => {
            Ok(json!({"Scope": "local", "ConnectivityScope": "local"}))
        }
        "NetworkDriver.CreateNetwork" => {
            let nid = args["NetworkID"].as_str().map(String::from);
            let out = d::create_network(pl, args).await;
            if let (Ok(_), Some(nid)) = (&out, nid) {
                learn_network_name(pl.clone(), nid);
            }
            out
        }
        "NetworkDriver.DeleteNetwork" => d::delete_network(pl, args).await,
        "NetworkDriver.CreateEndpoint" => d::create_endpoint(pl, args).await,
        "NetworkDriver.DeleteEndpoint" => d::delete_endpoint(pl, args).await,
        "NetworkDriver.EndpointOperInfo" => d::endpoint_oper_info(pl, args).await,
        "NetworkDriver.Join" => d::join(pl, args).await,
        "NetworkDriver.Leave" => d::leave(pl, args).await,
        "NetworkDriver.ProgramExternalConnectivity" => {
            d::program_external_connectivity(pl, args).await
        }
        "NetworkDriver.RevokeExternalConnectivity" => {
            d::revoke_external_connectivity(pl, args).await
        }
        "NetworkDriver.DiscoverNew" | "NetworkDriver.DiscoverDelete" => Ok(json!({})),
        "IpamDriver.GetCapabilities" => Ok(json!({
            "RequiresMACAddress": false,
            // md keeps its pools and leases: nothing to replay when dockerd restarts.
            "RequiresRequestReplay": false,
        })),
        "IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
            "LocalDefaultAddressSpace": ipam::ADDRESS_SPACE,
            "GlobalDefaultAddressSpace": ipam::ADDRESS_SPACE,
        })),
        "IpamDriver.RequestPool" => d::request_pool(pl, args).await,
        "IpamDriver.ReleasePool" => d::release_pool(pl, args).await,
        "IpamDriver.RequestAddress" => d::request_address(pl, args).await,
        "IpamDriver.ReleaseAddress" => d::release_address(pl, args).await,
        _ => return None,
    })
}

/// Docker stores a network only once CreateNetwork has answered: ask its API for the name a
/// little later, in the background, so `md-user network ls` and `md-user run --network NAME`
/// know Docker's network by its name before a container joins it.
fn learn_network_name(pl: Rc<Plugin>, nid: String) {
    tokio::task::spawn_local(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let Ok(names) = pl.docker.names(&nid, None).await else {
                continue;
            };
            let Some(name) = names.network else {
                continue;
            };
            let Ok(nl) = Netlink::connect() else {
                return;
            };
            if let Ok((_g, mut locked)) = pl.lock(&nl).await {
                if driver::adopt_network_name(&mut locked.state, &nid, &name) {
                    let _ = locked.save();
                }
            }
            return;
        }
    });
}
