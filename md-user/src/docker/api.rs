//! What md asks Docker's Engine API (over its unix socket): the names Docker gives a network
//! and an endpoint's container. Docker's remote driver protocol never says them, but its API
//! does, and answers these two questions without calling back into the plugin or locking the
//! container being started (`GET /networks/ID` reads libnetwork's store, `GET
//! /containers/json` the daemon's lock-free view), so they can be asked from within a Join.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::{body::Bytes, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Docker's API socket (`--docker-host unix:///var/run/docker.sock`).
pub struct Docker {
    socket: Option<PathBuf>,
}

/// What Docker calls an endpoint's network and container.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Names {
    pub network: Option<String>,
    pub container: Option<String>,
    pub container_id: Option<String>,
}

impl Docker {
    /// `unix://PATH`; anything else leaves md without Docker's names (with a warning).
    pub fn new(host: &str) -> Docker {
        let socket = host.strip_prefix("unix://").map(PathBuf::from);
        if socket.is_none() {
            eprintln!(
                "md-user docker-plugin: --docker-host {host}: only unix:// sockets are read; Docker's names are unknown"
            );
        }
        Docker { socket }
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let sock = self.socket.as_ref().context("no Docker API socket")?;
        let ask = async {
            let stream = tokio::net::UnixStream::connect(sock)
                .await
                .with_context(|| format!("connecting to {}", sock.display()))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::task::spawn_local(conn);
            let req = Request::get(path)
                .header("Host", "docker")
                .body(Empty::<Bytes>::new())?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                bail!("GET {path}: {status}");
            }
            serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))
        };
        tokio::time::timeout(Duration::from_secs(5), ask)
            .await
            .with_context(|| format!("GET {path}: no answer from Docker"))?
    }

    /// The name of network `nid` and, when given, of the container endpoint `eid` is for.
    pub async fn names(&self, nid: &str, eid: Option<&str>) -> Result<Names> {
        let net = self.get(&format!("/networks/{nid}")).await?;
        let mut names = Names {
            network: net["Name"].as_str().map(String::from),
            ..Names::default()
        };
        let Some(eid) = eid else {
            return Ok(names);
        };
        if let Some((key, ep)) = net["Containers"]
            .as_object()
            .into_iter()
            .flatten()
            .find(|(_, v)| v["EndpointID"].as_str() == Some(eid))
        {
            names.container = ep["Name"].as_str().map(String::from);
            // Keyed by container id once joined, by "ep-<endpoint id>" before.
            if !key.starts_with("ep-") {
                names.container_id = Some(key.clone());
            }
        }
        if let (Some(name), None) = (&names.container, &names.container_id) {
            let filters = serde_json::json!({"name": [format!("^/{name}$")]}).to_string();
            let list = self
                .get(&format!(
                    "/containers/json?all=1&filters={}",
                    percent_encode(&filters)
                ))
                .await?;
            names.container_id = list
                .as_array()
                .and_then(|a| a.first())
                .and_then(|c| c["Id"].as_str())
                .map(String::from);
        }
        Ok(names)
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_encoded() {
        assert_eq!(
            percent_encode(r#"{"name":["^/web$"]}"#),
            "%7B%22name%22%3A%5B%22%5E%2Fweb%24%22%5D%7D"
        );
    }
}
