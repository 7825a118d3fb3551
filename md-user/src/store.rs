//! The cluster store of overlay networks (issue 17): etcd v3, through the `etcd-client` crate
//! (gRPC, maintained by the etcdv3 project). Every call has a deadline, and a store that does
//! not answer is reported as down, naming it, so a command never hangs and always says why.
//!
//! Keys (under `/md/`), values are JSON:
//! - `networks/NAME`            the overlay's subnet, mode and block size (permanent)
//! - `blocks/NAME/ADDR`         a block of NAME's subnet held by a host (on its lease)
//! - `hosts/ID`                 a host and its underlay address (on its lease)
//! - `containers/NAME`          a container: host, network, address, identity (on the lease)
//! - `identities/NAME`          a name's policy identity, the same on every host (permanent)
//! - `identity-next`            the next identity to hand out
//!
//! Everything a host registers hangs on one lease with a TTL that its watcher keeps alive: a
//! host that dies takes its blocks and containers with it when the lease expires, and nobody
//! else can take its block before that.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};
use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "/md/";
/// How long one store call may take before the store counts as down.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// `etcd://HOST:PORT[,HOST:PORT...]` → the client's endpoints.
pub fn parse_url(url: &str) -> Result<Vec<String>> {
    let rest = url
        .strip_prefix("etcd://")
        .with_context(|| format!("store {url:?}: only etcd://HOST:PORT[,HOST:PORT...] is known"))?;
    let mut out = Vec::new();
    for hp in rest.trim_end_matches('/').split(',') {
        let (host, port) = hp
            .rsplit_once(':')
            .with_context(|| format!("store {url:?}: {hp:?} needs a port (HOST:2379)"))?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            bail!("store {url:?}: {hp:?} is not HOST:PORT");
        }
        out.push(format!("http://{host}:{port}"));
    }
    Ok(out)
}

/// The first endpoint's host (the underlay address is the one the host routes to it from).
pub fn first_host(url: &str) -> Result<String> {
    let eps = parse_url(url)?;
    let ep = eps[0].trim_start_matches("http://");
    Ok(ep
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(ep)
        .to_string())
}

/// An overlay network as the store defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDef {
    pub subnet: String,
    /// `tunnel` (VXLAN) or `native` (routed over a shared underlay).
    pub mode: String,
    /// Prefix length of the blocks hosts lease.
    pub block_prefix: u8,
}

/// A host holding a block, or a host itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRef {
    pub host: String,
    pub addr: Ipv4Addr,
}

/// A container as every host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRec {
    pub host: String,
    /// The host's underlay address.
    pub addr: Ipv4Addr,
    pub network: String,
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub hostname: String,
}

/// Everything under the prefix at one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub revision: i64,
    pub networks: std::collections::BTreeMap<String, NetworkDef>,
    /// (network, block address) → holder.
    pub blocks: std::collections::BTreeMap<(String, Ipv4Addr), HostRef>,
    pub hosts: std::collections::BTreeMap<String, HostRef>,
    pub containers: std::collections::BTreeMap<String, ContainerRec>,
    pub identities: std::collections::BTreeMap<String, u32>,
    /// Every key's value and lease (0: none), to tell whether a write would change anything.
    pub raw: std::collections::BTreeMap<String, (Vec<u8>, i64)>,
}

impl View {
    /// Sorts key/value pairs under the prefix into their kinds; unknown or unreadable keys are
    /// skipped (a newer md may add kinds).
    pub fn from_pairs(revision: i64, pairs: &[(String, Vec<u8>)]) -> View {
        let mut v = View {
            revision,
            ..View::default()
        };
        for (key, value) in pairs {
            let Some(rest) = key.strip_prefix(PREFIX) else {
                continue;
            };
            let mut parts = rest.splitn(3, '/');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("networks"), Some(name), None) => {
                    if let Ok(d) = serde_json::from_slice(value) {
                        v.networks.insert(name.to_string(), d);
                    }
                }
                (Some("blocks"), Some(net), Some(addr)) => {
                    if let (Ok(a), Ok(h)) = (addr.parse(), serde_json::from_slice(value)) {
                        v.blocks.insert((net.to_string(), a), h);
                    }
                }
                (Some("hosts"), Some(id), None) => {
                    if let Ok(h) = serde_json::from_slice(value) {
                        v.hosts.insert(id.to_string(), h);
                    }
                }
                (Some("containers"), Some(name), None) => {
                    if let Ok(c) = serde_json::from_slice(value) {
                        v.containers.insert(name.to_string(), c);
                    }
                }
                (Some("identities"), Some(name), None) => {
                    if let Some(id) = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()) {
                        v.identities.insert(name.to_string(), id);
                    }
                }
                _ => {}
            }
        }
        v
    }
}

pub fn network_key(name: &str) -> String {
    format!("{PREFIX}networks/{name}")
}

pub fn block_key(network: &str, block: Ipv4Addr) -> String {
    format!("{PREFIX}blocks/{network}/{block}")
}

pub fn host_key(id: &str) -> String {
    format!("{PREFIX}hosts/{id}")
}

pub fn container_key(name: &str) -> String {
    format!("{PREFIX}containers/{name}")
}

pub fn identity_key(name: &str) -> String {
    format!("{PREFIX}identities/{name}")
}

const IDENTITY_NEXT: &str = "/md/identity-next";

/// A connection to the store, named by its URL in every error.
pub struct Store {
    client: Client,
    pub url: String,
}

/// The error of a store that did not answer in time or could not be reached.
fn down(url: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "the store {url} is down or unreachable ({})",
        short(&e.to_string())
    )
}

/// The gist of a gRPC transport error (tonic's are a page long).
fn short(e: &str) -> String {
    const KNOWN: [(&str, &str); 6] = [
        ("Connection refused", "connection refused"),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network unreachable"),
        ("timed out", "timed out"),
        ("tcp connect error", "cannot connect"),
        ("transport error", "connection lost"),
    ];
    for (needle, say) in KNOWN {
        if e.contains(needle) {
            return say.to_string();
        }
    }
    e.chars().take(160).collect()
}

impl Store {
    /// Connects (lazily: the first call finds out whether the store answers).
    pub async fn connect(url: &str) -> Result<Store> {
        let endpoints = parse_url(url)?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), CALL_TIMEOUT);
        let client = tokio::time::timeout(CALL_TIMEOUT, Client::connect(endpoints, Some(opts)))
            .await
            .map_err(|_| down(url, "no answer"))?
            .map_err(|e| down(url, e))?;
        Ok(Store {
            client,
            url: url.to_string(),
        })
    }

    /// Runs one call under the deadline; any failure reads as "the store is down".
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(down(&self.url, e)),
            Err(_) => Err(down(&self.url, "no answer")),
        }
    }

    /// Every key under the prefix, and the revision they were read at.
    pub async fn view(&mut self) -> Result<View> {
        let mut c = self.client.clone();
        let resp = self
            .call(c.get(PREFIX, Some(GetOptions::new().with_prefix())))
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let pairs: Vec<(String, Vec<u8>)> = resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((kv.key_str().ok()?.to_string(), kv.value().to_vec())))
            .collect();
        let mut view = View::from_pairs(revision, &pairs);
        view.raw = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                Some((
                    kv.key_str().ok()?.to_string(),
                    (kv.value().to_vec(), kv.lease()),
                ))
            })
            .collect();
        Ok(view)
    }

    pub async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut c = self.client.clone();
        let resp = self.call(c.get(key, None)).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Writes `key` unless it exists; returns whether it was written, and what is there now.
    pub async fn create(
        &mut self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<(bool, Option<Vec<u8>>)> {
        let put = match lease {
            Some(l) => TxnOp::put(key, value, Some(PutOptions::new().with_lease(l))),
            None => TxnOp::put(key, value, None),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([put])
            .or_else([TxnOp::get(key, None)]);
        let mut c = self.client.clone();
        let resp = self.call(c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok((true, Some(value.to_vec())));
        }
        let now = resp.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        Ok((false, now))
    }

    pub async fn put(&mut self, key: &str, value: &[u8], lease: Option<i64>) -> Result<()> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let mut c = self.client.clone();
        self.call(c.put(key, value, opts)).await?;
        Ok(())
    }

    pub async fn delete(&mut self, key: &str) -> Result<()> {
        let mut c = self.client.clone();
        self.call(c.delete(key, None)).await?;
        Ok(())
    }

    pub async fn grant(&mut self, ttl: u32) -> Result<i64> {
        let mut c = self.client.clone();
        Ok(self.call(c.lease_grant(ttl as i64, None)).await?.id())
    }

    /// Whether lease `id` is still alive (its keys are still there).
    pub async fn lease_alive(&mut self, id: i64) -> Result<bool> {
        let mut c = self.client.clone();
        let resp = self.call(c.lease_time_to_live(id, None)).await?;
        Ok(resp.ttl() > 0)
    }

    /// Refreshes lease `id` once; false when it has expired (etcd answers a TTL of 0, or
    /// that it knows no such lease).
    pub async fn keep_alive(&mut self, id: i64) -> Result<bool> {
        let mut c = self.client.clone();
        let once = async {
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(CALL_TIMEOUT, once).await {
            Ok(Ok(Some(r))) => Ok(r.ttl() > 0),
            Ok(Err(e)) if e.to_string().contains("lease not found") => Ok(false),
            Ok(Err(e)) => Err(down(&self.url, e)),
            Ok(Ok(None)) => Err(down(&self.url, "the keep-alive stream closed")),
            Err(_) => Err(down(&self.url, "no answer")),
        }
    }

    pub async fn revoke(&mut self, id: i64) -> Result<()> {
        let mut c = self.client.clone();
        self.call(c.lease_revoke(id)).await?;
        Ok(())
    }

    /// Watches everything under the prefix from `revision` on.
    pub async fn watch(&mut self, revision: i64) -> Result<WatchStream> {
        let mut c = self.client.clone();
        self.call(
            c.watch(
                PREFIX,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision),
                ),
            ),
        )
        .await
    }

    /// The identity of `name`, handed out on first use from a counter in the store, so a name
    /// has the same identity on every host (and keeps it: identities are never leased).
    pub async fn identity(&mut self, name: &str) -> Result<u32> {
        use md_common::{CLUSTER_IDENTITY_MAX, CLUSTER_IDENTITY_MIN};
        let key = identity_key(name);
        for _ in 0..32 {
            if let Some(v) = self.get(&key).await? {
                return std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .with_context(|| format!("the store's identity of {name} is unreadable"));
            }
            let mut c = self.client.clone();
            let resp = self.call(c.get(IDENTITY_NEXT, None)).await?;
            let (next, rev) = match resp.kvs().first() {
                Some(kv) => (
                    std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|s| s.parse::<u32>().ok())
                        .unwrap_or(CLUSTER_IDENTITY_MIN),
                    kv.mod_revision(),
                ),
                None => (CLUSTER_IDENTITY_MIN, 0),
            };
            if next > CLUSTER_IDENTITY_MAX {
                bail!("the store has handed out every cluster identity");
            }
            // Both or neither: the name's identity and the counter, unless someone got there
            // first (then read again).
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                    Compare::mod_revision(IDENTITY_NEXT, CompareOp::Equal, rev),
                ])
                .and_then([
                    TxnOp::put(key.as_str(), next.to_string(), None),
                    TxnOp::put(IDENTITY_NEXT, (next + 1).to_string(), None),
                ]);
            let mut c = self.client.clone();
            if self.call(c.txn(txn)).await?.succeeded() {
                return Ok(next);
            }
        }
        bail!("could not allocate an identity for {name} in the store (too much contention)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("etcd://198.51.100.2:2379").unwrap(),
            ["http://198.51.100.2:2379"]
        );
        assert_eq!(
            parse_url("etcd://a:1,b:2/").unwrap(),
            ["http://a:1", "http://b:2"]
        );
        assert_eq!(first_host("etcd://10.0.0.1:2379,b:2").unwrap(), "10.0.0.1");
        for bad in [
            "http://a:1",
            "etcd://a",
            "etcd://:1",
            "etcd://a:0",
            "etcd://a:x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn view_sorts_keys_into_kinds() {
        let c = ContainerRec {
            host: "h1".into(),
            addr: "198.51.100.11".parse().unwrap(),
            network: "ov".into(),
            ip: "172.30.0.2".parse().unwrap(),
            identity: 1 << 20,
            hostname: "a".into(),
        };
        let h = HostRef {
            host: "h1".into(),
            addr: "198.51.100.11".parse().unwrap(),
        };
        let pairs = vec![
            (
                network_key("ov"),
                br#"{"subnet":"172.30.0.0/16","mode":"tunnel","block_prefix":24}"#.to_vec(),
            ),
            (
                block_key("ov", "172.30.0.0".parse().unwrap()),
                serde_json::to_vec(&h).unwrap(),
            ),
            (host_key("h1"), serde_json::to_vec(&h).unwrap()),
            (container_key("a"), serde_json::to_vec(&c).unwrap()),
            (identity_key("a"), b"1048576".to_vec()),
            (IDENTITY_NEXT.into(), b"1048577".to_vec()),
            ("/md/containers/broken".into(), b"{".to_vec()),
            ("/other/x".into(), b"1".to_vec()),
        ];
        let v = View::from_pairs(7, &pairs);
        assert_eq!(v.revision, 7);
        assert_eq!(v.networks["ov"].block_prefix, 24);
        assert_eq!(v.blocks[&("ov".into(), "172.30.0.0".parse().unwrap())], h);
        assert_eq!(v.hosts["h1"], h);
        assert_eq!(v.containers.len(), 1);
        assert_eq!(v.containers["a"], c);
        assert_eq!(v.identities["a"], 1 << 20);
    }
}
