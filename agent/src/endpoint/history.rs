//! Which pod held which address, and when: a race or a DNS failure is named
//! after the pod that held the source address at the moment of the event,
//! not after the pod that holds it when user space reads the event (an
//! address freed by a departed pod can be given to the next pod at once).
//!
//! Bounded: at most [`MAX_TENURES`] tenures per address, closed tenures kept
//! for [`RETENTION`], at most [`MAX_ADDRESSES`] addresses.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::Duration,
};

use super::PodRef;

/// Tenures kept per address (the oldest closed one goes first).
pub const MAX_TENURES: usize = 8;
/// How long a closed tenure is kept: longer than any event waits in a ring
/// buffer or a DNS timeout lasts.
pub const RETENTION: Duration = Duration::from_mins(10);
/// Addresses with a history (those with only closed tenures go first).
pub const MAX_ADDRESSES: usize = 16_384;

/// One pod's hold on an address, in Unix milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenure {
    /// The pod.
    pub pod: PodRef,
    /// When the registry learned of it.
    pub from_unix_ms: u64,
    /// When it left the registry; `None` while it holds the address.
    pub until_unix_ms: Option<u64>,
}

/// Who held an address at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder<'a> {
    /// This pod held it.
    Pod(&'a PodRef),
    /// Nobody held it (between two tenures, or after the last one ended).
    Nobody,
    /// The time is older than everything kept: ask the current owner.
    Unknown,
}

/// The tenures of every address.
#[derive(Debug, Default)]
pub struct History {
    by_ip: HashMap<IpAddr, VecDeque<Tenure>>,
}

impl History {
    /// Records the owners after a change at `now_unix_ms`: tenures of pods
    /// that no longer hold their address end, new holders start one.
    pub fn update(&mut self, owners: &HashMap<IpAddr, PodRef>, now_unix_ms: u64) {
        for (ip, tenures) in &mut self.by_ip {
            if let Some(open) = tenures.back_mut().filter(|t| t.until_unix_ms.is_none()) {
                if owners.get(ip) != Some(&open.pod) {
                    open.until_unix_ms = Some(now_unix_ms);
                }
            }
        }
        for (ip, pod) in owners {
            let tenures = self.by_ip.entry(*ip).or_default();
            if tenures.back().is_some_and(|t| t.until_unix_ms.is_none()) {
                continue;
            }
            tenures.push_back(Tenure {
                pod: pod.clone(),
                from_unix_ms: now_unix_ms,
                until_unix_ms: None,
            });
            while tenures.len() > MAX_TENURES {
                tenures.pop_front();
            }
        }
        self.prune(now_unix_ms);
    }

    fn prune(&mut self, now_unix_ms: u64) {
        let retention = u64::try_from(RETENTION.as_millis()).unwrap_or(u64::MAX);
        let oldest = now_unix_ms.saturating_sub(retention);
        self.by_ip.retain(|_, tenures| {
            tenures.retain(|t| t.until_unix_ms.is_none_or(|until| until >= oldest));
            !tenures.is_empty()
        });
        if self.by_ip.len() > MAX_ADDRESSES {
            let mut closed: Vec<(u64, IpAddr)> = self
                .by_ip
                .iter()
                .filter_map(|(ip, t)| Some((t.back()?.until_unix_ms?, *ip)))
                .collect();
            closed.sort_unstable();
            let excess = self.by_ip.len() - MAX_ADDRESSES;
            for (_, ip) in closed.into_iter().take(excess) {
                self.by_ip.remove(&ip);
            }
        }
    }

    /// Who held `ip` at `time_unix_ms`.
    pub fn holder(&self, ip: IpAddr, time_unix_ms: u64) -> Holder<'_> {
        let Some(tenures) = self.by_ip.get(&ip) else {
            return Holder::Unknown;
        };
        if tenures
            .front()
            .is_none_or(|t| time_unix_ms < t.from_unix_ms)
        {
            return Holder::Unknown;
        }
        tenures
            .iter()
            .rev()
            .find(|t| {
                t.from_unix_ms <= time_unix_ms
                    && t.until_unix_ms.is_none_or(|until| time_unix_ms < until)
            })
            .map_or(Holder::Nobody, |t| Holder::Pod(&t.pod))
    }

    /// The tenures of `ip`, oldest first.
    pub fn tenures(&self, ip: IpAddr) -> Vec<Tenure> {
        self.by_ip
            .get(&ip)
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Addresses with a history.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// True when no address has a history.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "shop".into(),
            pod: name.into(),
        }
    }

    fn owners(pairs: &[(&str, &str)]) -> HashMap<IpAddr, PodRef> {
        pairs
            .iter()
            .map(|(ip, p)| (ip.parse().unwrap(), pod(p)))
            .collect()
    }

    #[test]
    fn an_address_given_to_the_next_pod_keeps_its_past() {
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let mut h = History::default();
        h.update(&owners(&[("10.0.0.5", "a")]), 1_000);
        h.update(&owners(&[]), 2_000);
        h.update(&owners(&[("10.0.0.5", "b")]), 3_000);
        assert_eq!(h.holder(ip, 999), Holder::Unknown);
        assert_eq!(h.holder(ip, 1_000), Holder::Pod(&pod("a")));
        assert_eq!(h.holder(ip, 1_999), Holder::Pod(&pod("a")));
        assert_eq!(h.holder(ip, 2_500), Holder::Nobody);
        assert_eq!(h.holder(ip, 3_000), Holder::Pod(&pod("b")));
        assert_eq!(h.holder(ip, u64::MAX), Holder::Pod(&pod("b")));
        // Handed over without a gap.
        h.update(&owners(&[("10.0.0.5", "c")]), 4_000);
        assert_eq!(h.holder(ip, 3_999), Holder::Pod(&pod("b")));
        assert_eq!(h.holder(ip, 4_000), Holder::Pod(&pod("c")));
        // An unchanged owner keeps its tenure.
        h.update(&owners(&[("10.0.0.5", "c")]), 5_000);
        assert_eq!(h.tenures(ip).len(), 3);
    }

    #[test]
    fn history_is_bounded_in_tenures_time_and_addresses() {
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let mut h = History::default();
        for i in 0..20_u64 {
            h.update(&owners(&[("10.0.0.5", &format!("p{i}"))]), i * 10);
        }
        let tenures = h.tenures(ip);
        assert_eq!(tenures.len(), MAX_TENURES);
        assert_eq!(tenures[0].pod, pod("p12"));
        let retention = u64::try_from(RETENTION.as_millis()).unwrap();
        h.update(&owners(&[]), 200);
        h.update(&owners(&[]), 200 + retention + 1);
        assert!(h.is_empty(), "{:?}", h.tenures(ip));

        let many: HashMap<IpAddr, PodRef> = (0..u32::try_from(MAX_ADDRESSES).unwrap() + 10)
            .map(|i| {
                (
                    IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                    pod("x"),
                )
            })
            .collect();
        h.update(&many, 1);
        assert_eq!(h.len(), MAX_ADDRESSES + 10, "open tenures are all kept");
        h.update(&HashMap::new(), 2);
        assert_eq!(h.len(), MAX_ADDRESSES);
    }
}
