//! CNI ADDs on a node that already has many endpoints, one at a time or in a
//! burst: how long after each `endpoint.add` (the call podnet-cni makes for a
//! new pod) the kernel shows the pod's DNS programs on both hooks of its
//! interface.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use podnet::dns::attach::{hook_program_ids, Direction};
use podnet_tests::{in_netns, Agent, Pod, Topology};
use serde_json::{json, Value};

/// Longest the burst's pods may take to show their programs.
const BURST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a thousand pods' programs may take to leave the kernel.
const DETACH_TIMEOUT: Duration = Duration::from_mins(3);

/// Latencies of one series of ADDs, in milliseconds, in the order of the ADDs.
pub struct Burst {
    /// From the start of each pod's `endpoint.add` to both its hooks holding a program.
    pub attach_ms: Vec<f64>,
    /// How long each `endpoint.add` call took to answer.
    pub call_ms: Vec<f64>,
    /// For ADDs spaced apart: how long the DNS thread's reconcile that
    /// attached each pod's hooks took (its attach calls, the kernel's waits
    /// included), from `podnetctl status`; empty for a burst.
    pub reconcile_ms: Vec<f64>,
    /// From the first ADD's start until the last pod had its programs.
    pub total_ms: f64,
    /// How far apart the ADDs started (zero: back to back).
    pub spacing: Duration,
}

impl Burst {
    /// Percentiles and the worst case, as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "adds": self.attach_ms.len(),
            "attach_ms": summary(&self.attach_ms),
            "call_ms": summary(&self.call_ms),
            "reconcile_ms": summary(&self.reconcile_ms),
            "slowest": self.slowest(),
            "total_ms": self.total_ms,
            "spacing_ms": ms(self.spacing),
        })
    }

    /// The ADD whose programs came last after it: its attach time and the
    /// reconcile that attached them.
    fn slowest(&self) -> Value {
        let Some((i, attach)) = self
            .attach_ms
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
        else {
            return Value::Null;
        };
        json!({
            "attach_ms": attach,
            "reconcile_ms": self.reconcile_ms.get(i),
            "call_ms": self.call_ms.get(i),
        })
    }
}

fn summary(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if sorted.is_empty() {
            return f64::NAN;
        }
        // Nearest rank: the smallest value with at least q of the values at or below it.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    };
    json!({ "p50": at(0.5), "p99": at(0.99), "max": at(1.0) })
}

/// Registers `pods` one after another through the agent's API, as podnet-cni
/// does on ADD, `spacing` apart (back to back when zero), while a watcher in
/// the node namespace asks the kernel every millisecond which of their
/// interfaces hold a program on both hooks.
pub fn run(topo: &Topology, agent: &Agent, pods: &[&Pod], spacing: Duration) -> Result<Burst> {
    let interfaces: Vec<String> = pods.iter().map(|p| p.host_if().to_owned()).collect();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<(usize, Instant)>();
    let watcher_interfaces = interfaces.clone();
    let node = topo.node();
    let first = Instant::now();
    let mut reconcile_ms = Vec::new();
    let (seen, call_ms) = std::thread::scope(|scope| -> Result<_> {
        let watcher = scope.spawn(move || {
            in_netns(node, move || watch(&watcher_interfaces, &started_rx))
                .and_then(std::convert::identity)
        });
        let mut call_ms = Vec::with_capacity(pods.len());
        for (i, pod) in pods.iter().enumerate() {
            // The i-th ADD starts `i * spacing` after the first, or at once when late.
            let due = first + spacing * u32::try_from(i)?;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if i > 0 && !spacing.is_zero() {
                // The previous pod's hooks were attached by now (its reconcile
                // is the last that changed one).
                reconcile_ms.push(last_dns_reconcile_ms(agent)?);
            }
            let start = Instant::now();
            // The watcher is told first, so no attachment can be seen before its start is known.
            started_tx
                .send((i, start))
                .context("burst watcher stopped")?;
            agent.api("endpoint.add", add_params(pod))?;
            call_ms.push(ms(start.elapsed()));
        }
        drop(started_tx);
        let seen = watcher
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        Ok((seen, call_ms))
    })?;
    let total_ms = ms(first.elapsed());
    if !spacing.is_zero() {
        reconcile_ms.push(last_dns_reconcile_ms(agent)?);
    }
    Ok(Burst {
        attach_ms: seen,
        call_ms,
        reconcile_ms,
        total_ms,
        spacing,
    })
}

/// How long the DNS thread's last reconcile that changed a hook took (ms).
fn last_dns_reconcile_ms(agent: &Agent) -> Result<f64> {
    let status = agent.api("status", Value::Null)?;
    status["dns"]["last_reconcile"]["took_us"]
        .as_f64()
        .map(|us| us / 1e3)
        .context("status has no dns.last_reconcile.took_us")
}

/// The `endpoint.add` parameters podnet-cni would send for `pod`.
fn add_params(pod: &Pod) -> Value {
    json!({
        "command": "ADD",
        "endpoint": {
            "containerId": container_id(pod),
            "ifName": "eth0",
            "network": "podnet",
            "netns": pod.netns().path().to_string_lossy(),
            "namespace": "burst",
            "pod": format!("pod{}", pod.index()),
            "podUid": format!("uid-{}", pod.index()),
            "interface": pod.host_if(),
            "ips": [pod.ipv4().to_string()],
        }
    })
}

/// Until every interface holds programs on both hooks: per interface, the
/// time from its ADD's start to the first sweep that saw both.
fn watch(
    interfaces: &[String],
    started: &std::sync::mpsc::Receiver<(usize, Instant)>,
) -> Result<Vec<f64>> {
    let mut starts: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut seen: BTreeMap<usize, f64> = BTreeMap::new();
    let deadline = Instant::now() + BURST_TIMEOUT;
    while seen.len() < interfaces.len() {
        while let Ok((i, at)) = started.try_recv() {
            starts.insert(i, at);
        }
        for (&i, at) in &starts {
            if seen.contains_key(&i) {
                continue;
            }
            if attached(&interfaces[i])? {
                seen.insert(i, ms(at.elapsed()));
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {} interfaces still without DNS programs after {BURST_TIMEOUT:?}",
                interfaces.len() - seen.len(),
                interfaces.len()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(seen.into_values().collect())
}

/// Whether both hooks of `ifname` hold a program (tcx link or classic filter).
fn attached(ifname: &str) -> Result<bool> {
    for direction in Direction::BOTH {
        if hook_program_ids(ifname, direction)?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Deletes the endpoints [`run`] registered for `pods` (podnet-cni's DEL) and
/// waits until the kernel shows no program on their hooks.
pub fn remove(topo: &Topology, agent: &Agent, pods: &[&Pod]) -> Result<()> {
    for pod in pods {
        agent.api(
            "endpoint.del",
            json!({
                "command": "DEL",
                "containerId": container_id(pod),
                "ifName": "eth0",
                "network": "podnet",
            }),
        )?;
    }
    wait_detached(topo, pods)?;
    Ok(())
}

/// Waits until no hook of `pods`' interfaces holds a program; returns how
/// long that took.
pub fn wait_detached(topo: &Topology, pods: &[&Pod]) -> Result<Duration> {
    let interfaces: Vec<&str> = pods.iter().map(|p| p.host_if()).collect();
    let start = Instant::now();
    in_netns(topo.node(), || -> Result<Duration> {
        let deadline = start + DETACH_TIMEOUT;
        loop {
            let mut left = 0;
            for ifname in &interfaces {
                for direction in Direction::BOTH {
                    left += hook_program_ids(ifname, direction)?.len();
                }
            }
            if left == 0 {
                return Ok(start.elapsed());
            }
            if Instant::now() > deadline {
                bail!("{left} DNS programs still attached after {DETACH_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })?
}

fn container_id(pod: &Pod) -> String {
    format!("burst{}", pod.index())
}

/// The kernel's switch between normal and expedited RCU grace periods.
const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// `rcu_expedited` set to 1 for as long as it lives, the value found put
/// back on drop: a tcx attach then waits for an expedited grace period
/// (IPIs to every CPU) instead of a normal one. A node-wide kernel setting,
/// for the benchmark's own machine only.
pub struct ExpeditedGracePeriods {
    previous: String,
}

impl ExpeditedGracePeriods {
    /// Sets it; `None` when this kernel has no such switch.
    pub fn enable() -> Result<Option<Self>> {
        let Ok(previous) = std::fs::read_to_string(RCU_EXPEDITED) else {
            return Ok(None);
        };
        std::fs::write(RCU_EXPEDITED, "1").with_context(|| format!("writing {RCU_EXPEDITED}"))?;
        Ok(Some(Self {
            previous: previous.trim().to_owned(),
        }))
    }
}

impl Drop for ExpeditedGracePeriods {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(RCU_EXPEDITED, &self.previous) {
            eprintln!("restoring {RCU_EXPEDITED} to {}: {e}", self.previous);
        }
    }
}
