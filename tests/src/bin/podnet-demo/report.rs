//! How the demo prints: numbered steps with their time, sections, and the
//! agreement lines that compare podnet with the kernel or the clients.

use std::{
    io::{IsTerminal as _, Write as _},
    time::Instant,
};

use anyhow::{bail, Result};

use crate::node::Node;

/// Steps of the demo, for the `[n/STEPS]` prefix.
pub const STEPS: u32 = 5;

/// Runs one step, printing its title first and its duration when done.
pub fn step<T>(n: u32, title: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    print!("[{n}/{STEPS}] {title} ... ");
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    let value = f();
    match &value {
        Ok(_) => println!("done ({:.1} s)", started.elapsed().as_secs_f64()),
        Err(_) => println!("failed"),
    }
    value
}

/// Rewrites the current line on a terminal; prints a new line otherwise
/// (logs of a run stay one update per line).
pub fn progress(line: &str) {
    if std::io::stdout().is_terminal() {
        print!("\r{line}");
        let _ = std::io::stdout().flush();
    } else {
        println!("{line}");
    }
}

/// Ends a run of [`progress`] lines.
pub fn progress_done() {
    if std::io::stdout().is_terminal() {
        println!();
    }
}

/// A section heading.
pub fn section(title: &str) {
    println!("\n== {title}");
}

/// A figure on an agreement line.
#[derive(Clone, Copy)]
enum Figure {
    /// A count, compared exactly.
    Count(u64),
    /// A measurement, compared within a tolerance.
    Real(f64),
}

impl std::fmt::Display for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Real(v) => write!(f, "{v:.3}"),
        }
    }
}

/// One comparison of podnet's figure with the reference it must equal.
struct Line {
    what: String,
    podnet: Figure,
    reference: String,
    value: Figure,
    /// Largest relative difference that still agrees, for measurements.
    tolerance: f64,
}

impl Line {
    /// The relative difference of two measurements; `None` for counts.
    fn difference(&self) -> Option<f64> {
        match (self.podnet, self.value) {
            (Figure::Real(p), Figure::Real(v)) => {
                Some((p - v).abs() / v.abs().max(f64::MIN_POSITIVE))
            }
            _ => None,
        }
    }

    fn agrees(&self) -> bool {
        match (self.podnet, self.value) {
            (Figure::Count(p), Figure::Count(v)) => p == v,
            _ => self.difference().is_some_and(|d| d <= self.tolerance),
        }
    }

    fn verdict(&self) -> String {
        match (self.agrees(), self.difference()) {
            (false, _) => "MISMATCH".to_owned(),
            (true, None) => "exact".to_owned(),
            (true, Some(d)) => format!("within {:.2} %", 100.0 * d),
        }
    }
}

/// The agreement lines collected over the demo, printed at the end.
#[derive(Default)]
pub struct Agreement {
    lines: Vec<Line>,
}

impl Agreement {
    /// podnet's `podnet` must equal `value`, what `reference` counted.
    pub fn exact(&mut self, what: &str, podnet: u64, reference: &str, value: u64) {
        self.lines.push(Line {
            what: what.to_owned(),
            podnet: Figure::Count(podnet),
            reference: reference.to_owned(),
            value: Figure::Count(value),
            tolerance: 0.0,
        });
    }

    /// podnet's `podnet` must be within `tolerance` (relative) of `value`.
    pub fn within(&mut self, what: &str, podnet: f64, reference: &str, value: f64, tolerance: f64) {
        self.lines.push(Line {
            what: what.to_owned(),
            podnet: Figure::Real(podnet),
            reference: reference.to_owned(),
            value: Figure::Real(value),
            tolerance,
        });
    }

    /// Prints every line.
    pub fn print(&self) {
        if self.lines.is_empty() {
            return;
        }
        section("Agreement: podnet against the kernel's counters and the clients");
        for line in &self.lines {
            println!(
                "  {:<34} {:>10}   {:<34} {:>10}   {}",
                line.what,
                line.podnet.to_string(),
                line.reference,
                line.value.to_string(),
                line.verdict(),
            );
        }
    }

    /// Fails when a line disagrees.
    pub fn check(&self) -> Result<()> {
        let wrong: Vec<&str> = self
            .lines
            .iter()
            .filter(|l| !l.agrees())
            .map(|l| l.what.as_str())
            .collect();
        if !wrong.is_empty() {
            bail!(
                "podnet disagrees with its reference on: {}",
                wrong.join(", ")
            );
        }
        Ok(())
    }
}

/// Where to look while the demo runs.
pub fn where_to_look(node: &Node) {
    section("Where to look (while the demo runs; removed on exit)");
    println!(
        "  metrics:  nsenter --net={} curl -s http://{}/metrics",
        node.topo.node().path().display(),
        podnet_tests::agent::METRICS_ADDR
    );
    let socket = node.agent.socket();
    for command in ["conntrack races", "dns top", "dns slow", "routes", "ipam"] {
        println!("  podnetctl --socket {} {command}", socket.display());
    }
}
