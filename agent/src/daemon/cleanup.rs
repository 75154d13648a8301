//! `podnet-agent --cleanup`: removes everything podnet installed on a node,
//! for uninstall, and nothing else.
//!
//! What podnet owns is marked (see [`crate::routing`]): the pin directory
//! (`--bpffs`; unpinning the links detaches the programs), classic tc filters
//! at podnet's priorities ([`crate::bpf::tc`], kernels without tcx), routes and
//! proxy-ARP entries with protocol [`RTPROT_PODNET`], rules with that protocol
//! inside [`crate::routing::desired::OWNED_PRIORITIES`], the
//! [`snat::CHAIN`] chain and its jump, the two CNI files it installs, and its
//! API socket. Every step is idempotent: a second run finds nothing to do.

use std::path::{Path, PathBuf};

use crate::{
    bpf::fs::BPFFS_ROOT,
    config::{defaults, AgentConfig},
    routing::{
        desired::{Desired, RTPROT_PODNET},
        diff::{self, Change, Object, Observed},
        netlink::{Netlink, NetlinkError, RtNetlink},
        snat,
    },
};

/// What `--cleanup` works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CleanupConfig {
    /// `--bpffs`.
    pub bpffs: PathBuf,
    /// `--socket`.
    pub socket: PathBuf,
    /// `--cni-conf-dir`.
    pub cni_conf_dir: PathBuf,
    /// `--cni-bin-dir`.
    pub cni_bin_dir: PathBuf,
}

impl From<&AgentConfig> for CleanupConfig {
    fn from(c: &AgentConfig) -> Self {
        Self {
            bpffs: c.bpffs.clone(),
            socket: c.socket.clone(),
            cni_conf_dir: c.cni_conf_dir.clone(),
            cni_bin_dir: c.cni_bin_dir.clone(),
        }
    }
}

/// What a cleanup removed, one line per thing, and what it failed to remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Things removed, human-readable.
    pub removed: Vec<String>,
    /// Steps that failed; the other steps still ran.
    pub errors: Vec<String>,
}

/// Runs every step in the calling thread's network namespace.
pub fn run(config: &CleanupConfig) -> CleanupReport {
    let mut report = CleanupReport::default();
    remove_pins(&config.bpffs, &mut report);
    let (removed, errors) = crate::bpf::tc::remove_all();
    report.removed.extend(removed);
    report.errors.extend(errors);
    match RtNetlink::open() {
        Ok(mut netlink) => remove_routing(&mut netlink, &mut report),
        Err(e) => report.errors.push(e.to_string()),
    }
    match snat::remove() {
        Ok(true) => report.removed.push(format!(
            "iptables nat chain {} and its POSTROUTING jump",
            snat::CHAIN
        )),
        Ok(false) => {}
        Err(e) => report.errors.push(e.to_string()),
    }
    for file in [
        config.cni_conf_dir.join(defaults::CNI_CONFLIST),
        config.cni_bin_dir.join(defaults::CNI_BINARY),
        config.socket.clone(),
    ] {
        remove_file(&file, &mut report);
    }
    report
}

/// Removes the pin directory. Refuses the bpffs root itself: podnet owns a
/// directory below it, never the whole filesystem.
fn remove_pins(dir: &Path, report: &mut CleanupReport) {
    if dir == Path::new(BPFFS_ROOT) || dir == Path::new("/") {
        report.errors.push(format!(
            "refusing to remove {}: not a podnet pin directory",
            dir.display()
        ));
        return;
    }
    if !dir.exists() {
        return;
    }
    let pins = count_files(dir);
    match std::fs::remove_dir_all(dir) {
        Ok(()) => report.removed.push(format!(
            "pin directory {} ({pins} pins; their links and programs are detached)",
            dir.display()
        )),
        Err(e) => report
            .errors
            .push(format!("removing {}: {e}", dir.display())),
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| {
                let path = e.path();
                if path.is_dir() {
                    count_files(&path)
                } else {
                    1
                }
            })
            .sum()
    })
}

/// Deletes every routing object podnet owns: the reconciler's own plan
/// towards "nothing desired", so ownership is decided in one place.
pub fn remove_routing(netlink: &mut impl Netlink, report: &mut CleanupReport) {
    let observed = match observe(netlink) {
        Ok(o) => o,
        Err(e) => {
            report.errors.push(e.to_string());
            return;
        }
    };
    let plan = diff::plan(&Desired::default(), &observed);
    for change in &plan.changes {
        let Change::Delete(object) = change else {
            continue;
        };
        match netlink.apply(change) {
            Ok(()) => report.removed.push(describe(object)),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
}

fn observe(netlink: &mut impl Netlink) -> Result<Observed, NetlinkError> {
    Ok(Observed {
        routes: netlink.routes()?,
        rules: netlink.rules()?,
        proxies: netlink.proxies()?,
    })
}

fn describe(object: &Object) -> String {
    match object {
        Object::Route(r) => format!(
            "route {} table {} dev index {} (protocol {RTPROT_PODNET:#x})",
            r.dst, r.table, r.oif
        ),
        Object::Rule(r) => format!(
            "rule priority {} from {} to {} lookup {}",
            r.priority,
            r.src.map_or_else(|| "all".to_owned(), |c| c.to_string()),
            r.dst.map_or_else(|| "all".to_owned(), |c| c.to_string()),
            r.table
        ),
        Object::Neigh(n) => format!("proxy-ARP entry {} dev index {}", n.addr, n.ifindex),
    }
}

fn remove_file(path: &Path, report: &mut CleanupReport) {
    match std::fs::remove_file(path) {
        Ok(()) => report.removed.push(format!("file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report
            .errors
            .push(format!("removing {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{
        desired::{ProxyNeigh, Route, Rule, PRIORITY_FROM_POD},
        diff::{Change, ObservedProxy, ObservedRoute, ObservedRule},
        fake::FakeKernel,
    };

    #[test]
    fn removes_owned_routing_objects_only_and_twice_is_a_no_op() {
        let route = Route {
            table: 101,
            dst: "10.0.1.10/32".parse().unwrap(),
            oif: 3,
            gateway: None,
            scope_link: true,
        };
        let rule = Rule {
            priority: PRIORITY_FROM_POD,
            src: Some("10.0.1.10/32".parse().unwrap()),
            dst: None,
            table: 101,
        };
        let proxy = ProxyNeigh {
            ifindex: 3,
            addr: "10.0.1.10".parse().unwrap(),
        };
        let foreign_route = Route {
            dst: "192.0.2.0/24".parse().unwrap(),
            ..route
        };
        let foreign_rule = Rule {
            priority: 1000,
            ..rule
        };
        let mut kernel = FakeKernel {
            observed: Observed {
                routes: vec![
                    ObservedRoute {
                        route,
                        protocol: RTPROT_PODNET,
                    },
                    ObservedRoute {
                        route: foreign_route,
                        protocol: 4,
                    },
                ],
                rules: vec![
                    ObservedRule {
                        rule,
                        protocol: RTPROT_PODNET,
                    },
                    // Inside the owned range but another protocol: not ours.
                    ObservedRule {
                        rule: foreign_rule,
                        protocol: 4,
                    },
                ],
                proxies: vec![ObservedProxy {
                    proxy,
                    protocol: RTPROT_PODNET,
                }],
            },
            ..FakeKernel::default()
        };
        let mut report = CleanupReport::default();
        remove_routing(&mut kernel, &mut report);
        assert!(
            kernel
                .applied
                .iter()
                .all(|c| matches!(c, Change::Delete(_))),
            "cleanup only deletes: {:?}",
            kernel.applied
        );
        assert_eq!(report.removed.len(), 3, "{report:?}");
        assert!(report.errors.is_empty());
        assert_eq!(kernel.observed.routes.len(), 1);
        assert_eq!(kernel.observed.routes[0].route, foreign_route);
        assert_eq!(kernel.observed.rules.len(), 1);
        assert_eq!(kernel.observed.rules[0].rule, foreign_rule);
        assert!(kernel.observed.proxies.is_empty());
        let mut again = CleanupReport::default();
        remove_routing(&mut kernel, &mut again);
        assert_eq!(again, CleanupReport::default());
    }

    #[test]
    fn refuses_the_bpffs_root_and_ignores_missing_files() {
        let mut report = CleanupReport::default();
        remove_pins(Path::new(BPFFS_ROOT), &mut report);
        assert_eq!(report.errors.len(), 1);
        let dir = std::env::temp_dir().join(format!("podnet-cleanup-unit-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("conntrack")).unwrap();
        std::fs::write(dir.join("conntrack/CT_DROPS"), b"").unwrap();
        let mut report = CleanupReport::default();
        remove_pins(&dir, &mut report);
        remove_file(&dir.join("missing"), &mut report);
        assert_eq!(report.removed.len(), 1, "{report:?}");
        assert!(report.removed[0].contains("(1 pins;"), "{report:?}");
        assert!(!dir.exists());
        let mut again = CleanupReport::default();
        remove_pins(&dir, &mut again);
        assert_eq!(again, CleanupReport::default());
    }
}
