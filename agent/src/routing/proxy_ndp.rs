//! Proxy NDP on the ENIs that answer for IPv6 pods.
//!
//! A proxy-ARP entry answers by itself; a proxy-NDP entry answers a
//! multicast solicitation only on an interface with forwarding and
//! `proxy_ndp` on (`ndisc_recv_ns` in net/ipv6/ndisc.c, Linux 6.18), and a
//! unicast one (the gateway checking that the pod is still reachable) only
//! with `all.proxy_ndp` on: else `ip6_forward` (`net/ipv6/ip6_output.c`)
//! forwards it to the pod, which drops it (its hop limit is no longer 255).
//! Forwarding is the node's setting, as for IPv4; `proxy_ndp` of `all` and
//! of each ENI holding IPv6 pods is podnet's, set when it is off and never
//! turned off again (other proxies may rely on it). It has no effect where
//! there are no proxy entries.

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf};

use super::desired::{Desired, Link};

/// The `proxy_ndp` switch of `ifname` in the calling process's network
/// namespace.
fn switch(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv6/conf/{ifname}/proxy_ndp"))
}

/// Names of the interfaces that carry IPv6 proxy entries in `desired`.
pub fn interfaces(desired: &Desired, links: &[Link]) -> BTreeSet<String> {
    desired
        .proxies
        .iter()
        .filter(|p| matches!(p.addr, IpAddr::V6(_)))
        .filter_map(|p| links.iter().find(|l| l.index == p.ifindex))
        .map(|l| l.name.clone())
        .collect()
}

/// Turns `proxy_ndp` on for every interface of `desired`'s IPv6 proxy
/// entries where it is off; returns what failed.
pub fn enable(desired: &Desired, links: &[Link]) -> Vec<String> {
    let mut errors = Vec::new();
    let interfaces = interfaces(desired, links);
    if interfaces.is_empty() {
        return errors;
    }
    for ifname in std::iter::once("all".to_owned()).chain(interfaces) {
        let path = switch(&ifname);
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        match std::fs::write(&path, "1") {
            Ok(()) => tracing::info!(interface = %ifname, "proxy NDP on"),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::super::desired::{
        self,
        tests::{endpoint, enis, links},
    };
    use super::*;

    #[test]
    fn only_enis_with_ipv6_proxies_need_it() {
        let d = desired::build(
            &[
                endpoint("a", "10.0.1.10", Some("vpod0")),
                endpoint("b", "10.0.2.10", Some("vpod1")),
            ],
            &enis(),
            &links(),
        );
        // eni1 answers for pod a's IPv6 address; eni2 (link "renamed") has
        // IPv4 proxies only.
        assert_eq!(
            interfaces(&d, &links()),
            BTreeSet::from(["eni1".to_owned()])
        );
    }
}
