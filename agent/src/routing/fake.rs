//! The kernel's routing tables in memory, behind [`Netlink`]: the one fake
//! the reconciler's and the cleanup's unit tests run against.

use super::{
    desired::{Link, RTPROT_PODNET},
    diff::{Change, Object, Observed, ObservedProxy, ObservedRoute, ObservedRule},
    netlink::{Netlink, NetlinkError},
};

/// A kernel in memory: applies changes to its tables.
#[derive(Default)]
pub struct FakeKernel {
    /// The links a dump returns.
    pub links: Vec<Link>,
    /// The routes, rules and proxy entries the kernel holds.
    pub observed: Observed,
    /// Every change asked for, in order (failed ones included).
    pub applied: Vec<Change>,
    /// Adding a rule fails with EPERM.
    pub fail_rules: bool,
    /// Deletes find the object gone already (its link went first).
    pub deletes_race_link_removal: bool,
    /// Dumps of every route asked for.
    pub route_dumps: usize,
    /// Dumps of one interface's routes asked for.
    pub filtered_route_dumps: usize,
}

fn exists(what: &str) -> NetlinkError {
    NetlinkError::Kernel {
        what: what.into(),
        source: std::io::Error::from_raw_os_error(libc::EEXIST),
    }
}

impl Netlink for FakeKernel {
    fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        Ok(self.links.clone())
    }
    fn routes(&mut self) -> Result<Vec<ObservedRoute>, NetlinkError> {
        self.route_dumps += 1;
        Ok(self.observed.routes.clone())
    }
    fn routes_via(&mut self, table: u32, oif: u32) -> Result<Vec<ObservedRoute>, NetlinkError> {
        self.filtered_route_dumps += 1;
        Ok(self
            .observed
            .routes
            .iter()
            .filter(|r| r.route.table == table && r.route.oif == oif)
            .copied()
            .collect())
    }
    fn rules(&mut self) -> Result<Vec<ObservedRule>, NetlinkError> {
        Ok(self.observed.rules.clone())
    }
    fn proxies(&mut self) -> Result<Vec<ObservedProxy>, NetlinkError> {
        Ok(self.observed.proxies.clone())
    }
    fn apply(&mut self, change: &Change) -> Result<(), NetlinkError> {
        self.applied.push(*change);
        if self.deletes_race_link_removal {
            if let Change::Delete(Object::Route(route)) = *change {
                self.observed.routes.retain(|r| r.route != route);
                return Err(NetlinkError::Kernel {
                    what: "delete route".into(),
                    source: std::io::Error::from_raw_os_error(libc::ESRCH),
                });
            }
        }
        let o = &mut self.observed;
        match *change {
            Change::Add(Object::Rule(_)) if self.fail_rules => {
                return Err(NetlinkError::Kernel {
                    what: "add rule".into(),
                    source: std::io::Error::from_raw_os_error(libc::EPERM),
                })
            }
            // NLM_F_EXCL: the kernel refuses an add whose place is held.
            Change::Add(Object::Route(route))
                if o.routes.iter().any(|r| r.route.key() == route.key()) =>
            {
                return Err(exists("add route"));
            }
            Change::Add(Object::Rule(rule)) if o.rules.iter().any(|r| r.rule == rule) => {
                return Err(exists("add rule"));
            }
            Change::Add(Object::Route(route)) | Change::Replace(Object::Route(route)) => {
                o.routes.retain(|r| r.route.key() != route.key());
                o.routes.push(ObservedRoute {
                    route,
                    protocol: RTPROT_PODNET,
                });
            }
            Change::Delete(Object::Route(route)) => o.routes.retain(|r| r.route != route),
            Change::Add(Object::Rule(rule)) | Change::Replace(Object::Rule(rule)) => {
                o.rules.push(ObservedRule {
                    rule,
                    protocol: RTPROT_PODNET,
                });
            }
            Change::Delete(Object::Rule(rule)) => o.rules.retain(|r| r.rule != rule),
            Change::Add(Object::Neigh(proxy)) | Change::Replace(Object::Neigh(proxy)) => {
                o.proxies.push(ObservedProxy {
                    proxy,
                    protocol: RTPROT_PODNET,
                });
            }
            Change::Delete(Object::Neigh(proxy)) => o.proxies.retain(|p| p.proxy != proxy),
        }
        Ok(())
    }
}
