//! One reconcile: observe, diff, apply, count.

use std::{
    collections::{BTreeSet, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use super::{
    desired::{self, Desired, Link, MAIN_TABLE, RTPROT_PODNET},
    diff::{self, Change, Kind, Object, Observed, ObservedProxy, ObservedRule, State, Status},
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
    /// The kernel's links at the time (shared with what the reconciler keeps
    /// between passes: a pass over changes copies none of the node's links).
    pub links: Arc<Vec<Link>>,
    /// Desired versus actual after the changes.
    pub statuses: Vec<Status>,
    /// Changes applied.
    pub applied: usize,
    /// Of which repairs of drift.
    pub repairs: usize,
    /// Changes that failed.
    pub errors: Vec<String>,
    /// The changes the kernel accepted, in order: each comes back as a
    /// notification, which is no drift.
    pub changed: Vec<Change>,
}

impl Outcome {
    /// Whether a foreign object holds the place of a desired one. Its removal
    /// sends no notification podnet listens to (foreign route protocol), so
    /// the loop looks again soon instead of at the next full resync.
    pub fn has_conflicts(&self) -> bool {
        self.statuses.iter().any(|s| s.state == State::Conflict)
    }
}

/// A link appeared, changed or went, as a notification told it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// A new link or new attributes of one.
    Up(Link),
    /// The link with this index is gone.
    Gone(u32),
}

/// What the reconciler knows of the kernel between full passes: the last
/// full pass's observation, kept current with the changes podnet applied
/// since and the link notifications. Any other change to routes, rules or
/// proxy entries arrives as a notification that makes the next pass a full
/// one, so this is never relied on past one.
#[derive(Debug)]
struct Known {
    links: Arc<Vec<Link>>,
    rules: Vec<ObservedRule>,
    proxies: Vec<ObservedProxy>,
    statuses: Vec<Status>,
}

impl Known {
    /// Takes in what a pass over changes did: the statuses of the objects
    /// it planned (`planned`, as they stood before), the objects that stopped
    /// being desired, and the changes the kernel accepted.
    fn settle(&mut self, planned: &[Status], removed: &[Object], done: &[Change]) {
        let accepted: HashSet<&Object> = done.iter().map(Change::object).collect();
        let replaced: HashSet<Object> = planned
            .iter()
            .map(|s| s.object)
            .chain(removed.iter().copied())
            .collect();
        self.statuses.retain(|s| !replaced.contains(&s.object));
        self.statuses.extend(planned.iter().filter_map(|s| {
            match (s.state, accepted.contains(&s.object)) {
                (State::Stale, true) => None,
                (State::Missing | State::Differs, true) => Some(Status {
                    object: s.object,
                    actual: None,
                    state: State::Ok,
                }),
                _ => Some(*s),
            }
        }));
        for change in done {
            match *change {
                Change::Add(Object::Rule(rule)) => self.rules.push(ObservedRule {
                    rule,
                    protocol: RTPROT_PODNET,
                }),
                Change::Delete(Object::Rule(rule)) => self.rules.retain(|o| o.rule != rule),
                Change::Add(Object::Neigh(proxy)) => self.proxies.push(ObservedProxy {
                    proxy,
                    protocol: RTPROT_PODNET,
                }),
                Change::Delete(Object::Neigh(proxy)) => {
                    self.proxies.retain(|o| o.proxy != proxy);
                }
                _ => {}
            }
        }
    }
}

/// The part of `desired` a pass over changes compares with the kernel: every
/// main-table route through the interfaces `oifs`, and the rules and proxy
/// entries newly desired (`added`).
fn concerned(desired: &Desired, added: &HashSet<Object>, oifs: &BTreeSet<u32>) -> Desired {
    Desired {
        routes: desired
            .routes
            .iter()
            .filter(|r| r.table == MAIN_TABLE && oifs.contains(&r.oif))
            .copied()
            .collect(),
        rules: desired
            .rules
            .iter()
            .filter(|r| added.contains(&Object::Rule(**r)))
            .copied()
            .collect(),
        proxies: desired
            .proxies
            .iter()
            .filter(|p| added.contains(&Object::Neigh(**p)))
            .copied()
            .collect(),
        ..Desired::default()
    }
}

/// Reconciles routing state through a [`Netlink`].
pub struct Reconciler<N> {
    netlink: N,
    /// Objects desired at the previous reconcile: putting one of these back is
    /// a repair; installing a newly desired one is not.
    previous: HashSet<Object>,
    /// Set by a full pass that ended without errors or conflicts; what a
    /// pass over changes starts from.
    known: Option<Known>,
}

fn objects(d: &Desired) -> HashSet<Object> {
    d.routes
        .iter()
        .map(|r| Object::Route(*r))
        .chain(d.rules.iter().map(|r| Object::Rule(*r)))
        .chain(d.proxies.iter().map(|n| Object::Neigh(*n)))
        .collect()
}

/// What applying a list of changes did.
#[derive(Debug, Default)]
struct Applied {
    count: usize,
    repairs: usize,
    errors: Vec<String>,
    /// Accepted changes.
    done: Vec<Change>,
    /// An add found its place taken (`EEXIST`): something the pass did not
    /// look at holds it.
    place_taken: bool,
}

impl<N: Netlink> Reconciler<N> {
    /// A reconciler that has not reconciled yet.
    pub fn new(netlink: N) -> Self {
        Self {
            netlink,
            previous: HashSet::new(),
            known: None,
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
    /// counting the result in `stats`: a full pass, which observes every
    /// link, route, rule and proxy entry of the namespace.
    pub fn reconcile(
        &mut self,
        endpoints: &[Endpoint],
        enis: &[Eni],
        stats: &Stats,
    ) -> Result<Outcome, NetlinkError> {
        let result = self.run(endpoints, enis, stats);
        count(stats, matches!(&result, Ok(o) if o.errors.is_empty()));
        result
    }

    /// Keeps the known links current with a notification.
    pub fn note_link(&mut self, change: LinkChange) {
        let Some(known) = self.known.as_mut() else {
            return;
        };
        // Copied only while a published outcome still holds the list.
        let links = Arc::make_mut(&mut known.links);
        match change {
            LinkChange::Up(link) => match links.iter_mut().find(|l| l.index == link.index) {
                Some(old) => *old = link,
                None => links.push(link),
            },
            LinkChange::Gone(index) => links.retain(|l| l.index != index),
        }
    }

    /// Brings the kernel to the state wanted for `endpoints` and `enis` by
    /// looking only at what changed since the last pass: the objects that
    /// became desired or stopped being desired, and the routes of the
    /// interfaces they concern (one filtered dump each). `Ok(None)` when
    /// this cannot decide alone and a full pass must run: no clean full pass
    /// before, a route outside the main table (ENI tables change with ENIs),
    /// one address moving between interfaces, a conflict, or an add whose
    /// place something else holds. Counts in `stats` only when it decides.
    pub fn reconcile_changes(
        &mut self,
        endpoints: &[Endpoint],
        enis: &[Eni],
        stats: &Stats,
    ) -> Result<Option<Outcome>, NetlinkError> {
        let result = self.run_changes(endpoints, enis, stats);
        if let Ok(Some(o)) = &result {
            count(stats, o.errors.is_empty());
        }
        result
    }

    fn run_changes(
        &mut self,
        endpoints: &[Endpoint],
        enis: &[Eni],
        stats: &Stats,
    ) -> Result<Option<Outcome>, NetlinkError> {
        let Some(known) = self.known.as_ref() else {
            return Ok(None);
        };
        let desired = desired::build(endpoints, enis, &known.links);
        let wanted = objects(&desired);
        let added: HashSet<Object> = wanted.difference(&self.previous).copied().collect();
        let removed: Vec<Object> = self.previous.difference(&wanted).copied().collect();
        let Some(oifs) = main_table_interfaces(&added, &removed) else {
            return Ok(None);
        };
        let mut observed = Observed::default();
        for oif in &oifs {
            observed
                .routes
                .extend(self.netlink.routes_via(MAIN_TABLE, *oif)?);
        }
        let concerned = concerned(&desired, &added, &oifs);
        observed.rules = known
            .rules
            .iter()
            .filter(|o| concerned.rules.contains(&o.rule))
            .copied()
            .collect();
        observed.proxies = known
            .proxies
            .iter()
            .filter(|o| concerned.proxies.contains(&o.proxy))
            .copied()
            .collect();
        let plan = diff::plan(&concerned, &observed);
        if plan.statuses.iter().any(|s| s.state == State::Conflict) {
            return Ok(None);
        }
        // What stopped being desired goes, unless it was never podnet's.
        let foreign: HashSet<Object> = if removed.is_empty() {
            HashSet::new()
        } else {
            known
                .statuses
                .iter()
                .filter(|s| matches!(s.state, State::Provided | State::Conflict))
                .map(|s| s.object)
                .collect()
        };
        let mut changes = plan.changes.clone();
        changes.extend(
            removed
                .iter()
                .filter(|o| !foreign.contains(o))
                .map(|o| Change::Delete(*o)),
        );
        let applied = self.apply_all(&changes, stats);
        if applied.place_taken {
            return Ok(None);
        }
        let Some(known) = self.known.as_mut() else {
            return Ok(None);
        };
        known.settle(&plan.statuses, &removed, &applied.done);
        self.previous = wanted;
        Ok(Some(Outcome {
            desired,
            links: Arc::clone(&known.links),
            statuses: known.statuses.clone(),
            applied: applied.count,
            repairs: applied.repairs,
            errors: applied.errors,
            changed: applied.done,
        }))
    }

    fn run(
        &mut self,
        endpoints: &[Endpoint],
        enis: &[Eni],
        stats: &Stats,
    ) -> Result<Outcome, NetlinkError> {
        self.known = None;
        let links = Arc::new(self.netlink.links()?);
        let desired = desired::build(endpoints, enis, &links);
        let mut observed = self.observe()?;
        let plan = diff::plan(&desired, &observed);
        let applied = self.apply_all(&plan.changes, stats);
        let statuses = if plan.changes.is_empty() {
            plan.statuses
        } else {
            observed = self.observe()?;
            diff::plan(&desired, &observed).statuses
        };
        self.previous = objects(&desired);
        let outcome = Outcome {
            desired,
            links,
            statuses,
            applied: applied.count,
            repairs: applied.repairs,
            errors: applied.errors,
            changed: applied.done,
        };
        if outcome.errors.is_empty() && !outcome.has_conflicts() {
            self.known = Some(Known {
                links: Arc::clone(&outcome.links),
                rules: observed.rules,
                proxies: observed.proxies,
                statuses: outcome.statuses.clone(),
            });
        }
        Ok(outcome)
    }

    /// Applies `changes` in order, counting repairs in `stats`.
    fn apply_all(&mut self, changes: &[Change], stats: &Stats) -> Applied {
        let mut applied = Applied::default();
        for change in changes {
            match self.netlink.apply(change) {
                Ok(()) => {
                    applied.count += 1;
                    applied.done.push(*change);
                    let is_fix = matches!(change, Change::Add(_) | Change::Replace(_));
                    if is_fix && self.previous.contains(change.object()) {
                        applied.repairs += 1;
                        stats.repairs[kind_index(change.object().kind())]
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(object = ?change.object(), "repaired");
                    }
                }
                Err(e) if already_gone(change, &e) => {
                    // The kernel was first: deleting a pod's link takes its
                    // routes and neighbour entries with it.
                    applied.count += 1;
                    tracing::debug!(object = ?change.object(), "already gone");
                }
                Err(e) if link_gone(change, &e) => {
                    // The pod's link went away since it was observed (the pod is being
                    // deleted): nothing to add it to. Its endpoint's removal, or the next
                    // round, settles it; `podnetctl routes` shows it missing meanwhile.
                    tracing::debug!(object = ?change.object(), "link gone before the add");
                }
                Err(e) if place_taken(change, &e) => {
                    tracing::debug!(object = ?change.object(), "place taken");
                    applied.place_taken = true;
                    applied.errors.push(e.to_string());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "routing change failed");
                    applied.errors.push(e.to_string());
                }
            }
        }
        applied
    }
}

/// Counts one pass that decided, by whether everything it planned applied.
fn count(stats: &Stats, ok: bool) {
    if ok {
        stats.success.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.error.fetch_add(1, Ordering::Relaxed);
    }
}

/// The interfaces whose main-table routes a pass over `added` and `removed`
/// objects must look at, or `None` when such a pass cannot decide alone: a
/// route outside the main table, or an address whose route moves (removed
/// and added under one key).
fn main_table_interfaces(added: &HashSet<Object>, removed: &[Object]) -> Option<BTreeSet<u32>> {
    let mut oifs = BTreeSet::new();
    let mut removed_keys = HashSet::new();
    for o in removed {
        if let Object::Route(r) = o {
            if r.table != MAIN_TABLE {
                return None;
            }
            removed_keys.insert(r.key());
        }
    }
    for o in added {
        if let Object::Route(r) = o {
            if r.table != MAIN_TABLE || removed_keys.contains(&r.key()) {
                return None;
            }
            oifs.insert(r.oif);
        }
    }
    Some(oifs)
}

/// Whether a failed add found its place held (`EEXIST`, with `NLM_F_EXCL`):
/// by a route or rule the pass did not observe.
fn place_taken(change: &Change, e: &NetlinkError) -> bool {
    matches!(change, Change::Add(_))
        && matches!(e, NetlinkError::Kernel { source, .. }
            if source.raw_os_error() == Some(libc::EEXIST))
}

/// Whether a failed delete found nothing to delete: the kernel answers
/// `ESRCH` for a missing route (`fib_table_delete`), `ENOENT` for a
/// missing rule (`fib_nl_delrule`) or proxy entry (`pneigh_delete`), and
/// `ENODEV` for an entry on a link that is gone, 6.x.
fn already_gone(change: &Change, e: &NetlinkError) -> bool {
    matches!(change, Change::Delete(_))
        && matches!(e, NetlinkError::Kernel { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ESRCH | libc::ENOENT | libc::ENODEV)))
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
    use super::super::diff::ObservedRoute;
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

    /// Statuses in a stable order, for comparing two passes.
    fn sorted(mut statuses: Vec<Status>) -> Vec<Status> {
        statuses.sort_by_key(|s| (s.object, s.state));
        statuses
    }

    /// A reconciler after one clean full pass for `eps`.
    fn after_full_pass(eps: &[Endpoint], stats: &Stats) -> Reconciler<FakeKernel> {
        let mut r = Reconciler::new(FakeKernel {
            links: links(),
            ..FakeKernel::default()
        });
        r.reconcile(eps, &enis(), stats).unwrap();
        r
    }

    #[test]
    fn a_pass_over_changes_leaves_what_a_full_pass_would() {
        let stats = Stats::default();
        let a = endpoint("a", "10.0.1.10", Some("vpod0"));
        let b = endpoint("b", "10.0.2.10", Some("vpod1"));
        let mut r = after_full_pass(std::slice::from_ref(&a), &stats);
        // A full pass that changed something dumps every route twice.
        assert_eq!(r.netlink().route_dumps, 2);

        // Pod b arrives: its host route per family, two rules per family,
        // its proxy entry (eni2 has no IPv6 subnet: IPv4 rules and proxy only).
        let both = [a.clone(), b];
        let o = r
            .reconcile_changes(&both, &enis(), &stats)
            .unwrap()
            .unwrap();
        assert_eq!((o.applied, o.repairs, o.errors.len()), (5, 0, 0));
        assert_eq!(o.changed.len(), 5);
        // One filtered dump (pod b's interface), no dump of every route.
        assert_eq!(r.netlink().route_dumps, 2);
        assert_eq!(r.netlink().filtered_route_dumps, 1);
        // A full pass now finds nothing to do, and agrees on every status.
        let full = r.reconcile(&both, &enis(), &stats).unwrap();
        assert_eq!(full.applied, 0);
        assert_eq!(sorted(o.statuses), sorted(full.statuses));

        // Pod b goes: its five objects are deleted, again as a full pass would.
        let o = r
            .reconcile_changes(std::slice::from_ref(&a), &enis(), &stats)
            .unwrap()
            .unwrap();
        assert_eq!((o.applied, o.errors.len()), (5, 0));
        assert!(o.changed.iter().all(|c| matches!(c, Change::Delete(_))));
        let full = r.reconcile(&[a], &enis(), &stats).unwrap();
        assert_eq!(full.applied, 0);
        assert_eq!(sorted(o.statuses), sorted(full.statuses));
        assert_eq!(stats.error.load(Ordering::Relaxed), 0);
        assert_eq!(stats.success.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_route_another_plugin_installed_is_provided_and_never_deleted() {
        let stats = Stats::default();
        let mut r = after_full_pass(&[], &stats);
        // ptp installed the pod's host route on its veth before the ADD.
        let ptp = ObservedRoute {
            route: desired::Route {
                table: MAIN_TABLE,
                dst: crate::net::Cidr::host("10.9.0.1".parse().unwrap()),
                oif: 10,
                gateway: None,
                scope_link: true,
            },
            protocol: 3,
        };
        r.netlink().observed.routes.push(ptp);
        let pod = [endpoint("p", "10.9.0.1", Some("vpod0"))];
        let o = r.reconcile_changes(&pod, &enis(), &stats).unwrap().unwrap();
        // Only the IPv6 host route is podnet's to add.
        assert_eq!(o.applied, 1);
        let provided: Vec<_> = o
            .statuses
            .iter()
            .filter(|s| s.state == State::Provided)
            .collect();
        assert_eq!(provided.len(), 1);
        // The pod goes: podnet deletes its own route, not ptp's.
        let o = r.reconcile_changes(&[], &enis(), &stats).unwrap().unwrap();
        assert_eq!(o.changed.len(), 1);
        let main: Vec<_> = r
            .netlink()
            .observed
            .routes
            .iter()
            .filter(|o| o.route.table == MAIN_TABLE)
            .copied()
            .collect();
        assert_eq!(main, vec![ptp]);
    }

    #[test]
    fn what_a_pass_over_changes_cannot_decide_goes_to_a_full_pass() {
        let stats = Stats::default();
        let a = endpoint("a", "10.0.1.10", Some("vpod0"));
        // No full pass yet.
        let mut fresh = Reconciler::new(FakeKernel {
            links: links(),
            ..FakeKernel::default()
        });
        assert!(fresh
            .reconcile_changes(std::slice::from_ref(&a), &enis(), &stats)
            .unwrap()
            .is_none());

        // A foreign route holds the pod's place on another interface: only
        // the kernel's EEXIST tells; the full pass reports the conflict.
        let mut r = after_full_pass(&[], &stats);
        r.netlink().observed.routes.push(ObservedRoute {
            route: desired::Route {
                table: MAIN_TABLE,
                dst: crate::net::Cidr::host("10.9.0.1".parse().unwrap()),
                oif: 11,
                gateway: None,
                scope_link: true,
            },
            protocol: 3,
        });
        let pod = [endpoint("p", "10.9.0.1", Some("vpod0"))];
        assert!(r
            .reconcile_changes(&pod, &enis(), &stats)
            .unwrap()
            .is_none());
        let full = r.reconcile(&pod, &enis(), &stats).unwrap();
        assert!(full.has_conflicts());
        // After a pass with a conflict, the next is a full one too.
        assert!(r
            .reconcile_changes(&pod, &enis(), &stats)
            .unwrap()
            .is_none());

        // An address moving to another interface.
        let mut r = after_full_pass(std::slice::from_ref(&a), &stats);
        let moved = [endpoint("a", "10.0.1.10", Some("vpod1"))];
        assert!(r
            .reconcile_changes(&moved, &enis(), &stats)
            .unwrap()
            .is_none());

        // An ENI link appearing changes ENI tables.
        let mut r = after_full_pass(std::slice::from_ref(&a), &stats);
        r.note_link(LinkChange::Gone(5));
        assert!(r
            .reconcile_changes(std::slice::from_ref(&a), &enis(), &stats)
            .unwrap()
            .is_none());
    }

    #[test]
    fn link_notifications_keep_the_known_links_current() {
        let stats = Stats::default();
        let mut r = after_full_pass(&[], &stats);
        let pod = [endpoint("n", "10.9.0.2", Some("vnew"))];
        // The interface is not there yet: nothing to route, a problem to show
        // beside eni3's (no link).
        let o = r.reconcile_changes(&pod, &enis(), &stats).unwrap().unwrap();
        assert_eq!((o.applied, o.desired.problems.len()), (0, 2));
        r.note_link(LinkChange::Up(Link {
            index: 30,
            name: "vnew".into(),
            mac: None,
            master: None,
        }));
        let o = r.reconcile_changes(&pod, &enis(), &stats).unwrap().unwrap();
        assert_eq!((o.applied, o.desired.problems.len()), (2, 1));
        assert!(r
            .netlink()
            .observed
            .routes
            .iter()
            .filter(|o| o.route.oif == 30)
            .all(|o| o.protocol == RTPROT_PODNET));
        assert_eq!(r.netlink().route_dumps, 2);
    }
}
