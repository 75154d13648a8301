//! Desired versus actual routing state, as `routes.show` answers it and
//! `podnetctl routes` prints it.

use std::{collections::HashMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use super::{
    super::net::Cidr,
    desired::{Link, ProxyNeigh, Route, Rule, MAIN_TABLE},
    diff::{Object, State, Status},
};

/// One object: what podnet wants and what the kernel has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteLine {
    /// `rule`, `route` or `neigh`.
    pub kind: String,
    /// `ok`, `missing`, `differs`, `conflict`, `provided` or `stale`.
    pub state: String,
    /// The desired object in `ip` syntax; `-` for a stale one.
    pub desired: String,
    /// What the kernel has: `=` when it is as desired, `-` when absent.
    pub actual: String,
}

/// The answer of `routes.show`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesView {
    /// Unix time of the reconcile this view comes from (ms); 0 before the first.
    pub reconciled_unix_ms: u64,
    /// One line per desired or stale object.
    pub lines: Vec<RouteLine>,
    /// Inputs that could not be turned into kernel state.
    pub problems: Vec<String>,
    /// Changes that failed at the last reconcile.
    pub errors: Vec<String>,
    /// Whether podnet's SNAT chain is in use.
    pub snat: bool,
    /// Whether the eBPF fast path is on.
    pub fast_path: bool,
}

/// Renders objects with interface names.
pub struct Names(HashMap<u32, String>);

impl Names {
    /// Names from a link dump.
    pub fn new(links: &[Link]) -> Self {
        Self(links.iter().map(|l| (l.index, l.name.clone())).collect())
    }

    fn dev(&self, index: u32) -> String {
        self.0
            .get(&index)
            .cloned()
            .unwrap_or_else(|| format!("if{index}"))
    }

    fn table(table: u32) -> String {
        if table == MAIN_TABLE {
            "main".to_owned()
        } else {
            table.to_string()
        }
    }

    /// `ip route` / `ip rule` / `ip neigh` syntax of an object.
    pub fn object(&self, o: &Object) -> String {
        match o {
            Object::Route(r) => self.route(r),
            Object::Rule(r) => Self::rule(r),
            Object::Neigh(n) => self.proxy(*n),
        }
    }

    fn route(&self, r: &Route) -> String {
        let mut s = if r.dst.prefix_len() == 0 {
            "default".to_owned()
        } else {
            host_or_prefix(&r.dst)
        };
        if let Some(gw) = r.gateway {
            let _ = write!(s, " via {gw}");
        }
        let _ = write!(s, " dev {}", self.dev(r.oif));
        if r.scope_link {
            s.push_str(" scope link");
        }
        let _ = write!(s, " table {}", Self::table(r.table));
        s
    }

    fn rule(r: &Rule) -> String {
        let mut s = format!("{}:", r.priority);
        if let Some(src) = &r.src {
            let _ = write!(s, " from {}", host_or_prefix(src));
        }
        if let Some(dst) = &r.dst {
            let _ = write!(s, " to {}", host_or_prefix(dst));
        }
        let _ = write!(s, " lookup {}", Self::table(r.table));
        s
    }

    fn proxy(&self, n: ProxyNeigh) -> String {
        format!("proxy {} dev {}", n.addr, self.dev(n.ifindex))
    }
}

/// A one-address prefix (`/32`, `/128`) as its address, as `ip` prints it;
/// any other as `address/length`.
fn host_or_prefix(c: &Cidr) -> String {
    if *c == Cidr::host(c.network()) {
        c.network().to_string()
    } else {
        c.to_string()
    }
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Ok => "ok",
        State::Missing => "missing",
        State::Differs => "differs",
        State::Conflict => "conflict",
        State::Provided => "provided",
        State::Stale => "stale",
    }
}

/// Lines for `statuses`, rules first, then routes, then neighbours.
pub fn lines(statuses: &[Status], names: &Names) -> Vec<RouteLine> {
    let mut sorted: Vec<&Status> = statuses.iter().collect();
    sorted.sort_by_key(|s| (s.object.kind(), s.object));
    sorted
        .into_iter()
        .map(|s| {
            let text = names.object(&s.object);
            let (desired, actual) = match (s.state, &s.actual) {
                (State::Stale, _) => ("-".to_owned(), text),
                (State::Ok, _) => (text, "=".to_owned()),
                (State::Missing, _) => (text, "-".to_owned()),
                (_, Some(a)) => (text, names.object(a)),
                (_, None) => (text, "?".to_owned()),
            };
            RouteLine {
                kind: s.object.kind().as_str().to_owned(),
                state: state_name(s.state).to_owned(),
                desired,
                actual,
            }
        })
        .collect()
}

/// The table `podnetctl routes` prints.
pub fn table(view: &RoutesView) -> String {
    let mut rows = vec![[
        "KIND".to_owned(),
        "STATE".to_owned(),
        "DESIRED".to_owned(),
        "ACTUAL".to_owned(),
    ]];
    rows.extend(view.lines.iter().map(|l| {
        [
            l.kind.clone(),
            l.state.clone(),
            l.desired.clone(),
            l.actual.clone(),
        ]
    }));
    let mut widths = [0usize; 4];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i == 3 {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if view.lines.is_empty() {
        out.push_str("(no routing state: no endpoint has a host interface)\n");
    }
    let _ = writeln!(
        out,
        "snat: {}  fast-path: {}",
        if view.snat { "on" } else { "off" },
        if view.fast_path { "on" } else { "off" }
    );
    for p in &view.problems {
        let _ = writeln!(out, "problem: {p}");
    }
    for e in &view.errors {
        let _ = writeln!(out, "error: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{
        desired::{
            self,
            tests::{endpoint, enis, links},
        },
        diff::{self, Observed},
    };
    use super::*;

    #[test]
    fn shows_desired_against_an_empty_kernel() {
        let d = desired::build(
            &[endpoint("a", "10.0.1.10", Some("vpod0"))],
            &enis(),
            &links(),
        );
        let plan = diff::plan(&d, &Observed::default());
        let view = RoutesView {
            lines: lines(&plan.statuses, &Names::new(&links())),
            snat: true,
            ..RoutesView::default()
        };
        let text = table(&view);
        let expected = "\
KIND   STATE    DESIRED                                     ACTUAL
rule   missing  512: to 10.0.1.10 lookup main               -
rule   missing  512: to fd00::a00:10a lookup main           -
rule   missing  1536: from 10.0.1.10 lookup 101             -
rule   missing  1536: from fd00::a00:10a lookup 101         -
route  missing  default via 10.0.1.1 dev eni1 table 101     -
route  missing  10.0.1.0/24 dev eni1 scope link table 101   -
route  missing  default via fe80::1 dev eni1 table 101      -
route  missing  fd00::a00:100/120 dev eni1 table 101        -
route  missing  default via 10.0.2.1 dev renamed table 102  -
route  missing  10.0.2.0/24 dev renamed scope link table 102  -
route  missing  10.0.1.10 dev vpod0 scope link table main   -
route  missing  fd00::a00:10a dev vpod0 table main          -
neigh  missing  proxy 10.0.1.10 dev eni1                    -
neigh  missing  proxy fd00::a00:10a dev eni1                -
snat: on  fast-path: off
";
        // Column widths follow the longest cell.
        let got: Vec<&str> = text.lines().map(str::trim_end).collect();
        let want: Vec<String> = expected
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let got_words: Vec<String> = got
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(got_words, want);
    }
}
