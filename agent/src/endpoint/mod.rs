//! The endpoint registry: which pod owns which address, and on which host
//! interface it sits.
//!
//! podnet-cni fills it on every pod ADD/DEL; `--endpoints FILE` preloads it for
//! nodes without the plugin (and for tests) and is re-read when the file changes.
//! Addresses that no endpoint owns are host traffic: they are labelled with
//! empty namespace and pod, never dropped from counts.

mod changes;
pub mod file;

pub use changes::Changes;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};

/// A pod's identity as metric labels show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    /// Kubernetes namespace; empty for host traffic.
    pub namespace: String,
    /// Pod name; empty for host traffic.
    pub pod: String,
}

impl PodRef {
    /// The identity used for addresses no endpoint owns.
    pub fn host() -> Self {
        Self::default()
    }

    /// True for host traffic (no pod owns the address).
    pub fn is_host(&self) -> bool {
        self.pod.is_empty() && self.namespace.is_empty()
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_host() {
            f.write_str("(host)")
        } else {
            write!(f, "{}/{}", self.namespace, self.pod)
        }
    }
}

/// One pod network attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// The pod's addresses on this attachment.
    pub ips: Vec<IpAddr>,
    /// Host-side interface of the pod, where per-pod programs attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Container id (set by podnet-cni).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "containerId"
    )]
    pub container_id: Option<String>,
    /// Interface name inside the pod (set by podnet-cni).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "ifName")]
    pub if_name: Option<String>,
}

impl Endpoint {
    /// The registry's view of an attachment podnet-cni registered.
    pub fn from_record(record: &podnet_api::endpoint::EndpointRecord) -> Self {
        Self {
            namespace: record.namespace.clone(),
            pod: record.pod.clone(),
            ips: record.ips.clone(),
            interface: record.interface.clone(),
            container_id: Some(record.container_id.clone()),
            if_name: Some(record.if_name.clone()),
        }
    }

    /// The pod identity of this endpoint.
    pub fn pod_ref(&self) -> PodRef {
        PodRef {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
        }
    }
}

/// Where an endpoint came from; sources replace their own endpoints only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The `--endpoints` file.
    File,
    /// podnet-cni.
    Cni,
}

/// A function told the registry's addresses on every change, synchronously.
type AddressWatcher = Box<dyn Fn(&mut dyn Iterator<Item = IpAddr>) + Send + Sync>;

#[derive(Default)]
struct Inner {
    endpoints: Vec<(Source, Endpoint)>,
    by_ip: HashMap<IpAddr, PodRef>,
    subscribers: Vec<std::sync::Weak<std::os::fd::OwnedFd>>,
    address_watchers: Vec<AddressWatcher>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("endpoints", &self.endpoints)
            .field("subscribers", &self.subscribers.len())
            .field("address_watchers", &self.address_watchers.len())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn reindex(&mut self) {
        self.by_ip.clear();
        for (_, ep) in &self.endpoints {
            for ip in &ep.ips {
                self.by_ip.insert(*ip, ep.pod_ref());
            }
        }
        for watcher in &self.address_watchers {
            watcher(&mut self.by_ip.keys().copied());
        }
        changes::notify(&mut self.subscribers);
    }
}

/// Shared, thread-safe registry of endpoints. Cloning shares the same registry.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    inner: Arc<RwLock<Inner>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The pod owning `ip`, or the host identity.
    pub fn pod_for(&self, ip: IpAddr) -> PodRef {
        self.read(|inner| inner.by_ip.get(&ip).cloned().unwrap_or_default())
    }

    /// Replaces every endpoint that came from `source` with `endpoints`.
    pub fn replace_source(&self, source: Source, endpoints: Vec<Endpoint>) {
        self.write(|inner| {
            inner.endpoints.retain(|(s, _)| *s != source);
            inner
                .endpoints
                .extend(endpoints.into_iter().map(|e| (source, e)));
            inner.reindex();
        });
    }

    /// A copy of all endpoints, in insertion order.
    pub fn endpoints(&self) -> Vec<(Source, Endpoint)> {
        self.read(|inner| inner.endpoints.clone())
    }

    /// Calls `watcher` with every endpoint address now and after every
    /// change, before the change returns: the kernel's lists of endpoint
    /// addresses are in place before a CNI ADD answers. `watcher` must not
    /// call back into the registry.
    pub fn watch_addresses(
        &self,
        watcher: impl Fn(&mut dyn Iterator<Item = IpAddr>) + Send + Sync + 'static,
    ) {
        self.write(|inner| {
            watcher(&mut inner.by_ip.keys().copied());
            inner.address_watchers.push(Box::new(watcher));
        });
    }

    /// A subscription that becomes readable on every later change.
    pub fn subscribe(&self) -> std::io::Result<Changes> {
        let (changes, weak) = Changes::new()?;
        self.write(|inner| inner.subscribers.push(weak));
        Ok(changes)
    }

    fn read<T>(&self, f: impl FnOnce(&Inner) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-update of a
        // plain map; the data is still a valid map, so keep serving it.
        let guard = self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&guard)
    }

    fn write<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ns: &str, pod: &str, ips: &[&str]) -> Endpoint {
        Endpoint {
            namespace: ns.into(),
            pod: pod.into(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            interface: None,
            container_id: None,
            if_name: None,
        }
    }

    #[test]
    fn unknown_addresses_are_host_traffic() {
        let r = Registry::new();
        r.replace_source(
            Source::File,
            vec![ep("shop", "cart-1", &["10.0.0.2", "fd00::2"])],
        );
        assert_eq!(
            r.pod_for("10.0.0.2".parse().unwrap()).to_string(),
            "shop/cart-1"
        );
        assert_eq!(r.pod_for("fd00::2".parse().unwrap()).pod, "cart-1");
        assert!(r.pod_for("10.0.0.3".parse().unwrap()).is_host());
    }

    #[test]
    fn sources_replace_only_their_own_endpoints() {
        let r = Registry::new();
        r.replace_source(Source::Cni, vec![ep("a", "cni-pod", &["10.0.0.5"])]);
        r.replace_source(Source::File, vec![ep("b", "file-pod", &["10.0.0.6"])]);
        r.replace_source(Source::File, vec![]);
        assert_eq!(r.endpoints().len(), 1);
        assert_eq!(r.pod_for("10.0.0.5".parse().unwrap()).pod, "cni-pod");
        assert!(r.pod_for("10.0.0.6".parse().unwrap()).is_host());
    }

    #[test]
    fn address_watchers_see_every_address_at_once() {
        use std::sync::Mutex;
        let r = Registry::new();
        r.replace_source(Source::File, vec![ep("a", "p", &["10.0.0.5"])]);
        let seen: Arc<Mutex<Vec<Vec<IpAddr>>>> = Arc::default();
        r.watch_addresses({
            let seen = seen.clone();
            move |ips| {
                let mut ips: Vec<IpAddr> = ips.collect();
                ips.sort_unstable();
                seen.lock().unwrap().push(ips);
            }
        });
        r.replace_source(Source::Cni, vec![ep("b", "q", &["10.0.0.6", "fd00::6"])]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                vec![ip("10.0.0.5")],
                vec![ip("10.0.0.5"), ip("10.0.0.6"), ip("fd00::6")]
            ]
        );
    }

    #[test]
    fn subscribers_learn_of_each_change_and_unsubscribe_by_dropping() {
        let r = Registry::new();
        let changes = r.subscribe().unwrap();
        let dropped = r.subscribe().unwrap();
        assert!(!changes.take());
        r.replace_source(Source::Cni, vec![ep("a", "p", &["10.0.0.5"])]);
        r.replace_source(Source::Cni, vec![]);
        assert!(changes.wait(std::time::Duration::from_millis(1)));
        assert!(!changes.take(), "two changes are one wake-up");
        drop(dropped);
        r.replace_source(Source::File, vec![]);
        assert!(changes.take());
        assert_eq!(r.read(|inner| inner.subscribers.len()), 1);
    }
}
