//! md's IPAM driver for Docker (`--ipam-driver md`): pools are md subnets, addresses come
//! from the same allocator as `md-user run`'s, so Docker's containers and md's share a subnet
//! without ever getting the same address. What it hands out is recorded in md's state
//! (`DockerState::pools` and `leases`), so it survives restarts of the plugin and of dockerd
//! (md asks Docker for no replay).

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};

use super::protocol::{
    parse_address, ReleaseAddress, RequestAddress, RequestPool, GATEWAY_REQUEST,
    REQUEST_ADDRESS_TYPE,
};
use crate::{cli::GlobalOpts, ipam::Subnet, network, state::State};

/// The address space md's pools live in (Docker asks for one; md has one).
pub const ADDRESS_SPACE: &str = "md";

fn pool_id(subnet: &Subnet) -> String {
    format!("md:{subnet}")
}

/// A pool: the subnet asked for, or the first free 172.19-31.0.0/16 (md's default network keeps
/// 172.18.0.0/16). A pool equal to an md network's subnet puts Docker's network on that md
/// network (shared with `md-user run`); one that only overlaps is refused, as is a second
/// Docker network on the same pool.
pub fn request_pool(
    state: &mut State,
    opts: &GlobalOpts,
    req: &RequestPool,
) -> Result<(String, Subnet)> {
    if req.v6 {
        bail!("md's networks are IPv4: no IPv6 pool (leave --ipv6 out)");
    }
    if !req.sub_pool.is_empty() && req.sub_pool != req.pool {
        bail!("md's IPAM driver hands out the whole subnet: leave --ip-range out");
    }
    network::ensure_default(state, opts)?;
    let subnet = if req.pool.is_empty() {
        (19..=31)
            .map(|b| Subnet::new(Ipv4Addr::new(172, b, 0, 0), 16).expect("valid"))
            .find(|s| {
                !state.networks.values().any(|n| n.subnet.overlaps(s))
                    && !state.docker.pools.values().any(|p| p.overlaps(s))
            })
            .context("no free 172.19-31.0.0/16 subnet left; pass --subnet")?
    } else {
        let s: Subnet = req.pool.parse()?;
        if s.to_string() != req.pool {
            bail!(
                "subnet {}: the address is not the network's ({s})",
                req.pool
            );
        }
        if let Some(p) = state.docker.pools.values().find(|p| p.overlaps(&s)) {
            bail!("subnet {s} overlaps {p}, a pool of another Docker network");
        }
        if let Some((name, n)) = state
            .networks
            .iter()
            .find(|(_, n)| n.subnet.overlaps(&s) && n.subnet != s)
        {
            bail!("subnet {s} overlaps md network {name} ({})", n.subnet);
        }
        s
    };
    let id = pool_id(&subnet);
    state.docker.pools.insert(id.clone(), subnet);
    Ok((id, subnet))
}

/// Forgets a pool and whatever is still leased from it.
pub fn release_pool(state: &mut State, id: &str) {
    state.docker.pools.remove(id);
    state.docker.leases.remove(id);
}

/// An address from a pool: the gateway (always the subnet's first address, md's bridge), the
/// one asked for if free, else the lowest free one. Leased until released.
pub fn request_address(state: &mut State, req: &RequestAddress) -> Result<(Ipv4Addr, Subnet)> {
    let subnet = *state
        .docker
        .pools
        .get(&req.pool_id)
        .with_context(|| format!("no such pool: {}", req.pool_id))?;
    let wanted = (!req.address.is_empty())
        .then(|| parse_address(&req.address))
        .transpose()?;
    let gateway = req
        .options
        .as_ref()
        .and_then(|o| o.get(REQUEST_ADDRESS_TYPE))
        .is_some_and(|t| t == GATEWAY_REQUEST);
    if gateway {
        let gw = subnet.gateway();
        if wanted.is_some_and(|w| w != gw) {
            bail!("md's gateway is the subnet's first address, {gw}: leave --gateway out");
        }
        return Ok((gw, subnet));
    }
    let mut used: std::collections::HashSet<Ipv4Addr> = state.docker.leased_in(&subnet).collect();
    if let Some(name) = state
        .networks
        .iter()
        .find(|(_, n)| n.subnet == subnet)
        .map(|(name, _)| name.clone())
    {
        used.extend(state.used_ips(&name));
    }
    let ip = match wanted {
        Some(ip) => {
            subnet.check_static_with(ip, subnet.gateway(), &used)?;
            ip
        }
        None => subnet.allocate_in(None, subnet.gateway(), &used)?,
    };
    state
        .docker
        .leases
        .entry(req.pool_id.clone())
        .or_default()
        .insert(ip);
    Ok((ip, subnet))
}

/// Gives an address back (the gateway is never leased).
pub fn release_address(state: &mut State, req: &ReleaseAddress) -> Result<()> {
    if req.address.is_empty() {
        return Ok(());
    }
    let ip = parse_address(&req.address)?;
    if let Some(leases) = state.docker.leases.get_mut(&req.pool_id) {
        leases.remove(&ip);
        if leases.is_empty() {
            state.docker.leases.remove(&req.pool_id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn opts() -> GlobalOpts {
        GlobalOpts {
            state_dir: "/nonexistent".into(),
            pin_dir: "/nonexistent".into(),
            uplink: None,
            bridge: "md0".into(),
            subnet: "172.18.0.0/16".into(),
            resolv_conf: "/etc/resolv.conf".into(),
            datapath: None,
            store: None,
            store_ttl: 15,
            advertise_addr: None,
            ipv6: false,
            subnet6: None,
        }
    }

    fn pool(p: &str) -> RequestPool {
        RequestPool {
            pool: p.into(),
            sub_pool: String::new(),
            v6: false,
        }
    }

    fn addr(pool: &str, a: &str, gateway: bool) -> RequestAddress {
        RequestAddress {
            pool_id: pool.into(),
            address: a.into(),
            options: gateway.then(|| {
                BTreeMap::from([(
                    REQUEST_ADDRESS_TYPE.to_string(),
                    GATEWAY_REQUEST.to_string(),
                )])
            }),
        }
    }

    #[test]
    fn pools_are_md_subnets() {
        let mut s = State::default();
        // md's default network keeps 172.18.0.0/16; the next /16 is Docker's.
        let (a, sa) = request_pool(&mut s, &opts(), &pool("")).unwrap();
        assert_eq!(
            (a.as_str(), sa.to_string().as_str()),
            ("md:172.19.0.0/16", "172.19.0.0/16")
        );
        let (_, sb) = request_pool(&mut s, &opts(), &pool("")).unwrap();
        assert_eq!(sb.to_string(), "172.20.0.0/16");
        // `md-user network create` skips them too.
        let n = network::create(&mut s, "mine", None, None).unwrap();
        assert_eq!(n.subnet.to_string(), "172.21.0.0/16");
        // md's default network's subnet: shared, not refused.
        let (c, _) = request_pool(&mut s, &opts(), &pool("172.18.0.0/16")).unwrap();
        assert_eq!(c, "md:172.18.0.0/16");
        for (p, msg) in [
            (
                "172.18.0.0/16",
                "subnet 172.18.0.0/16 overlaps 172.18.0.0/16, a pool of another Docker network",
            ),
            (
                "172.21.5.0/24",
                "subnet 172.21.5.0/24 overlaps md network mine (172.21.0.0/16)",
            ),
            (
                "172.19.1.0/24",
                "subnet 172.19.1.0/24 overlaps 172.19.0.0/16, a pool of another Docker network",
            ),
            (
                "10.0.0.1/24",
                "subnet 10.0.0.1/24: the address is not the network's (10.0.0.0/24)",
            ),
        ] {
            let e = request_pool(&mut s, &opts(), &pool(p)).unwrap_err();
            assert_eq!(crate::error::one_line(&e), msg);
        }
        let v6 = RequestPool {
            v6: true,
            ..pool("")
        };
        assert!(request_pool(&mut s, &opts(), &v6).is_err());
        // A pool md's IPAM holds is not another md network's.
        let e = network::create(&mut s, "late", Some("172.19.0.0/24".parse().unwrap()), None)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "subnet 172.19.0.0/24 overlaps 172.19.0.0/16, a pool md's IPAM driver gave Docker"
        );
        release_pool(&mut s, &a);
        network::create(&mut s, "late", Some("172.19.0.0/24".parse().unwrap()), None).unwrap();
    }

    #[test]
    fn leased_addresses_are_taken_for_everyone() {
        let mut s = State::default();
        let (id, _) = request_pool(&mut s, &opts(), &pool("10.7.0.0/24")).unwrap();
        let gw = request_address(&mut s, &addr(&id, "", true)).unwrap().0;
        assert_eq!(gw, Ipv4Addr::new(10, 7, 0, 1));
        assert!(request_address(&mut s, &addr(&id, "10.7.0.9", true)).is_err());
        let a = request_address(&mut s, &addr(&id, "", false)).unwrap().0;
        let b = request_address(&mut s, &addr(&id, "10.7.0.9/24", false))
            .unwrap()
            .0;
        assert_eq!(
            (a, b),
            (Ipv4Addr::new(10, 7, 0, 2), Ipv4Addr::new(10, 7, 0, 9))
        );
        assert!(request_address(&mut s, &addr(&id, "10.7.0.9", false)).is_err());
        assert!(request_address(&mut s, &addr(&id, "10.7.1.9", false)).is_err());
        // The md network on that subnet (made at CreateNetwork) sees the leases: `md-user run`
        // takes the next address.
        network::create(&mut s, "dk", Some("10.7.0.0/24".parse().unwrap()), None).unwrap();
        let used = s.used_ips("dk");
        assert!(used.contains(&a) && used.contains(&b));
        assert_eq!(
            s.networks["dk"].subnet.allocate(&used).unwrap(),
            Ipv4Addr::new(10, 7, 0, 3)
        );
        release_address(
            &mut s,
            &ReleaseAddress {
                pool_id: id.clone(),
                address: "10.7.0.2".into(),
            },
        )
        .unwrap();
        assert_eq!(
            request_address(&mut s, &addr(&id, "", false)).unwrap().0,
            Ipv4Addr::new(10, 7, 0, 2)
        );
        release_pool(&mut s, &id);
        assert!(s.docker.leases.is_empty() && s.docker.pools.is_empty());
        assert!(request_address(&mut s, &addr(&id, "", false)).is_err());
    }
}
