//! Families that several subsystems add samples to, written once after all
//! of them (a family may appear only once in an exposition).

use super::text::{Encoder, MetricType};

/// Samples of the shared `podnet_bpf_*` families, in the order they arrive.
#[derive(Debug, Default)]
pub struct SharedFamilies {
    events_lost: Vec<(&'static str, u64)>,
    map_full: Vec<(&'static str, u64)>,
    skipped: Vec<(&'static str, &'static str, u64)>,
}

impl SharedFamilies {
    /// `podnet_bpf_events_lost_total{program}`.
    pub fn events_lost(&mut self, program: &'static str, lost: u64) -> &mut Self {
        self.events_lost.push((program, lost));
        self
    }

    /// `podnet_bpf_map_full_total{map}`.
    pub fn map_full(&mut self, map: &'static str, updates: u64) -> &mut Self {
        self.map_full.push((map, updates));
        self
    }

    /// `podnet_bpf_skipped_packets_total{program,reason}`.
    pub fn skipped(
        &mut self,
        program: &'static str,
        reason: &'static str,
        packets: u64,
    ) -> &mut Self {
        self.skipped.push((program, reason, packets));
        self
    }

    /// Writes each family that received a sample.
    pub fn render(&self, enc: &mut Encoder) {
        if !self.events_lost.is_empty() {
            let mut family = enc.family(
                "podnet_bpf_events_lost_total",
                MetricType::Counter,
                "Events a kernel program could not deliver because its ring buffer was full; counts stay exact.",
            );
            for (program, n) in &self.events_lost {
                family.sample(&[("program", program)], *n);
            }
        }
        if !self.map_full.is_empty() {
            let mut family = enc.family(
                "podnet_bpf_map_full_total",
                MetricType::Counter,
                "Updates a kernel map could not take because it was full; non-zero means per-key counts are no longer complete.",
            );
            for (map, n) in &self.map_full {
                family.sample(&[("map", map)], *n);
            }
        }
        if !self.skipped.is_empty() {
            let mut family = enc.family(
                "podnet_bpf_skipped_packets_total",
                MetricType::Counter,
                "Packets a kernel program counted and skipped: a kernel read failed or the packet was not IP; for dns, see the reason label.",
            );
            for (program, reason, n) in &self.skipped {
                family.sample(&[("program", program), ("reason", reason)], *n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_once_with_every_subsystems_samples() {
        let mut shared = SharedFamilies::default();
        shared
            .events_lost("conntrack", 3)
            .map_full("conntrack_drops", 0);
        shared.events_lost("dns", 1).skipped("dns", "malformed", 2);
        let mut enc = Encoder::new();
        shared.render(&mut enc);
        let text = enc.finish();
        assert_eq!(text.matches("# TYPE ").count(), 3, "{text}");
        assert!(text.contains(
            "podnet_bpf_events_lost_total{program=\"conntrack\"} 3\npodnet_bpf_events_lost_total{program=\"dns\"} 1\n"
        ));
        assert!(text.contains("podnet_bpf_map_full_total{map=\"conntrack_drops\"} 0\n"));
        assert!(text.contains(
            "podnet_bpf_skipped_packets_total{program=\"dns\",reason=\"malformed\"} 2\n"
        ));
    }

    #[test]
    fn nothing_added_writes_nothing() {
        let mut enc = Encoder::new();
        SharedFamilies::default().render(&mut enc);
        assert_eq!(enc.finish(), "");
    }
}
