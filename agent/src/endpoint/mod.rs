//! The endpoint registry: which pod owns which address, and on which host
//! interface it sits.
//!
//! podnet-cni fills it on every pod ADD/DEL; `--endpoints FILE` preloads it for
//! nodes without the plugin (and for tests) and is re-read when the file changes.
//! Addresses that no endpoint owns are host traffic: they are labelled with
//! empty namespace and pod, never dropped from counts.
//!
//! Beside the endpoints it keeps what the container runtime says about each
//! pod sandbox ([`PodMetadata`], keyed by sandbox id, the CNI container id),
//! each pod's [`Workload`], and which pod held which address when
//! ([`history`]).

mod changes;
pub mod file;
pub mod history;
pub mod settle;
pub mod workload;

pub use changes::Changes;
pub use settle::Follower;
pub use workload::Workload;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

/// How long a departed pod's workload is remembered, for the series of its
/// last counts.
pub const DEPARTED_RETENTION: Duration = history::RETENTION;
/// Departed pods whose workload is remembered.
pub const MAX_DEPARTED: usize = 4_096;

/// What the container runtime knows of a pod sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMetadata {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod uid.
    pub uid: String,
    /// The pod's labels (the kubelet adds `io.kubernetes.pod.*`).
    pub labels: BTreeMap<String, String>,
}

impl PodMetadata {
    /// The workload the labels name.
    pub fn workload(&self) -> Workload {
        Workload::of(&self.pod, &self.labels)
    }
}

use serde::{Deserialize, Serialize};

/// A pod's identity as metric labels show it. The names are shared: every
/// DNS and race record carries its pod's, and a copy costs no allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    /// Kubernetes namespace; empty for host traffic.
    pub namespace: Arc<str>,
    /// Pod name; empty for host traffic.
    pub pod: Arc<str>,
}

impl Default for PodRef {
    fn default() -> Self {
        Self::new("", "")
    }
}

impl PodRef {
    /// The identity of pod `pod` in `namespace`.
    pub fn new(namespace: &str, pod: &str) -> Self {
        Self {
            namespace: namespace.into(),
            pod: pod.into(),
        }
    }

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
        PodRef::new(&self.namespace, &self.pod)
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
    /// Runtime metadata by sandbox id.
    metadata: HashMap<String, PodMetadata>,
    /// The workload of every pod with an endpoint.
    workloads: HashMap<PodRef, Workload>,
    /// Departed pods' workloads, with when they left (Unix ms).
    departed: HashMap<PodRef, (Workload, u64)>,
    history: history::History,
    subscribers: Vec<std::sync::Weak<std::os::fd::OwnedFd>>,
    address_watchers: Vec<AddressWatcher>,
    /// Changes so far (see [`settle`]).
    generation: u64,
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
    fn reindex(&mut self, now_unix_ms: u64) {
        self.by_ip.clear();
        for (_, ep) in &self.endpoints {
            for ip in &ep.ips {
                self.by_ip.insert(*ip, ep.pod_ref());
            }
        }
        self.history.update(&self.by_ip, now_unix_ms);
        self.reindex_workloads(now_unix_ms);
        for watcher in &self.address_watchers {
            watcher(&mut self.by_ip.keys().copied());
        }
        self.generation += 1;
        changes::notify(&mut self.subscribers);
    }

    /// Each pod's workload from its sandbox's metadata, else the pod itself;
    /// pods that left are remembered for [`DEPARTED_RETENTION`].
    fn reindex_workloads(&mut self, now_unix_ms: u64) {
        let mut workloads = HashMap::with_capacity(self.endpoints.len());
        for (_, ep) in &self.endpoints {
            let known = ep
                .container_id
                .as_ref()
                .and_then(|id| self.metadata.get(id))
                .map(PodMetadata::workload);
            let pod = ep.pod_ref();
            match (known, workloads.get(&pod)) {
                (Some(workload), _) => {
                    workloads.insert(pod, workload);
                }
                (None, None) => {
                    let workload = Workload::pod(&ep.pod);
                    workloads.insert(pod, workload);
                }
                (None, Some(_)) => {}
            }
        }
        for (pod, workload) in self.workloads.drain() {
            if !workloads.contains_key(&pod) {
                self.departed.insert(pod, (workload, now_unix_ms));
            }
        }
        let retention = u64::try_from(DEPARTED_RETENTION.as_millis()).unwrap_or(u64::MAX);
        let oldest = now_unix_ms.saturating_sub(retention);
        self.departed
            .retain(|pod, (_, left)| *left >= oldest && !workloads.contains_key(pod));
        if self.departed.len() > MAX_DEPARTED {
            let mut by_age: Vec<(u64, PodRef)> = self
                .departed
                .iter()
                .map(|(p, (_, t))| (*t, p.clone()))
                .collect();
            by_age.sort_unstable();
            let excess = self.departed.len() - MAX_DEPARTED;
            for (_, pod) in by_age.into_iter().take(excess) {
                self.departed.remove(&pod);
            }
        }
        self.workloads = workloads;
    }
}

/// The wall clock in Unix milliseconds (0 before 1970).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Shared, thread-safe registry of endpoints. Cloning shares the same registry.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    inner: Arc<RwLock<Inner>>,
    followers: Arc<settle::Followers>,
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

    /// The pod that held `ip` at `time_unix_ms` (an event's time): the one
    /// whose tenure covers it, the host identity if nobody held it then, the
    /// current owner if the time is older than the history kept.
    pub fn pod_at(&self, ip: IpAddr, time_unix_ms: u64) -> PodRef {
        self.read(|inner| match inner.history.holder(ip, time_unix_ms) {
            history::Holder::Pod(pod) => pod.clone(),
            history::Holder::Nobody => PodRef::host(),
            history::Holder::Unknown => inner.by_ip.get(&ip).cloned().unwrap_or_default(),
        })
    }

    /// The tenures of `ip`, oldest first.
    pub fn address_history(&self, ip: IpAddr) -> Vec<history::Tenure> {
        self.read(|inner| inner.history.tenures(ip))
    }

    /// The workload of `pod`: from its sandbox's labels when the runtime
    /// told them, else the pod itself (kind `Pod`); a pod that left within
    /// [`DEPARTED_RETENTION`] keeps the workload it had; the host's is empty.
    pub fn workload_of(&self, pod: &PodRef) -> Workload {
        if pod.is_host() {
            return Workload::default();
        }
        self.read(|inner| {
            inner
                .workloads
                .get(pod)
                .or_else(|| inner.departed.get(pod).map(|(w, _)| w))
                .cloned()
                .unwrap_or_else(|| Workload::pod(&pod.pod))
        })
    }

    /// Sets (or with `None` forgets) the runtime's metadata of sandbox `id`.
    /// Metadata is kept for sandboxes that have an endpoint only.
    pub fn set_metadata(&self, id: &str, metadata: Option<PodMetadata>) {
        self.write(|inner| {
            let changed = match metadata {
                Some(m) => inner.metadata.insert(id.to_owned(), m.clone()) != Some(m),
                None => inner.metadata.remove(id).is_some(),
            };
            if changed {
                inner.reindex_workloads(unix_ms_now());
            }
        });
    }

    /// The runtime's metadata of sandbox `id`, if known.
    pub fn metadata(&self, id: &str) -> Option<PodMetadata> {
        self.read(|inner| inner.metadata.get(id).cloned())
    }

    /// The sandbox ids of the endpoints, each once, with whether the
    /// runtime's metadata is known.
    pub fn sandboxes(&self) -> BTreeMap<String, bool> {
        self.read(|inner| {
            inner
                .endpoints
                .iter()
                .filter_map(|(_, ep)| ep.container_id.clone())
                .map(|id| {
                    let known = inner.metadata.contains_key(&id);
                    (id, known)
                })
                .collect()
        })
    }

    /// Replaces every endpoint that came from `source` with `endpoints`.
    pub fn replace_source(&self, source: Source, endpoints: Vec<Endpoint>) {
        self.replace_source_at(source, endpoints, unix_ms_now());
    }

    /// [`Registry::replace_source`] at a given wall-clock time (Unix ms),
    /// which the address history records. Metadata of sandboxes left without
    /// an endpoint is forgotten.
    pub fn replace_source_at(&self, source: Source, endpoints: Vec<Endpoint>, now_unix_ms: u64) {
        self.write(|inner| {
            inner.endpoints.retain(|(s, _)| *s != source);
            inner
                .endpoints
                .extend(endpoints.into_iter().map(|e| (source, e)));
            let live: std::collections::HashSet<&str> = inner
                .endpoints
                .iter()
                .filter_map(|(_, ep)| ep.container_id.as_deref())
                .collect();
            let mut metadata = std::mem::take(&mut inner.metadata);
            metadata.retain(|id, _| live.contains(id.as_str()));
            inner.metadata = metadata;
            inner.reindex(now_unix_ms);
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

    /// The number of changes so far; a follower reads it before it reads
    /// the endpoints it acts on.
    pub fn generation(&self) -> u64 {
        self.read(|inner| inner.generation)
    }

    /// A follower named `name`: a subsystem that acts on every change in the
    /// kernel and reports, with [`Follower::caught_up`], which generation it
    /// acted on last.
    pub fn follow(&self, name: &'static str) -> Follower {
        self.followers.follow(name)
    }

    /// Waits until every follower has acted on the changes up to
    /// `generation`, at most `timeout`; on timeout, those still behind.
    pub fn wait_followers(
        &self,
        generation: u64,
        timeout: std::time::Duration,
    ) -> Result<(), Vec<&'static str>> {
        self.followers.wait(generation, timeout)
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
    fn every_change_is_a_new_generation_that_followers_catch_up_with() {
        let r = Registry::new();
        assert_eq!(r.generation(), 0);
        let dns = r.follow("dns");
        r.replace_source(Source::File, vec![ep("shop", "cart-1", &["10.0.0.2"])]);
        r.replace_source(Source::Cni, vec![ep("shop", "cart-2", &["10.0.0.3"])]);
        assert_eq!(r.generation(), 2);
        r.set_metadata("sandbox", None);
        assert_eq!(r.generation(), 2, "metadata is not an endpoint change");
        let zero = std::time::Duration::ZERO;
        assert_eq!(r.wait_followers(2, zero), Err(vec!["dns"]));
        dns.caught_up(r.generation());
        assert_eq!(r.wait_followers(2, zero), Ok(()));
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
        assert_eq!(&*r.pod_for("fd00::2".parse().unwrap()).pod, "cart-1");
        assert!(r.pod_for("10.0.0.3".parse().unwrap()).is_host());
    }

    #[test]
    fn sources_replace_only_their_own_endpoints() {
        let r = Registry::new();
        r.replace_source(Source::Cni, vec![ep("a", "cni-pod", &["10.0.0.5"])]);
        r.replace_source(Source::File, vec![ep("b", "file-pod", &["10.0.0.6"])]);
        r.replace_source(Source::File, vec![]);
        assert_eq!(r.endpoints().len(), 1);
        assert_eq!(&*r.pod_for("10.0.0.5".parse().unwrap()).pod, "cni-pod");
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

    #[test]
    fn workloads_come_from_sandbox_labels_else_the_pod() {
        let r = Registry::new();
        let mut cart = ep("shop", "cart-7d9f8b6c5d-x2k9p", &["10.0.0.2"]);
        cart.container_id = Some("sandbox1".into());
        let mut other = ep("shop", "debug", &["10.0.0.3"]);
        other.container_id = Some("sandbox2".into());
        r.replace_source(Source::Cni, vec![cart.clone(), other]);
        let pod = cart.pod_ref();
        // Not known yet: the pod itself.
        assert_eq!(r.workload_of(&pod), Workload::pod("cart-7d9f8b6c5d-x2k9p"));
        assert_eq!(
            r.sandboxes().into_iter().collect::<Vec<_>>(),
            [
                ("sandbox1".to_owned(), false),
                ("sandbox2".to_owned(), false)
            ]
        );
        let metadata = PodMetadata {
            namespace: "shop".into(),
            pod: "cart-7d9f8b6c5d-x2k9p".into(),
            uid: "u1".into(),
            labels: [("pod-template-hash".to_owned(), "7d9f8b6c5d".to_owned())].into(),
        };
        r.set_metadata("sandbox1", Some(metadata.clone()));
        let deployment = Workload {
            kind: "Deployment".into(),
            name: "cart".into(),
        };
        assert_eq!(r.workload_of(&pod), deployment);
        assert_eq!(r.metadata("sandbox1"), Some(metadata));
        assert!(r.sandboxes()["sandbox1"]);
        assert_eq!(r.workload_of(&PodRef::host()), Workload::default());
        // The pod leaves: its workload is remembered, its sandbox's metadata is not.
        r.replace_source(Source::Cni, vec![]);
        assert_eq!(r.workload_of(&pod), deployment);
        assert_eq!(r.metadata("sandbox1"), None);
        // Past the retention it is forgotten.
        let later = unix_ms_now() + u64::try_from(DEPARTED_RETENTION.as_millis()).unwrap() + 1;
        r.replace_source_at(Source::File, vec![], later);
        assert_eq!(r.workload_of(&pod), Workload::pod("cart-7d9f8b6c5d-x2k9p"));
    }

    #[test]
    fn events_are_named_after_the_pod_that_held_the_address_then() {
        let r = Registry::new();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        r.replace_source_at(Source::Cni, vec![ep("shop", "old", &["10.0.0.9"])], 1_000);
        r.replace_source_at(Source::Cni, vec![], 2_000);
        r.replace_source_at(Source::Cni, vec![ep("shop", "new", &["10.0.0.9"])], 2_000);
        assert_eq!(&*r.pod_at(ip, 1_500).pod, "old");
        assert_eq!(&*r.pod_at(ip, 2_000).pod, "new");
        assert_eq!(
            &*r.pod_at(ip, 500).pod,
            "new",
            "older than the history: the owner now"
        );
        assert_eq!(r.address_history(ip).len(), 2);
    }
}
