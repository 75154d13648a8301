//! One reconcile: observe, diff, apply, count.

use std::{
    collections::HashSet,
    sync::atomic::{AtomicU64, Ordering},
};

use super::{
    desired::{self, Desired, Link},
    diff::{self, Change, Kind, Object, Observed, State, Status},
    eni::Eni,
    netlink::{Netlink, NetlinkError},
};
use crate::endpoint::Endpoint;

/// Counters behind `podnet_route_reconciles_total` and
/// `podnet_route_repairs_total`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reconciles that applied every change they planned.
    pub success: AtomicU64,
    /// Reconciles that failed to observe or to apply a change.
    pub error: AtomicU64,
    /// Objects put back after they drifted, by [`Kind::ALL`] index.
    pub repairs: [AtomicU64; 3],
}

impl Stats {
    /// Repairs of `kind`.
    pub fn repairs(&self, kind: Kind) -> u64 {
        self.repairs[kind_index(kind)].load(Ordering::Relaxed)
    }
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Rule => 0,
        Kind::Route => 1,
        Kind::Neigh => 2,
    }
}

/// The result of one reconcile.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The desired state it worked towards.
    pub desired: Desired,
    /// The kernel's links at the time.
    pub links: Vec<Link>,
    /// Desired versus actual after the changes.
    pub statuses: Vec<Status>,
    /// Changes applied.
    pub applied: usize,
    /// Of which repairs of drift.
    pub repairs: usize,
    /// Changes that failed.
    pub errors: Vec<String>,
}

impl Outcome {
    /// Whether a foreign object holds the place of a desired one. Its removal
    /// sends no notification podnet listens to (foreign route protocol), so
    /// the loop looks again soon instead of at the next full resync.
    pub fn has_conflicts(&self) -> bool {
        self.statuses.iter().any(|s| s.state == State::Conflict)
    }
}

/// Reconciles routing state through a [`Netlink`].
pub struct Reconciler<N> {
    netlink: N,
    /// Objects desired at the previous reconcile: putting one of these back is
    /// a repair; installing a newly desired one is not.
    previous: HashSet<Object>,
}

fn objects(d: &Desired) -> HashSet<Object> {
    d.routes
        .iter()
        .map(|r| Object::Route(*r))
        .chain(d.rules.iter().map(|r| Object::Rule(*r)))
        .chain(d.proxies.iter().map(|n| Object::Neigh(*n)))
        .collect()
}

impl<N: Netlink> Reconciler<N> {
    /// A reconciler that has not reconciled yet.
    pub fn new(netlink: N) -> Self {
        Self {
            netlink,
            previous: HashSet::new(),
        }
    }

    /// The netlink backend.
    pub fn netlink(&mut self) -> &mut N {
        &mut self.netlink
    }

    fn observe(&mut self) -> Result<Observed, NetlinkError> {
        Ok(Observed {
            routes: self.netlink.routes()?,
            rules: self.netlink.rules()?,
            proxies: self.netlink.proxies()?,
        })
    }

    /// Brings the kernel to the state wanted for `endpoints` and `enis`,
    /// counting the result in `stats`.
    pub fn reconcile(
        &mut self,
        endpoints: &[Endpoint],
        enis: &[Eni],
        stats: &Stats,
    ) -> Result<Outcome, NetlinkError> {
        let result = self.run(endpoints, enis, stats);
        let ok = matches!(&result, Ok(o) if o.errors.is_empty());
        if ok {
            stats.success.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.error.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn run(
        &mut self,
        endpoints: &[Endpoint],
        enis: &[Eni],
        stats: &Stats,
    ) -> Result<Outcome, NetlinkError> {
        let links = self.netlink.links()?;
        let desired = desired::build(endpoints, enis, &links);
        let plan = diff::plan(&desired, &self.observe()?);
        let mut outcome = Outcome::default();
        for change in &plan.changes {
            match self.netlink.apply(change) {
                Ok(()) => {
                    outcome.applied += 1;
                    let is_fix = matches!(change, Change::Add(_) | Change::Replace(_));
                    if is_fix && self.previous.contains(change.object()) {
                        outcome.repairs += 1;
                        stats.repairs[kind_index(change.object().kind())]
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(object = ?change.object(), "repaired");
                    }
                }
                Err(e) if already_gone(change, &e) => {
                    // The kernel was first: deleting a pod's link takes its
                    // routes and neighbour entries with it.
                    outcome.applied += 1;
                    tracing::debug!(object = ?change.object(), "already gone");
                }
                Err(e) if link_gone(change, &e) => {
                    // The pod's link went away since it was observed (the pod is being
                    // deleted): nothing to add it to. Its endpoint's removal, or the next
                    // round, settles it; `podnetctl routes` shows it missing meanwhile.
                    tracing::debug!(object = ?change.object(), "link gone before the add");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "routing change failed");
                    outcome.errors.push(e.to_string());
                }
            }
        }
        outcome.statuses = if plan.changes.is_empty() {
            plan.statuses
        } else {
            diff::plan(&desired, &self.observe()?).statuses
        };
        self.previous = objects(&desired);
        outcome.desired = desired;
        outcome.links = links;
        Ok(outcome)
    }
}

/// Whether a failed delete found nothing to delete: the kernel answers
/// `ESRCH` for a missing route (`fib_table_delete`) and `ENOENT` for a
/// missing rule (`fib_nl_delrule`) or proxy entry (`pneigh_delete`), 6.x.
fn already_gone(change: &Change, e: &NetlinkError) -> bool {
    matches!(change, Change::Delete(_))
        && matches!(e, NetlinkError::Kernel { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)))
}

/// Whether a failed add or replace found its link gone: the kernel answers `ENODEV` for a
/// route or neighbour entry on an interface that no longer exists (`fib_create_info`,
/// `pneigh_lookup` through `__dev_get_by_index`), 6.x.
fn link_gone(change: &Change, e: &NetlinkError) -> bool {
    matches!(change, Change::Add(_) | Change::Replace(_))
        && matches!(e, NetlinkError::Kernel { source, .. }
            if source.raw_os_error() == Some(libc::ENODEV))
}

#[cfg(test)]
mod tests {
    use super::super::desired::tests::{endpoint, enis, links};
    use super::*;
    use crate::routing::fake::FakeKernel;

    #[test]
    fn installs_then_repairs_and_counts_by_kind() {
        let stats = Stats::default();
        let mut r = Reconciler::new(FakeKernel {
            links: links(),
            ..FakeKernel::default()
        });
        let eps = vec![endpoint("a", "10.0.1.10", Some("vpod0"))];
        let first = r.reconcile(&eps, &enis(), &stats).unwrap();
        // 2 routes per family for eni1 (it has IPv6), 2 for eni2; per
        // family of the pod's addresses: 1 host route, 2 rules, 1 proxy.
        assert_eq!(first.applied, 4 + 2 + 2 * 4);
        assert_eq!(first.repairs, 0);
        assert!(first.statuses.iter().all(|s| s.state == State::Ok));

        let again = r.reconcile(&eps, &enis(), &stats).unwrap();
        assert_eq!((again.applied, again.repairs), (0, 0));

        // Someone deletes a rule and both proxy entries (ARP, NDP) by hand.
        r.netlink().observed.rules.pop();
        r.netlink().observed.proxies.clear();
        let fixed = r.reconcile(&eps, &enis(), &stats).unwrap();
        assert_eq!((fixed.applied, fixed.repairs), (3, 3));
        assert_eq!(stats.repairs(Kind::Rule), 1);
        assert_eq!(stats.repairs(Kind::Neigh), 2);
        assert_eq!(stats.repairs(Kind::Route), 0);

        // The pod goes: its objects of both families are deleted, which is
        // no repair.
        let gone = r.reconcile(&[], &enis(), &stats).unwrap();
        assert_eq!((gone.applied, gone.repairs), (2 * 4, 0));
        assert_eq!(stats.success.load(Ordering::Relaxed), 4);
        assert_eq!(stats.error.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn deleting_what_the_kernel_already_removed_is_no_error() {
        let stats = Stats::default();
        let mut r = Reconciler::new(FakeKernel {
            links: links(),
            ..FakeKernel::default()
        });
        let eps = vec![endpoint("a", "10.0.1.10", Some("vpod0"))];
        r.reconcile(&eps, &enis(), &stats).unwrap();
        // The pod's veth goes between observing and deleting its route.
        r.netlink().deletes_race_link_removal = true;
        let gone = r.reconcile(&[], &enis(), &stats).unwrap();
        assert_eq!(gone.errors, Vec::<String>::new());
        assert_eq!(gone.applied, 2 * 4);
        assert!(r
            .netlink()
            .observed
            .routes
            .iter()
            .all(|o| o.route.table != 254));
        assert_eq!(stats.success.load(Ordering::Relaxed), 2);
        assert_eq!(stats.error.load(Ordering::Relaxed), 0);
        // A delete that fails for another reason still is one.
        let e = NetlinkError::Kernel {
            what: "delete rule".into(),
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        let rule = Change::Delete(Object::Rule(desired::Rule {
            priority: 512,
            src: None,
            dst: None,
            table: 254,
        }));
        assert!(!already_gone(&rule, &e));
        let missing = NetlinkError::Kernel {
            what: "delete rule".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert!(already_gone(&rule, &missing));
        let add = Change::Add(Object::Rule(desired::Rule {
            priority: 512,
            src: None,
            dst: None,
            table: 254,
        }));
        assert!(!already_gone(&add, &missing));
        let no_device = NetlinkError::Kernel {
            what: "add route".into(),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        };
        assert!(link_gone(&add, &no_device));
        assert!(!link_gone(&rule, &no_device));
        assert!(!link_gone(&add, &missing));
    }

    #[test]
    fn a_failed_change_counts_as_an_error_and_the_rest_still_applies() {
        let stats = Stats::default();
        let mut r = Reconciler::new(FakeKernel {
            links: links(),
            fail_rules: true,
            ..FakeKernel::default()
        });
        let eps = vec![endpoint("a", "10.0.1.10", Some("vpod0"))];
        let o = r.reconcile(&eps, &enis(), &stats).unwrap();
        assert_eq!(o.errors.len(), 4);
        assert_eq!(o.applied, 10);
        let missing = o
            .statuses
            .iter()
            .filter(|s| s.state == State::Missing)
            .count();
        assert_eq!(missing, 4);
        assert_eq!(stats.error.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn conflicts_are_flagged_for_an_early_recheck() {
        let stats = Stats::default();
        let mut r = Reconciler::new(FakeKernel {
            links: links(),
            ..FakeKernel::default()
        });
        let eps = vec![endpoint("a", "10.0.1.10", Some("vpod0"))];
        let mut o = r.reconcile(&eps, &enis(), &stats).unwrap();
        assert!(!o.has_conflicts());
        o.statuses[0].state = State::Conflict;
        assert!(o.has_conflicts());
    }
}
