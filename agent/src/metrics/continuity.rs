//! Counters that stay continuous across agent restarts.
//!
//! Most of podnet's counters live in pinned kernel maps and simply continue when a new agent
//! adopts them. Others live in the agent's memory (CNI requests, allocations, route
//! reconciles, cloud calls) or in the kernel's statistics of one program instance (run counts
//! after a program is replaced), and start again from zero: Prometheus sees a reset, and a
//! rolling update shows up on every dashboard. [`Continuity`] hides that: the agent saves the
//! values it last exposed ([`Continuity::save`], on SIGTERM and every
//! `config::defaults::METRICS_SAVE_INTERVAL`), and the next agent adds the saved
//! value to every counter or histogram series whose value went back, decided the first time
//! it renders that series (a CNI counter appears only with the first request). A series that
//! continued (a pinned map) is left alone, so nothing is counted twice.
//! After a crash the increments since the last save are missing, but nothing goes back.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
};

/// The file, in `--state-dir`.
pub const FILE: &str = "metrics-continuity.json";

/// Offsets per series, each decided the first time the series is rendered after start.
#[derive(Debug, Default)]
pub struct Continuity {
    path: PathBuf,
    /// What the previous agent last exposed, for the series not decided yet.
    saved: BTreeMap<String, f64>,
    /// What to add to each series that went back.
    offsets: BTreeMap<String, f64>,
}

impl Continuity {
    /// Reads what the previous agent saved in `state_dir` (nothing, if it saved nothing or
    /// the file is unreadable: then counters start from zero, as without this).
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(FILE);
        let saved = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<BTreeMap<String, f64>>(&bytes).ok());
        if saved.is_none() && path.exists() {
            tracing::warn!(path = %path.display(), "unreadable metrics continuity file; counters restart from zero");
        }
        Self {
            path,
            saved: saved.unwrap_or_default(),
            offsets: BTreeMap::new(),
        }
    }

    /// The exposition `raw` with the offsets added, deciding them for series rendered for the
    /// first time since start.
    pub fn apply(&mut self, raw: &str) -> String {
        if !self.saved.is_empty() {
            let before = self.offsets.len();
            for (key, value) in cumulative_samples(raw) {
                if let Some(saved) = self.saved.remove(&key) {
                    if value < saved {
                        self.offsets.insert(key, saved);
                    }
                }
            }
            if self.offsets.len() > before {
                tracing::info!(
                    series = self.offsets.len(),
                    "counters that restarted continue from the previous agent's values"
                );
            }
        }
        if self.offsets.is_empty() {
            return raw.to_owned();
        }
        let mut out = String::with_capacity(raw.len());
        for line in raw.lines() {
            match split_sample(line)
                .and_then(|(key, value)| self.offsets.get(key).map(|offset| (key, value + offset)))
            {
                Some((key, value)) => {
                    out.push_str(key);
                    out.push(' ');
                    out.push_str(&format_value(value));
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }

    /// Saves the counters and histograms of `exposed` (an exposition as served, offsets
    /// included) for the next agent: written to a temporary file, then renamed.
    pub fn save(&self, exposed: &str) -> std::io::Result<()> {
        let values: BTreeMap<String, f64> = cumulative_samples(exposed).collect();
        let tmp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(&values).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// A metrics source whose counters stay continuous across restarts (see the module's doc).
pub struct Continuous<S> {
    inner: S,
    state: std::sync::Mutex<Continuity>,
}

impl<S: super::MetricsSource> Continuous<S> {
    /// `inner`, continuing what the previous agent saved in `state_dir`. Render once right
    /// away, so that the offsets are decided before in-memory counters grow again.
    pub fn new(inner: S, state_dir: &Path) -> Self {
        Self {
            inner,
            state: std::sync::Mutex::new(Continuity::load(state_dir)),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Continuity> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Saves what is exposed now for the next agent.
    pub fn save(&self) -> std::io::Result<()> {
        let exposed = self.render_continuous();
        self.state().save(&exposed)
    }

    fn render_continuous(&self) -> String {
        let raw = self.inner.render();
        self.state().apply(&raw)
    }
}

impl<S: super::MetricsSource> super::MetricsSource for Continuous<S> {
    fn render(&self) -> String {
        self.render_continuous()
    }
}

/// `(series, value)` of every sample of a counter or histogram family, except the process's
/// own (`process_*`, which restart with the process by definition).
fn cumulative_samples(text: &str) -> impl Iterator<Item = (String, f64)> + '_ {
    let mut cumulative = false;
    text.lines().filter_map(move |line| {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or_default();
            cumulative = matches!(words.next(), Some("counter" | "histogram"))
                && !name.starts_with("process_");
            return None;
        }
        if !cumulative {
            return None;
        }
        split_sample(line).map(|(key, value)| (key.to_owned(), value))
    })
}

/// `name{labels} value` -> (`name{labels}`, value); `None` for comments and blank lines.
fn split_sample(line: &str) -> Option<(&str, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (key, value) = line.rsplit_once(' ')?;
    Some((key, value.parse().ok()?))
}

/// A value as the encoder writes it: integers without a fraction.
fn format_value(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 9e15 {
        format!("{value:.0}")
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE podnet_cni_requests_total counter\n\
        podnet_cni_requests_total{command=\"ADD\",result=\"success\"} 40\n\
        # TYPE podnet_dns_requests_total counter\n\
        podnet_dns_requests_total{pod=\"a\"} 100\n\
        # TYPE podnet_ipam_addresses gauge\n\
        podnet_ipam_addresses{state=\"free\"} 250\n\
        # TYPE podnet_cni_request_duration_seconds histogram\n\
        podnet_cni_request_duration_seconds_bucket{command=\"ADD\",le=\"0.01\"} 39\n\
        podnet_cni_request_duration_seconds_bucket{command=\"ADD\",le=\"+Inf\"} 40\n\
        podnet_cni_request_duration_seconds_sum{command=\"ADD\"} 0.25\n\
        podnet_cni_request_duration_seconds_count{command=\"ADD\"} 40\n\
        # TYPE process_cpu_seconds_total counter\n\
        process_cpu_seconds_total 12.5\n";

    fn continuity_after(before: &str) -> (tempfile::TempDir, Continuity) {
        let dir = tempfile::tempdir().unwrap();
        Continuity::load(dir.path()).save(before).unwrap();
        let next = Continuity::load(dir.path());
        (dir, next)
    }

    #[test]
    fn reset_series_continue_and_continued_ones_are_left_alone() {
        let (_dir, mut next) = continuity_after(BEFORE);
        // A new agent: in-memory counters from zero, the pinned DNS counter went on, the
        // gauge and the process's own counter are what they are.
        let raw = BEFORE
            .replace("result=\"success\"} 40", "result=\"success\"} 2")
            .replace("pod=\"a\"} 100", "pod=\"a\"} 103")
            .replace("state=\"free\"} 250", "state=\"free\"} 248")
            .replace("le=\"0.01\"} 39", "le=\"0.01\"} 2")
            .replace("le=\"+Inf\"} 40", "le=\"+Inf\"} 2")
            .replace("_sum{command=\"ADD\"} 0.25", "_sum{command=\"ADD\"} 0.01")
            .replace("_count{command=\"ADD\"} 40", "_count{command=\"ADD\"} 2")
            .replace(
                "process_cpu_seconds_total 12.5",
                "process_cpu_seconds_total 0.1",
            );
        let out = next.apply(&raw);
        assert!(out.contains("result=\"success\"} 42\n"), "{out}");
        assert!(out.contains("pod=\"a\"} 103\n"), "{out}");
        assert!(out.contains("state=\"free\"} 248\n"), "{out}");
        assert!(out.contains("le=\"0.01\"} 41\n"), "{out}");
        assert!(out.contains("le=\"+Inf\"} 42\n"), "{out}");
        assert!(out.contains("_sum{command=\"ADD\"} 0.26\n"), "{out}");
        assert!(out.contains("_count{command=\"ADD\"} 42\n"), "{out}");
        assert!(out.contains("process_cpu_seconds_total 0.1\n"), "{out}");
        // The offsets stay: later renders keep counting from there.
        let later = raw.replace("result=\"success\"} 2", "result=\"success\"} 5");
        assert!(next.apply(&later).contains("result=\"success\"} 45\n"));
    }

    #[test]
    fn a_series_that_appears_later_is_decided_when_it_appears() {
        let (_dir, mut next) = continuity_after(BEFORE);
        // The first render after start: no CNI request yet, so no CNI series at all.
        let first = BEFORE.replace(
            "podnet_cni_requests_total{command=\"ADD\",result=\"success\"} 40\n",
            "",
        );
        let _ = next.apply(&first);
        let raw = BEFORE.replace("result=\"success\"} 40", "result=\"success\"} 1");
        assert!(next.apply(&raw).contains("result=\"success\"} 41\n"));
    }

    #[test]
    fn nothing_saved_or_a_broken_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Continuity::load(dir.path()).apply(BEFORE), BEFORE);
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        assert_eq!(Continuity::load(dir.path()).apply(BEFORE), BEFORE);
    }

    #[test]
    fn save_writes_only_counters_and_histograms() {
        let dir = tempfile::tempdir().unwrap();
        Continuity::load(dir.path()).save(BEFORE).unwrap();
        let saved: BTreeMap<String, f64> =
            serde_json::from_slice(&std::fs::read(dir.path().join(FILE)).unwrap()).unwrap();
        assert_eq!(saved.len(), 6, "{saved:?}");
        assert!(!saved
            .keys()
            .any(|k| k.starts_with("process_") || k.contains("free")));
    }
}
