//! Who a pod is, learned on the node: each pod sandbox's labels from the
//! container runtime's CRI socket ([`cri`]), never from the API server, so
//! the agent adds no load to the control plane however many pods come and
//! go. The endpoint registry keys them by sandbox id (the CNI container id)
//! and derives each pod's workload from them.
//!
//! A thread (`podnet-pods`) looks up each sandbox when its endpoint appears
//! (the registry's change eventfd wakes it; a CNI ADD never waits for it),
//! retries a sandbox the runtime does not list yet after 0.5, 1, 2, 4 and 8 s,
//! and reads every sandbox again every `--cri-refresh` (labels change, and a
//! runtime that was down comes back). Until a sandbox is known, its pod is
//! its own workload (kind `Pod`).

pub mod cri;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    endpoint::{PodMetadata, Registry},
    metrics::{
        pods::PodLevel,
        shared::SharedFamilies,
        text::{Encoder, MetricType},
    },
    options::{duration_arg, duration_key, options},
    subsystem::Subsystem,
};

/// `--cri-socket`: containerd's.
pub const DEFAULT_CRI_SOCKET: &str = "/run/containerd/containerd.sock";
/// `--cri-refresh`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);
/// Waits before looking up a sandbox the runtime did not list again; then
/// it waits for the next refresh.
pub const RETRY_BACKOFF: [Duration; 5] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];
/// The longest the thread waits before it checks its stop flag.
const WAKE_EVERY: Duration = Duration::from_millis(200);

options! {
    /// Pod metadata from the container runtime, and the labels of per-pod
    /// series.
    pub struct PodsOptions {
        /// Unix socket of the container runtime's CRI service, where the agent
        /// reads each pod's labels (`ListPodSandbox`) to name its workload
        /// [default: /run/containerd/containerd.sock].
        #[arg(long, env = "PODNET_CRI_SOCKET")]
        pub cri_socket: Option<PathBuf>,
        /// How often every pod's labels are read again [default: 30s].
        #[arg(long, env = "PODNET_CRI_REFRESH", value_parser = duration_arg)]
        #[serde(default, deserialize_with = "duration_key")]
        pub cri_refresh: Option<Duration>,
        /// Namespaces whose per-pod series keep the `pod` label (`*` for all);
        /// the others' are kept per workload (`workload_kind`, `workload`)
        /// [default: none].
        #[arg(long, env = "PODNET_POD_METRICS_NAMESPACES", value_delimiter = ',')]
        pub pod_metrics_namespaces: Option<Vec<String>>,
    }
}

/// The resolved settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodsSettings {
    /// The CRI socket.
    pub cri_socket: PathBuf,
    /// How often every sandbox is read again.
    pub refresh: Duration,
    /// Which namespaces' series keep the pod.
    pub pod_level: PodLevel,
}

impl PodsOptions {
    /// The settings, defaults filled in.
    pub fn settings(self) -> PodsSettings {
        PodsSettings {
            cri_socket: self
                .cri_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CRI_SOCKET)),
            refresh: self.cri_refresh.unwrap_or(DEFAULT_REFRESH),
            pod_level: PodLevel::from_list(&self.pod_metrics_namespaces.unwrap_or_default()),
        }
    }
}

/// Errors starting the subsystem.
#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    /// Its thread or runtime could not be made.
    #[error("starting the pod metadata thread: {0}")]
    Start(#[from] std::io::Error),
}

#[derive(Debug, Default)]
struct Counters {
    ok: AtomicU64,
    error: AtomicU64,
}

/// Pod metadata from the runtime, kept in the endpoint registry.
pub struct Pods {
    settings: PodsSettings,
    registry: Registry,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Pods {
    /// Starts the `podnet-pods` thread.
    pub fn start(settings: PodsSettings, registry: Registry) -> Result<Self, PodsError> {
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let changes = registry.subscribe()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut worker = Worker {
            socket: settings.cri_socket.clone(),
            refresh: settings.refresh,
            registry: registry.clone(),
            counters: counters.clone(),
            retries: HashMap::new(),
            next_refresh: Instant::now(),
            warned: false,
        };
        let thread = std::thread::Builder::new()
            .name("podnet-pods".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        runtime.block_on(worker.pass());
                        changes.wait(WAKE_EVERY);
                    }
                }
            })?;
        tracing::info!(socket = %settings.cri_socket.display(), "pod labels from the container runtime");
        Ok(Self {
            settings,
            registry,
            counters,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &PodsSettings {
        &self.settings
    }
}

struct Worker {
    socket: PathBuf,
    refresh: Duration,
    registry: Registry,
    counters: Arc<Counters>,
    /// Sandboxes not listed yet: attempts made and when to try again.
    retries: HashMap<String, (usize, Instant)>,
    next_refresh: Instant,
    warned: bool,
}

impl Worker {
    /// One pass: every sandbox on refresh, else the new and retried ones.
    async fn pass(&mut self) {
        let now = Instant::now();
        let sandboxes = self.registry.sandboxes();
        self.retries.retain(|id, _| sandboxes.contains_key(id));
        if now >= self.next_refresh {
            self.next_refresh = now + self.refresh;
            if sandboxes.is_empty() {
                return;
            }
            if let Some(listed) = self.list(None).await {
                let found: HashMap<&str, &cri::PodSandbox> =
                    listed.iter().map(|s| (s.id.as_str(), s)).collect();
                for id in sandboxes.keys() {
                    match found.get(id.as_str()) {
                        Some(sandbox) => {
                            self.registry.set_metadata(id, Some(metadata_of(sandbox)));
                            self.retries.remove(id);
                        }
                        None => {
                            self.retries.entry(id.clone()).or_insert((0, now));
                        }
                    }
                }
            }
            return;
        }
        for (id, known) in sandboxes {
            if known {
                continue;
            }
            let (attempts, at) = *self.retries.entry(id.clone()).or_insert((0, now));
            if at > now || attempts > RETRY_BACKOFF.len() {
                continue;
            }
            let next = RETRY_BACKOFF
                .get(attempts)
                .map_or(self.next_refresh, |wait| now + *wait);
            self.retries.insert(id.clone(), (attempts + 1, next));
            let Some(listed) = self.list(Some(&id)).await else {
                continue;
            };
            if let Some(sandbox) = listed.iter().find(|s| s.id == id) {
                self.registry.set_metadata(&id, Some(metadata_of(sandbox)));
                self.retries.remove(&id);
            } else if attempts + 1 > RETRY_BACKOFF.len() {
                tracing::debug!(sandbox = %id, "the runtime does not list this sandbox; its pod is its own workload until it does");
            }
        }
    }

    async fn list(&mut self, id: Option<&str>) -> Option<Vec<cri::PodSandbox>> {
        match cri::list_pod_sandbox(&self.socket, id).await {
            Ok(listed) => {
                self.counters.ok.fetch_add(1, Ordering::Relaxed);
                self.warned = false;
                Some(listed)
            }
            Err(e) => {
                self.counters.error.fetch_add(1, Ordering::Relaxed);
                if !self.warned {
                    tracing::warn!(socket = %self.socket.display(), error = %e, "cannot read pod labels from the container runtime; pods count as their own workloads");
                    self.warned = true;
                }
                None
            }
        }
    }
}

/// The registry's metadata of a sandbox.
pub fn metadata_of(sandbox: &cri::PodSandbox) -> PodMetadata {
    let meta = sandbox.metadata.clone().unwrap_or_default();
    PodMetadata {
        namespace: meta.namespace,
        pod: meta.name,
        uid: meta.uid,
        labels: sandbox.labels.clone(),
    }
}

impl Subsystem for Pods {
    fn name(&self) -> &'static str {
        "pods"
    }

    fn render_metrics(&self, enc: &mut Encoder, _shared: &mut SharedFamilies) {
        enc.family(
            "podnet_cri_requests_total",
            MetricType::Counter,
            "ListPodSandbox calls to the container runtime's CRI socket, by result.",
        )
        .sample(
            &[("result", "success")],
            self.counters.ok.load(Ordering::Relaxed),
        )
        .sample(
            &[("result", "error")],
            self.counters.error.load(Ordering::Relaxed),
        );
        let sandboxes = self.registry.sandboxes();
        let known = sandboxes.values().filter(|k| **k).count();
        enc.family(
            "podnet_pod_sandboxes",
            MetricType::Gauge,
            "Pod sandboxes with an endpoint on this node, by whether the runtime told their labels.",
        )
        .sample(&[("metadata", "known")], known as u64)
        .sample(&[("metadata", "unknown")], (sandboxes.len() - known) as u64);
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        pods: PodsOptions,
    }

    #[test]
    fn options_flags_keys_and_defaults() {
        let s = Args::try_parse_from(["x"]).unwrap().pods.settings();
        assert_eq!(
            s,
            PodsSettings {
                cri_socket: PathBuf::from(DEFAULT_CRI_SOCKET),
                refresh: DEFAULT_REFRESH,
                pod_level: PodLevel::None,
            }
        );
        let s = Args::try_parse_from([
            "x",
            "--pod-metrics-namespaces",
            "shop,debug",
            "--cri-socket",
            "/run/k3s/containerd/containerd.sock",
            "--cri-refresh",
            "10s",
        ])
        .unwrap()
        .pods
        .settings();
        assert_eq!(
            s.pod_level,
            PodLevel::Namespaces(["debug".to_owned(), "shop".to_owned()].into())
        );
        assert_eq!(s.refresh, Duration::from_secs(10));
        let file: PodsOptions = serde_norway::from_str("pod-metrics-namespaces: ['*']\n").unwrap();
        assert_eq!(file.settings().pod_level, PodLevel::All);
        assert_eq!(
            PodsOptions::keys().collect::<Vec<_>>(),
            ["cri-socket", "cri-refresh", "pod-metrics-namespaces"]
        );
    }

    #[test]
    fn sandboxes_become_registry_metadata() {
        let sandbox = cri::PodSandbox {
            id: "s1".into(),
            metadata: Some(cri::PodSandboxMetadata {
                name: "db-0".into(),
                uid: "u".into(),
                namespace: "shop".into(),
                attempt: 0,
            }),
            state: 0,
            created_at: 0,
            labels: [
                ("controller-revision-hash".to_owned(), "db-1".to_owned()),
                (
                    "statefulset.kubernetes.io/pod-name".to_owned(),
                    "db-0".to_owned(),
                ),
            ]
            .into(),
        };
        let m = metadata_of(&sandbox);
        assert_eq!((m.namespace.as_str(), m.pod.as_str()), ("shop", "db-0"));
        assert_eq!(m.workload().to_string(), "StatefulSet/db");
    }
}
