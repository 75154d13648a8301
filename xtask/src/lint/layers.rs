//! The agent library's layers, checked against its imports.
//!
//! Every top-level module of `agent/src` sits on one floor of [`LAYERS`]
//! (docs/ARCHITECTURE.md draws the same table). A module may name only
//! modules on lower floors, through `crate::<module>` paths in code, `use`
//! groups or doc links; so there is no import cycle between top-level
//! modules, and each floor can be read without the ones above it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::Path,
};

use anyhow::{bail, Context as _};

/// The floors, lowest first. Keep docs/ARCHITECTURE.md in step.
pub const LAYERS: &[&[&str]] = &[
    // Ground floor: types and helpers that know no other module.
    &["net", "memory", "sys", "recent", "options", "heartbeat"],
    // Plumbing that knows no subsystem: the registry, kernel objects, the API server.
    &["endpoint", "bpf", "api"],
    // Telemetry: the encoder, one histogram, the metrics server; the recent
    // drops of DNS flows, which the drop tracer writes and DNS reads.
    &["metrics", "flowdrops"],
    // The shape of a subsystem, as the daemon sees it.
    &["subsystem"],
    // Subsystems, each owning its state, threads, metrics and views.
    &["conntrack", "dns", "routing", "cloud", "kube", "pods"],
    // IPAM builds on routing (ENI links) and the cloud.
    &["ipam"],
    // Configuration composes every subsystem's settings.
    &["config"],
    // The running agent wires the subsystems together; podnetctl's library
    // side (output formats, the bug-report archive) reads every subsystem's records.
    &["daemon", "ctl"],
];

/// One import that breaks the layering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The importing file, relative to the source root.
    pub file: String,
    /// Its top-level module.
    pub from: String,
    /// The module it names.
    pub to: String,
    /// Why that is not allowed.
    pub why: &'static str,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: `{}` names `crate::{}` ({})",
            self.file, self.from, self.to, self.why
        )
    }
}

/// Checks every `.rs` file below `src` (the agent's `src/`, binaries in
/// `src/bin` excluded: they stand above every floor).
pub fn check(src: &Path, layers: &[&[&str]]) -> anyhow::Result<Vec<Violation>> {
    let floor: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, mods)| mods.iter().map(move |m| (*m, i)))
        .collect();
    let mut violations = Vec::new();
    for (module, files) in top_level_modules(src)? {
        let Some(&from_floor) = floor.get(module.as_str()) else {
            bail!(
                "agent module `{module}` is on no floor: add it to LAYERS in {} and to docs/ARCHITECTURE.md",
                file!()
            );
        };
        for file in files {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let rel = file
                .strip_prefix(src)
                .unwrap_or(&file)
                .display()
                .to_string();
            for to in crate_paths(&text) {
                if to == module {
                    continue;
                }
                let Some(&to_floor) = floor.get(to.as_str()) else {
                    continue; // `crate::SomeItem` of lib.rs, not a module
                };
                let why = match to_floor.cmp(&from_floor) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => "a module on the same floor",
                    std::cmp::Ordering::Greater => "a module on a higher floor",
                };
                violations.push(Violation {
                    file: rel.clone(),
                    from: module.clone(),
                    to,
                    why,
                });
            }
        }
    }
    violations.sort_by(|a, b| (&a.file, &a.to).cmp(&(&b.file, &b.to)));
    violations.dedup();
    Ok(violations)
}

/// Top-level modules of `src` and their files: `src/<m>.rs` or everything
/// below `src/<m>/`; `lib.rs`, `main.rs` and `bin/` are not modules.
fn top_level_modules(src: &Path) -> anyhow::Result<BTreeMap<String, Vec<std::path::PathBuf>>> {
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let path = entry?.path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() {
            if name != "bin" {
                let mut files = Vec::new();
                rust_files(&path, &mut files)?;
                modules.insert(name, files);
            }
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            modules.insert(name, vec![path]);
        }
    }
    Ok(modules)
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The first segment of every `crate::` path in `text`, including each head
/// of a `use crate::{a::x, b}` group.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        // `podnet_crate::` or `my_crate::` are other names.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            found.extend(group_heads(group));
        } else {
            found.insert(identifier(rest).to_owned());
        }
    }
    found.retain(|s| !s.is_empty());
    found
}

/// The first segment of each path at depth one of a `{...}` group.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 1;
    let mut expect_head = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => expect_head = true,
            c if expect_head && depth == 1 && (c.is_alphabetic() || c == '_') => {
                heads.push(identifier(&group[i..]).to_owned());
                expect_head = false;
            }
            _ => {}
        }
    }
    heads
}

fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    /// A scratch directory removed on drop (xtask has no tempfile dependency).
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "podnet-layers-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Self(path)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const FLOORS: &[&[&str]] = &[&["net"], &["routing", "dns"], &["ipam"]];

    #[test]
    fn paths_groups_and_doc_links_are_found() {
        let found = crate_paths(
            "use crate::{\n    net::{Cidr, MacAddr},\n    routing::eni::Eni,\n    ipam,\n};\n\
             /// See [`crate::dns::view`].\nfn f() { crate::metrics::x(); podnet_crate::y(); }",
        );
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["dns", "ipam", "metrics", "net", "routing"]
        );
    }

    #[test]
    fn downward_imports_pass() {
        let src = tree(&[
            ("lib.rs", "pub mod net;"),
            ("net.rs", ""),
            ("routing/mod.rs", "use crate::net::Cidr;"),
            ("ipam/eni/mod.rs", "use crate::{net::Cidr, routing::eni};"),
            ("bin/tool.rs", "use podnet::ipam;"),
        ]);
        assert_eq!(check(src.path(), FLOORS).unwrap(), []);
    }

    #[test]
    fn a_cycle_and_a_sideways_import_fail() {
        let src = tree(&[
            ("net.rs", "//! [`crate::ipam::state`]"),
            ("routing/steer.rs", "use crate::dns::x;"),
            ("dns/mod.rs", ""),
            ("ipam/mod.rs", "use crate::net::Cidr;"),
        ]);
        let found: Vec<String> = check(src.path(), FLOORS)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            [
                "net.rs: `net` names `crate::ipam` (a module on a higher floor)",
                "routing/steer.rs: `routing` names `crate::dns` (a module on the same floor)",
            ]
        );
    }

    #[test]
    fn a_module_on_no_floor_is_an_error() {
        let src = tree(&[("steer/mod.rs", "")]);
        let error = check(src.path(), FLOORS).unwrap_err().to_string();
        assert!(
            error.starts_with("agent module `steer` is on no floor"),
            "{error}"
        );
    }

    #[test]
    fn the_agent_keeps_its_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
        let violations = check(&src, LAYERS).unwrap();
        assert!(
            violations.is_empty(),
            "imports against the layering:\n{}",
            violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
