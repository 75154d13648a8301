//! Heartbeats of the agent's long-running threads, for readiness.
//!
//! Each worker thread (routing, DNS upkeep and events, race events, the ENI
//! pool) holds a [`Heartbeat`] and beats it on every pass of its loop. A
//! thread whose heartbeat is dropped (it returned) or silent for longer than
//! its limit (it hangs) makes [`Heartbeats::problems`] name it, and with it
//! `/readyz` answers 503: a node whose routing thread died must not look
//! healthy. A thread that panics takes the process down instead (the agent's
//! panic hook aborts), so its pod restarts with the datapath still pinned.
//!
//! Threads register with the process-wide [`registry`]; tests make their own
//! [`Heartbeats`].
//!
//! A fault hook ends threads on demand, for the tests that prove the above:
//! [`Heartbeats::inject`] makes the named thread's next [`Heartbeat::beat`]
//! return `false` (its loop returns as if its work had died) or panic.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc, Mutex, OnceLock, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How long a worker thread may go without a beat before it counts as hung.
/// Its loops wait at most a second between beats; the longest legitimate
/// pause is one pass of work (a reconcile, a batch of lookups).
pub const SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// Silence limit of threads that wait on cloud calls: a pass may chain
/// several requests of up to 10 s each.
pub const CLOUD_SILENCE_LIMIT: Duration = Duration::from_mins(2);

/// The longest a sleeping worker should wait between beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Pulse {
    /// Milliseconds since the registry's epoch at the last beat.
    last_ms: AtomicU64,
    limit: Duration,
    ended: AtomicBool,
    /// A [`Fault`] injected by the fault hook, as `Fault as u8 + 1`; 0: none.
    fault: AtomicU8,
}

/// The environment variable that arms the fault hook: a comma-separated
/// list of `end:<thread>` or `panic:<thread>`; the agent applies the next one
/// on each SIGUSR1. Unset (always, outside tests), SIGUSR1 does nothing.
pub const FAULTS_ENV: &str = "PODNET_FAULTS_ON_SIGUSR1";

/// Parses the value of [`FAULTS_ENV`].
pub fn parse_faults(list: &str) -> Result<Vec<(String, Fault)>, String> {
    list.split(',')
        .map(|item| {
            let (fault, thread) = item
                .split_once(':')
                .ok_or_else(|| format!("{FAULTS_ENV}: {item:?} is not <end|panic>:<thread>"))?;
            Ok((
                thread.to_owned(),
                fault.parse().map_err(|e| format!("{FAULTS_ENV}: {e}"))?,
            ))
        })
        .collect()
}

/// What the fault hook does to a thread at its next beat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Its loop returns.
    End,
    /// It panics (and the agent's panic hook aborts the process).
    Panic,
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "end" => Ok(Self::End),
            "panic" => Ok(Self::Panic),
            other => Err(format!("unknown fault {other:?}: use end or panic")),
        }
    }
}

/// A set of thread heartbeats. Cloning shares the same set.
#[derive(Clone, Debug)]
pub struct Heartbeats {
    epoch: Instant,
    pulses: Pulses,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            pulses: Arc::default(),
        }
    }
}

type Pulses = Arc<Mutex<BTreeMap<&'static str, Arc<Pulse>>>>;

/// One thread's heartbeat; dropping it (the thread returned) ends it, unless
/// the thread [retires](Heartbeat::retire) it on a requested stop.
#[derive(Debug)]
pub struct Heartbeat {
    name: &'static str,
    epoch: Instant,
    pulse: Arc<Pulse>,
    pulses: Pulses,
}

/// How one thread is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadHealth {
    /// The thread's name.
    pub name: &'static str,
    /// Time since its last beat.
    pub silent_for: Duration,
    /// Its silence limit.
    pub limit: Duration,
    /// Whether it returned.
    pub ended: bool,
}

impl ThreadHealth {
    /// Why the thread is unhealthy, or `None` when it is fine.
    pub fn problem(&self) -> Option<String> {
        if self.ended {
            Some(format!("thread {} ended", self.name))
        } else if self.silent_for > self.limit {
            Some(format!(
                "thread {} silent for {:.1} s (limit {} s)",
                self.name,
                self.silent_for.as_secs_f64(),
                self.limit.as_secs()
            ))
        } else {
            None
        }
    }
}

impl Heartbeats {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers thread `name` with a silence limit; a thread of the same
    /// name registered before is replaced (a restarted subsystem).
    pub fn register(&self, name: &'static str, limit: Duration) -> Heartbeat {
        let pulse = Arc::new(Pulse {
            last_ms: AtomicU64::new(self.now_ms()),
            limit,
            ended: AtomicBool::new(false),
            fault: AtomicU8::new(0),
        });
        self.lock().insert(name, pulse.clone());
        Heartbeat {
            name,
            epoch: self.epoch,
            pulse,
            pulses: self.pulses.clone(),
        }
    }

    /// Every registered thread, by name.
    pub fn health(&self) -> Vec<ThreadHealth> {
        let now = self.now_ms();
        self.lock()
            .iter()
            .map(|(name, pulse)| ThreadHealth {
                name,
                silent_for: Duration::from_millis(
                    now.saturating_sub(pulse.last_ms.load(Ordering::Relaxed)),
                ),
                limit: pulse.limit,
                ended: pulse.ended.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// What is wrong, one line per thread that ended or hangs; empty when all
    /// are well.
    pub fn problems(&self) -> Vec<String> {
        self.health()
            .iter()
            .filter_map(ThreadHealth::problem)
            .collect()
    }

    /// Fault hook: thread `name`'s next beat ends or panics it. Returns
    /// whether such a thread is registered.
    pub fn inject(&self, name: &str, fault: Fault) -> bool {
        self.lock().get(name).is_some_and(|pulse| {
            pulse.fault.store(fault as u8 + 1, Ordering::Relaxed);
            true
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Arc<Pulse>>> {
        lock(&self.pulses)
    }
}

fn lock(pulses: &Pulses) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Arc<Pulse>>> {
    // Plain map of shared pulses: a panic elsewhere cannot leave it half-written.
    pulses.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Heartbeat {
    /// Records that the thread is alive. Returns `false` when the fault hook
    /// told the thread to end; its loop then returns.
    ///
    /// # Panics
    /// When the fault hook told the thread to panic.
    pub fn beat(&self) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.pulse.last_ms.store(now, Ordering::Relaxed);
        match self.pulse.fault.load(Ordering::Relaxed) {
            0 => true,
            injected if injected == Fault::Panic as u8 + 1 => {
                panic!("fault hook: this thread was told to panic")
            }
            _ => false,
        }
    }
}

impl Heartbeat {
    /// The thread stops on request (the agent stops, or a feature is off):
    /// forget it instead of reporting it ended.
    pub fn retire(self) {
        let mut pulses = lock(&self.pulses);
        if pulses
            .get(self.name)
            .is_some_and(|p| Arc::ptr_eq(p, &self.pulse))
        {
            pulses.remove(self.name);
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.pulse.ended.store(true, Ordering::Relaxed);
        if lock(&self.pulses)
            .get(self.name)
            .is_some_and(|p| Arc::ptr_eq(p, &self.pulse))
        {
            tracing::error!(
                thread = self.name,
                "worker thread ended; the agent is not ready until it restarts"
            );
        }
    }
}

/// The agent's heartbeats, where its worker threads register.
pub fn registry() -> &'static Heartbeats {
    static REGISTRY: OnceLock<Heartbeats> = OnceLock::new();
    REGISTRY.get_or_init(Heartbeats::new)
}

/// Takes the worker thread out of `slot`, if it is still there, and waits
/// for it to end; a panic in it is logged with its `name`.
pub fn join(slot: &Mutex<Option<JoinHandle<()>>>, name: &str) {
    let handle = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(handle) = handle {
        if handle.join().is_err() {
            tracing::error!(thread = name, "a worker thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_returns_or_hangs_is_named() {
        let beats = Heartbeats::new();
        let routing = beats.register("podnet-routing", Duration::from_millis(30));
        let dns = beats.register("podnet-dns", Duration::from_mins(1));
        assert!(routing.beat() && dns.beat());
        assert_eq!(beats.problems(), Vec::<String>::new());
        std::thread::sleep(Duration::from_millis(60));
        assert!(dns.beat());
        let problems = beats.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("thread podnet-routing silent for 0.")
                && problems[0].ends_with(" s (limit 0 s)"),
            "{problems:?}"
        );
        assert!(routing.beat());
        assert_eq!(beats.problems(), Vec::<String>::new());
        drop(dns);
        assert_eq!(beats.problems(), ["thread podnet-dns ended"]);
        // Started again, and stopped on request: forgotten, not a problem.
        beats.register("podnet-dns", SILENCE_LIMIT).retire();
        assert_eq!(beats.problems(), Vec::<String>::new());
        assert_eq!(beats.health().len(), 1);
    }

    #[test]
    fn the_fault_hook_ends_the_named_thread_only() {
        let beats = Heartbeats::new();
        let routing = beats.register("podnet-routing", SILENCE_LIMIT);
        let races = beats.register("podnet-races", SILENCE_LIMIT);
        assert!(!beats.inject("podnet-nothing", Fault::End));
        assert!(beats.inject("podnet-races", Fault::End));
        assert!(routing.beat());
        assert!(!races.beat());
        // A subsystem started again replaces its thread's heartbeat.
        let again = beats.register("podnet-races", SILENCE_LIMIT);
        drop(races);
        assert!(again.beat());
        assert_eq!(beats.problems(), Vec::<String>::new());
    }

    #[test]
    fn the_fault_list_is_parsed_in_order_and_errors_name_the_variable() {
        assert_eq!(
            parse_faults("end:podnet-routing,panic:podnet-dns"),
            Ok(vec![
                ("podnet-routing".to_owned(), Fault::End),
                ("podnet-dns".to_owned(), Fault::Panic)
            ])
        );
        assert_eq!(
            parse_faults("podnet-routing"),
            Err("PODNET_FAULTS_ON_SIGUSR1: \"podnet-routing\" is not <end|panic>:<thread>".into())
        );
        assert_eq!(
            parse_faults("stall:podnet-eni"),
            Err("PODNET_FAULTS_ON_SIGUSR1: unknown fault \"stall\": use end or panic".into())
        );
    }

    #[test]
    #[should_panic(expected = "fault hook: this thread was told to panic")]
    fn the_fault_hook_can_make_a_thread_panic() {
        let beats = Heartbeats::new();
        let dns = beats.register("podnet-dns", SILENCE_LIMIT);
        assert!(beats.inject("podnet-dns", "panic".parse().unwrap()));
        dns.beat();
    }
}
