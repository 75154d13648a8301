//! Desired versus observed: which changes bring the kernel to the desired
//! state, touching only what podnet owns.
//!
//! Ownership: routes and proxy entries with protocol [`RTPROT_PODNET`]; rules
//! with that protocol *and* a priority in [`OWNED_PRIORITIES`]. A foreign
//! object that holds the place of a desired one is reported as a conflict and
//! left alone; a foreign object anywhere else is invisible to the plan.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::desired::{Desired, ProxyNeigh, Route, Rule, OWNED_PRIORITIES, RTPROT_PODNET};
use crate::net::Cidr;

/// A route in the kernel and the protocol that installed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservedRoute {
    /// The route.
    pub route: Route,
    /// `rtm_protocol`.
    pub protocol: u8,
}

/// A rule in the kernel and its protocol (`FRA_PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservedRule {
    /// The rule.
    pub rule: Rule,
    /// `FRA_PROTOCOL`.
    pub protocol: u8,
}

/// A proxy-ARP entry in the kernel and its protocol (`NDA_PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservedProxy {
    /// The entry.
    pub proxy: ProxyNeigh,
    /// `NDA_PROTOCOL`.
    pub protocol: u8,
}

/// What the kernel has (IPv4 unicast routes of every table, IPv4 rules,
/// IPv4 proxy entries).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Routes.
    pub routes: Vec<ObservedRoute>,
    /// Rules.
    pub rules: Vec<ObservedRule>,
    /// Proxy entries.
    pub proxies: Vec<ObservedProxy>,
}

/// The kind of a kernel object, as the repair metric labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A policy rule.
    Rule,
    /// A route.
    Route,
    /// A neighbour (proxy-ARP) entry.
    Neigh,
}

impl Kind {
    /// All kinds, in label order.
    pub const ALL: [Kind; 3] = [Kind::Rule, Kind::Route, Kind::Neigh];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rule => "rule",
            Self::Route => "route",
            Self::Neigh => "neigh",
        }
    }
}

/// A kernel object podnet manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Object {
    /// A route.
    Route(Route),
    /// A rule.
    Rule(Rule),
    /// A proxy-ARP entry.
    Neigh(ProxyNeigh),
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Route(_) => Kind::Route,
            Self::Rule(_) => Kind::Rule,
            Self::Neigh(_) => Kind::Neigh,
        }
    }
}

/// One change to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Change {
    /// Add the object (it is missing).
    Add(Object),
    /// Replace an owned route whose next hop or scope differs.
    Replace(Object),
    /// Delete an owned object nobody wants any more.
    Delete(Object),
}

impl Change {
    /// The object changed.
    pub fn object(&self) -> &Object {
        match self {
            Self::Add(o) | Self::Replace(o) | Self::Delete(o) => o,
        }
    }
}

/// How a desired (or stale) object stands in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// In place as desired.
    Ok,
    /// Not in the kernel.
    Missing,
    /// Owned, but with another next hop or scope.
    Differs,
    /// A foreign object holds its place; left alone.
    Conflict,
    /// A foreign route holds its place and forwards the same way (same
    /// interface and next hop), e.g. the route a CNI interface plugin such as
    /// ptp installs for its pod: nothing to do, nothing to recheck.
    Provided,
    /// Owned, in the kernel, and no longer desired.
    Stale,
}

/// One line of desired versus actual.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The desired object, or the stale one.
    pub object: Object,
    /// What the kernel has in its place, when it differs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual: Option<Object>,
    /// How it stands.
    pub state: State,
}

/// The changes to apply and the state of every object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Changes, deletions last so that a replacement is in place first.
    pub changes: Vec<Change>,
    /// Every desired object and every stale owned one.
    pub statuses: Vec<Status>,
}

fn owned_rule(r: &ObservedRule) -> bool {
    r.protocol == RTPROT_PODNET && OWNED_PRIORITIES.contains(&r.rule.priority)
}

/// The first of `items` for each key.
fn first_by<'a, T, K: Eq + std::hash::Hash>(
    items: &'a [T],
    key: impl Fn(&'a T) -> &'a K,
) -> HashMap<&'a K, &'a T> {
    let mut map = HashMap::with_capacity(items.len());
    for item in items {
        map.entry(key(item)).or_insert(item);
    }
    map
}

/// Compares desired and observed state.
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut p = Plan::default();
    let mut deletes = Vec::new();
    let status = |p: &mut Plan, object, actual, state| {
        p.statuses.push(Status {
            object,
            actual,
            state,
        });
    };

    // Indexed by key: a node with a thousand pods has thousands of routes,
    // and each desired one is looked up.
    let mut by_key: HashMap<(u32, Cidr), Vec<&ObservedRoute>> = HashMap::new();
    for o in &observed.routes {
        by_key.entry(o.route.key()).or_default().push(o);
    }
    for want in &desired.routes {
        let same_key = by_key.get(&want.key()).map_or(&[][..], Vec::as_slice);
        let owned = same_key.iter().find(|o| o.protocol == RTPROT_PODNET);
        let object = Object::Route(*want);
        match (owned, same_key.first()) {
            (Some(o), _) if o.route == *want => status(&mut p, object, None, State::Ok),
            (Some(o), _) => {
                status(&mut p, object, Some(Object::Route(o.route)), State::Differs);
                p.changes.push(Change::Replace(object));
            }
            (None, Some(foreign)) => {
                let same_path =
                    foreign.route.oif == want.oif && foreign.route.gateway == want.gateway;
                let state = if same_path {
                    State::Provided
                } else {
                    State::Conflict
                };
                status(&mut p, object, Some(Object::Route(foreign.route)), state);
            }
            (None, None) => {
                status(&mut p, object, None, State::Missing);
                p.changes.push(Change::Add(object));
            }
        }
    }
    let desired_keys: HashSet<(u32, Cidr)> = desired.routes.iter().map(Route::key).collect();
    for o in observed
        .routes
        .iter()
        .filter(|o| o.protocol == RTPROT_PODNET)
    {
        if !desired_keys.contains(&o.route.key()) {
            let object = Object::Route(o.route);
            status(&mut p, object, None, State::Stale);
            deletes.push(Change::Delete(object));
        }
    }

    let rules = first_by(&observed.rules, |o| &o.rule);
    for want in &desired.rules {
        let object = Object::Rule(*want);
        let found = rules.get(want);
        match found {
            Some(o) if owned_rule(o) => status(&mut p, object, None, State::Ok),
            Some(_) => status(&mut p, object, Some(object), State::Conflict),
            None => {
                status(&mut p, object, None, State::Missing);
                p.changes.push(Change::Add(object));
            }
        }
    }
    for o in observed.rules.iter().filter(|o| owned_rule(o)) {
        if !desired.rules.contains(&o.rule) {
            let object = Object::Rule(o.rule);
            status(&mut p, object, None, State::Stale);
            deletes.push(Change::Delete(object));
        }
    }

    let proxies = first_by(&observed.proxies, |o| &o.proxy);
    for want in &desired.proxies {
        let object = Object::Neigh(*want);
        match proxies.get(want) {
            Some(o) if o.protocol == RTPROT_PODNET => status(&mut p, object, None, State::Ok),
            Some(_) => status(&mut p, object, Some(object), State::Conflict),
            None => {
                status(&mut p, object, None, State::Missing);
                p.changes.push(Change::Add(object));
            }
        }
    }
    for o in observed
        .proxies
        .iter()
        .filter(|o| o.protocol == RTPROT_PODNET)
    {
        if !desired.proxies.contains(&o.proxy) {
            let object = Object::Neigh(o.proxy);
            status(&mut p, object, None, State::Stale);
            deletes.push(Change::Delete(object));
        }
    }
    p.changes.extend(deletes);
    p
}

#[cfg(test)]
mod tests {
    use super::super::desired::{
        self,
        tests::{endpoint, enis, links},
        MAIN_TABLE, PRIORITY_FROM_POD,
    };
    use super::*;

    const FOREIGN: u8 = 3; // RTPROT_BOOT, what `ip route add` uses

    fn desired() -> Desired {
        desired::build(
            &[
                endpoint("a", "10.0.1.10", Some("vpod0")),
                endpoint("b", "10.0.2.10", Some("vpod1")),
            ],
            &enis(),
            &links(),
        )
    }

    /// The kernel after a successful reconcile, plus foreign objects.
    fn converged(d: &Desired) -> Observed {
        let mut o = Observed {
            routes: d
                .routes
                .iter()
                .map(|r| ObservedRoute {
                    route: *r,
                    protocol: RTPROT_PODNET,
                })
                .collect(),
            rules: d
                .rules
                .iter()
                .map(|r| ObservedRule {
                    rule: *r,
                    protocol: RTPROT_PODNET,
                })
                .collect(),
            proxies: d
                .proxies
                .iter()
                .map(|n| ObservedProxy {
                    proxy: *n,
                    protocol: RTPROT_PODNET,
                })
                .collect(),
        };
        // A foreign rule at priority 300, a foreign rule inside the owned
        // range, a foreign route in an ENI table and one in main.
        o.rules.push(ObservedRule {
            rule: Rule {
                priority: 300,
                src: Some("10.0.1.99/32".parse().unwrap()),
                dst: None,
                table: 101,
            },
            protocol: FOREIGN,
        });
        o.rules.push(ObservedRule {
            rule: Rule {
                priority: 1000,
                src: None,
                dst: Some("10.7.0.0/16".parse().unwrap()),
                table: MAIN_TABLE,
            },
            protocol: FOREIGN,
        });
        for (table, dst) in [(101, "10.0.77.0/24"), (MAIN_TABLE, "192.0.2.0/24")] {
            o.routes.push(ObservedRoute {
                route: Route {
                    table,
                    dst: dst.parse().unwrap(),
                    oif: 5,
                    gateway: None,
                    scope_link: true,
                },
                protocol: FOREIGN,
            });
        }
        o
    }

    #[test]
    fn empty_kernel_gets_everything() {
        let d = desired();
        let p = plan(&d, &Observed::default());
        assert_eq!(
            p.changes.len(),
            d.routes.len() + d.rules.len() + d.proxies.len()
        );
        assert!(p.changes.iter().all(|c| matches!(c, Change::Add(_))));
        assert!(p.statuses.iter().all(|s| s.state == State::Missing));
    }

    #[test]
    fn converged_kernel_needs_nothing_and_foreign_objects_are_invisible() {
        let d = desired();
        let p = plan(&d, &converged(&d));
        assert_eq!(p.changes, vec![]);
        assert_eq!(
            p.statuses.len(),
            d.routes.len() + d.rules.len() + d.proxies.len()
        );
        assert!(p.statuses.iter().all(|s| s.state == State::Ok));
    }

    #[test]
    fn deleted_objects_are_repaired() {
        let d = desired();
        let mut o = converged(&d);
        let rule = *d
            .rules
            .iter()
            .find(|r| r.priority == PRIORITY_FROM_POD)
            .unwrap();
        o.rules.retain(|r| r.rule != rule);
        let route = *d.routes.iter().find(|r| r.table == 101).unwrap();
        o.routes.retain(|r| r.route != route);
        let p = plan(&d, &o);
        assert_eq!(
            p.changes,
            vec![
                Change::Add(Object::Route(route)),
                Change::Add(Object::Rule(rule))
            ]
        );
    }

    #[test]
    fn stale_owned_objects_go_and_changed_ones_are_replaced() {
        let d = desired();
        let mut o = converged(&d);
        let stale_rule = Rule {
            priority: PRIORITY_FROM_POD,
            src: Some("10.0.1.50/32".parse().unwrap()),
            dst: None,
            table: 101,
        };
        o.rules.push(ObservedRule {
            rule: stale_rule,
            protocol: RTPROT_PODNET,
        });
        // An owned rule outside the owned range is not ours to delete.
        o.rules.push(ObservedRule {
            rule: Rule {
                priority: 100,
                ..stale_rule
            },
            protocol: RTPROT_PODNET,
        });
        let host = o
            .routes
            .iter_mut()
            .find(|r| r.route.table == MAIN_TABLE && r.protocol == RTPROT_PODNET)
            .unwrap();
        let wanted = host.route;
        host.route.oif = 99;
        let p = plan(&d, &o);
        assert_eq!(
            p.changes,
            vec![
                Change::Replace(Object::Route(wanted)),
                Change::Delete(Object::Rule(stale_rule)),
            ]
        );
        let differs = p
            .statuses
            .iter()
            .find(|s| s.state == State::Differs)
            .unwrap();
        assert!(matches!(differs.actual, Some(Object::Route(r)) if r.oif == 99));
    }

    #[test]
    fn foreign_objects_in_our_place_are_conflicts_not_changes() {
        let d = desired();
        let mut o = converged(&d);
        for r in &mut o.routes {
            if r.route.table == 102 && r.route.gateway.is_some() {
                r.protocol = FOREIGN;
                r.route.gateway = Some("10.0.2.254".parse().unwrap());
            }
        }
        for r in &mut o.rules {
            if r.rule.table == 102 {
                r.protocol = FOREIGN;
            }
        }
        let p = plan(&d, &o);
        assert_eq!(p.changes, vec![]);
        let conflicts = p
            .statuses
            .iter()
            .filter(|s| s.state == State::Conflict)
            .count();
        assert_eq!(conflicts, 2);
    }

    #[test]
    fn a_foreign_route_forwarding_the_same_way_is_provided_not_a_conflict() {
        let d = desired();
        let mut o = converged(&d);
        // What ptp installs for its pod: the same /32 out of the same
        // interface, under its own protocol and scope.
        let host = d
            .routes
            .iter()
            .find(|r| r.gateway.is_none() && r.dst.prefix_len() == 32)
            .copied()
            .unwrap();
        for r in &mut o.routes {
            if r.route.key() == host.key() {
                r.protocol = FOREIGN;
                r.route.scope_link = !host.scope_link;
            }
        }
        let p = plan(&d, &o);
        assert_eq!(p.changes, vec![]);
        let states: Vec<State> = p
            .statuses
            .iter()
            .filter(|s| s.object == Object::Route(host))
            .map(|s| s.state)
            .collect();
        assert_eq!(states, [State::Provided]);
        assert!(!p.statuses.iter().any(|s| s.state == State::Conflict));
    }
}
