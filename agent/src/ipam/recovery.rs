//! After the state was restored from the checkpoint's copy: check it against
//! the pods that exist. An endpoint whose network namespace (the `netns`
//! path podnet-cni recorded) is there is a live pod, and its addresses are
//! kept allocated to it, even when the copy lost their allocation; an
//! endpoint whose namespace is gone is released with its allocation, but
//! only after a grace, and only if the namespace is still gone then (a
//! runtime finishing a DEL it began before the agent stopped gets there
//! first, and nothing that comes back is released).

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use super::{
    allocator::AttachmentKey,
    commit::GroupCommit,
    state::{change, NodeState},
};

/// `--ipam-recovery-grace`: how long an endpoint whose network namespace is
/// gone is kept after a recovery before it is released.
pub const DEFAULT_GRACE: Duration = Duration::from_mins(1);
/// How often the grace thread looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Whether a pod's network namespace exists, behind a trait so the
/// reconciliation is tested without namespaces.
pub trait NetnsProbe: Send + Sync + std::fmt::Debug {
    /// Whether `netns` (a path such as `/var/run/netns/cni-…`) is a network
    /// namespace now.
    fn exists(&self, netns: &str) -> bool;
}

/// The real check: the path is on nsfs (a bind-mounted namespace). A file
/// left behind after the namespace was unmounted is on another filesystem.
#[derive(Clone, Copy, Debug, Default)]
pub struct NsfsProbe;

impl NetnsProbe for NsfsProbe {
    fn exists(&self, netns: &str) -> bool {
        podnet_api::sys::filesystem_magic(Path::new(netns)) == Some(podnet_api::sys::NSFS_MAGIC)
    }
}

/// What the check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Endpoints whose namespace exists.
    pub live: Vec<AttachmentKey>,
    /// Endpoints whose namespace is gone: released after the grace.
    pub gone: Vec<AttachmentKey>,
    /// Endpoints without a recorded namespace (left to the runtime's GC).
    pub unknown: Vec<AttachmentKey>,
    /// Live endpoints whose addresses had no allocation and were given one.
    pub adopted: usize,
}

/// Sorts the endpoints by whether their namespace exists, and allocates
/// to each live endpoint the addresses it has (in memory: the caller
/// writes the checkpoint).
pub fn check(state: &mut NodeState, probe: &dyn NetnsProbe) -> Findings {
    let mut findings = Findings::default();
    let endpoints: Vec<_> = state.endpoints().cloned().collect();
    for ep in endpoints {
        let key = ep.key();
        if ep.netns.is_empty() {
            findings.unknown.push(key);
        } else if probe.exists(&ep.netns) {
            match state.adopt(&ep) {
                Ok(true) => findings.adopted += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(attachment = %key, error = %e, "a live pod's address is allocated to another attachment");
                }
            }
            findings.live.push(key);
        } else {
            findings.gone.push(key);
        }
    }
    findings
}

/// Releases, after `grace`, the endpoints (and allocations) of `gone` whose
/// namespace is still gone.
#[derive(Debug)]
pub struct GraceRelease {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl GraceRelease {
    /// Starts the thread (`podnet-ipam-grace`); it ends after its one pass.
    pub fn start(
        commit: &Arc<GroupCommit>,
        probe: Arc<dyn NetnsProbe>,
        gone: Vec<(AttachmentKey, String)>,
        grace: Duration,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let weak = Arc::downgrade(commit);
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("podnet-ipam-grace".into())
            .spawn(move || {
                let until = Instant::now() + grace;
                while Instant::now() < until {
                    if stopped.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(STOP_CHECK.min(until - Instant::now()));
                }
                let Some(commit) = weak.upgrade() else {
                    return;
                };
                let (still_gone, back): (Vec<_>, Vec<_>) =
                    gone.into_iter().partition(|(_, netns)| !probe.exists(netns));
                let keys: Vec<AttachmentKey> = still_gone.into_iter().map(|(k, _)| k).collect();
                match commit.run(None, None, change::release_attachments(keys.clone())) {
                    Ok((endpoints, allocations)) => tracing::warn!(
                        endpoints,
                        allocations,
                        kept = back.len(),
                        attachments = ?keys.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        grace_s = grace.as_secs_f64(),
                        "IPAM recovery: released the pods whose network namespace is gone"
                    ),
                    Err(e) => tracing::error!(error = %e, "IPAM recovery: releasing the pods whose network namespace is gone failed; CNI GC will release them"),
                }
            })?;
        Ok(Self {
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Stops the thread (what it has not released stays) and joins it.
    pub fn stop(&self) {
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
