//! The agent's own cost and headroom: how full its kernel maps are, how long
//! its programs run (when the kernel collects that), and how long routing
//! reconciles take.

use std::collections::BTreeMap;

use super::text::{Encoder, MetricType};
use crate::{bpf::inventory::Inventory, heartbeat::ThreadHealth};

/// Upper bounds (seconds) of `podnet_route_reconcile_duration_seconds`.
pub const RECONCILE_BUCKETS: [f64; 11] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Writes the map fill gauges and, when the kernel collects them, the
/// program run statistics.
pub fn render(enc: &mut Encoder, inv: &Inventory) {
    let mut entries = enc.family(
        "podnet_bpf_map_entries",
        MetricType::Gauge,
        "Keys in each of podnet's hash and LRU kernel maps, counted at scrape time; compare with podnet_bpf_map_capacity.",
    );
    for m in &inv.maps {
        entries.sample(&[("map", &m.map)], m.entries);
    }
    let mut capacity = enc.family(
        "podnet_bpf_map_capacity",
        MetricType::Gauge,
        "Maximum keys of each of podnet's hash and LRU kernel maps (max_entries).",
    );
    for m in &inv.maps {
        capacity.sample(&[("map", &m.map)], u64::from(m.capacity));
    }
    render_recursion_misses(enc, inv);
    if !inv.stats_enabled {
        return;
    }
    // Several ids can share a name (links of an older program still
    // pinned): one series per program name, summed.
    let mut by_name: Vec<(&str, u64, u64)> = Vec::new();
    for p in &inv.programs {
        match by_name.iter_mut().find(|(n, _, _)| *n == p.name) {
            Some(row) => {
                row.1 += p.run_time_ns;
                row.2 += p.run_count;
            }
            None => by_name.push((&p.name, p.run_time_ns, p.run_count)),
        }
    }
    let mut time = enc.family(
        "podnet_bpf_program_run_seconds_total",
        MetricType::Counter,
        "Time podnet's kernel programs spent running, from the kernel's program info; only present while kernel.bpf_stats_enabled=1 (the kernel counts nothing otherwise).",
    );
    for (name, ns, _) in &by_name {
        #[allow(clippy::cast_precision_loss)] // nanoseconds to seconds: f64 is the exposition type
        let secs = *ns as f64 / 1e9;
        time.sample(&[("program", name)], secs);
    }
    let mut runs = enc.family(
        "podnet_bpf_program_runs_total",
        MetricType::Counter,
        "Runs of podnet's kernel programs, from the kernel's program info; only present while kernel.bpf_stats_enabled=1 (the kernel counts nothing otherwise).",
    );
    for (name, _, n) in &by_name {
        runs.sample(&[("program", name)], *n);
    }
}

/// `podnet_bpf_program_recursion_misses_total`: runs the kernel skipped
/// because the program was already running on that CPU (a drop freed while
/// the tracer ran): events podnet never saw. One series per program name.
fn render_recursion_misses(enc: &mut Encoder, inv: &Inventory) {
    let mut by_name: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &inv.programs {
        if let Some(misses) = p.recursion_misses {
            *by_name.entry(&p.name).or_default() += misses;
        }
    }
    if by_name.is_empty() {
        return;
    }
    let mut family = enc.family(
        "podnet_bpf_program_recursion_misses_total",
        MetricType::Counter,
        "Runs of podnet's kernel programs the kernel skipped because the program was already running on that CPU: events never seen (kernel recursion_misses).",
    );
    for (name, misses) in by_name {
        family.sample(&[("program", name)], misses);
    }
}

/// Writes each worker thread's health: `podnet_thread_up` (0 once it ended
/// or went silent past its limit) and the age of its last heartbeat.
pub fn render_threads(enc: &mut Encoder, threads: &[ThreadHealth]) {
    let mut up = enc.family(
        "podnet_thread_up",
        MetricType::Gauge,
        "1 while the agent's worker thread runs and beats within its limit; 0 once it ended or hangs (then /readyz answers 503 naming it).",
    );
    for t in threads {
        up.sample(&[("thread", t.name)], u64::from(t.problem().is_none()));
    }
    let mut age = enc.family(
        "podnet_thread_heartbeat_age_seconds",
        MetricType::Gauge,
        "Seconds since the worker thread's last heartbeat; it beats at least every second while it waits.",
    );
    for t in threads {
        age.sample(&[("thread", t.name)], t.silent_for.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::inventory::{MapFill, PinnedProgram};

    fn inventory(stats_enabled: bool) -> Inventory {
        let program = |name: &str, id, ns, runs| PinnedProgram {
            subsystem: "dns".into(),
            name: name.into(),
            id,
            links: Vec::new(),
            run_time_ns: ns,
            run_count: runs,
            recursion_misses: Some(id.into()),
        };
        Inventory {
            maps: vec![MapFill {
                subsystem: "conntrack".into(),
                map: "CT_DROPS".into(),
                entries: 2,
                capacity: 4096,
            }],
            programs: vec![
                program("podnet_dns_pod_ingress", 7, 1_500_000_000, 10),
                program("podnet_dns_pod_ingress", 9, 500_000_000, 5),
            ],
            stats_enabled,
        }
    }

    #[test]
    fn map_fill_and_program_runs_when_stats_are_on() {
        let mut enc = Encoder::new();
        render(&mut enc, &inventory(true));
        let text = enc.finish();
        assert!(
            text.contains("podnet_bpf_map_entries{map=\"CT_DROPS\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("podnet_bpf_map_capacity{map=\"CT_DROPS\"} 4096\n"),
            "{text}"
        );
        assert!(
            text.contains("podnet_bpf_program_runs_total{program=\"podnet_dns_pod_ingress\"} 15\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "podnet_bpf_program_run_seconds_total{program=\"podnet_dns_pod_ingress\"} 2\n"
            ),
            "{text}"
        );
        // Ids 7 and 9 stand for their misses here: summed per name.
        assert!(
            text.contains(
                "podnet_bpf_program_recursion_misses_total{program=\"podnet_dns_pod_ingress\"} 16\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn program_families_are_omitted_while_stats_are_off() {
        let mut enc = Encoder::new();
        render(&mut enc, &inventory(false));
        let text = enc.finish();
        assert!(text.contains("podnet_bpf_map_entries{"), "{text}");
        assert!(!text.contains("podnet_bpf_program_run"), "{text}");
        // Counted by the kernel whether stats are on or not.
        assert!(
            text.contains("podnet_bpf_program_recursion_misses_total{"),
            "{text}"
        );
    }

    #[test]
    fn threads_are_up_until_they_end_or_hang() {
        let thread = |name, silent_ms, ended| ThreadHealth {
            name,
            silent_for: std::time::Duration::from_millis(silent_ms),
            limit: std::time::Duration::from_secs(30),
            ended,
        };
        let mut enc = Encoder::new();
        render_threads(
            &mut enc,
            &[
                thread("podnet-dns", 250, false),
                thread("podnet-eni", 31_000, false),
                thread("podnet-routing", 5, true),
            ],
        );
        let text = enc.finish();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "podnet_thread_up{thread=\"podnet-dns\"} 1",
                "podnet_thread_up{thread=\"podnet-eni\"} 0",
                "podnet_thread_up{thread=\"podnet-routing\"} 0",
                "podnet_thread_heartbeat_age_seconds{thread=\"podnet-dns\"} 0.25",
                "podnet_thread_heartbeat_age_seconds{thread=\"podnet-eni\"} 31",
                "podnet_thread_heartbeat_age_seconds{thread=\"podnet-routing\"} 0.005",
            ]
        );
    }
}
