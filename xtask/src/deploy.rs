//! `cargo xtask deploy render [--check]`: the kustomize bundle's manifests
//! (`deploy/manifests/`) are the Helm chart `deploy/helm/podnet` rendered with its default
//! values, one file per template. The chart is the only source; this writes the render, and
//! `--check` fails if the files on disk differ from it.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};

use crate::{cluster::components::HELM, cmd};

/// The chart, relative to the workspace root.
pub const CHART_DIR: &str = "deploy/helm/podnet";
/// The rendered manifests, relative to the workspace root.
pub const MANIFESTS_DIR: &str = "deploy/manifests";
/// The release name and namespace the bundle is rendered for.
const RELEASE: &str = "podnet";
const NAMESPACE: &str = "kube-system";
/// What `helm template` puts before each document's template path.
const SOURCE_PREFIX: &str = "# Source: podnet/templates/";

/// `cargo xtask deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(subcommand)]
    command: DeployCommand,
}

#[derive(Debug, Subcommand)]
enum DeployCommand {
    /// Write deploy/manifests/ from the chart (`helm template` with the default values).
    Render {
        /// Write nothing; fail if deploy/manifests/ is not the chart's render.
        #[arg(long)]
        check: bool,
    },
}

/// Runs `cargo xtask deploy ...`.
pub fn run(args: &DeployArgs) -> Result<()> {
    match args.command {
        DeployCommand::Render { check } => render(check),
    }
}

fn render(check: bool) -> Result<()> {
    let root = cmd::workspace_root();
    let rendered = split_by_template(&helm_template(&root)?)?;
    let dir = root.join(MANIFESTS_DIR);
    if check {
        let stale = stale_files(&dir, &rendered)?;
        if !stale.is_empty() {
            bail!(
                "{MANIFESTS_DIR} is not the render of {CHART_DIR} ({}); run `cargo xtask deploy render`",
                stale.join(", ")
            );
        }
        println!("{MANIFESTS_DIR}: the render of {CHART_DIR}, up to date");
        return Ok(());
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in existing_manifests(&dir)? {
        if !rendered.contains_key(&name) {
            fs::remove_file(dir.join(&name))?;
            println!("removed {MANIFESTS_DIR}/{name}");
        }
    }
    for (name, text) in &rendered {
        fs::write(dir.join(name), text)?;
        println!("wrote {MANIFESTS_DIR}/{name}");
    }
    Ok(())
}

/// `helm template` of the chart with its default values.
fn helm_template(root: &Path) -> Result<String> {
    let helm = HELM.bin("helm");
    if !helm.exists() {
        bail!("{} is missing; run `cargo xtask setup`", helm.display());
    }
    cmd::stdout(Command::new(helm).current_dir(root).args([
        "template",
        RELEASE,
        CHART_DIR,
        "--namespace",
        NAMESPACE,
    ]))
}

/// The `*.yaml` files in `dir`.
fn existing_manifests(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    if !dir.exists() {
        return Ok(names);
    }
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if Path::new(&name).extension().is_some_and(|e| e == "yaml") {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The files of `dir` that differ from `rendered`, are missing, or are not rendered at all.
fn stale_files(dir: &Path, rendered: &BTreeMap<String, String>) -> Result<Vec<String>> {
    let mut stale = Vec::new();
    for (name, text) in rendered {
        let path: PathBuf = dir.join(name);
        match fs::read_to_string(&path) {
            Ok(on_disk) if on_disk == *text => {}
            Ok(_) => stale.push(format!("{name} differs")),
            Err(_) => stale.push(format!("{name} missing")),
        }
    }
    for name in existing_manifests(dir)? {
        if !rendered.contains_key(&name) {
            stale.push(format!("{name} is not rendered by the chart"));
        }
    }
    Ok(stale)
}

/// `helm template`'s stream, one file per template: each file holds that template's
/// documents in order, after a line that says where it comes from.
fn split_by_template(stream: &str) -> Result<BTreeMap<String, String>> {
    let mut bodies: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for doc in stream
        .split("\n---\n")
        .map(|d| d.trim_start_matches("---\n"))
    {
        let mut lines = doc.lines();
        let Some(source) = lines.next().and_then(|l| l.strip_prefix(SOURCE_PREFIX)) else {
            if doc.trim().is_empty() {
                continue;
            }
            bail!("a rendered document does not start with `{SOURCE_PREFIX}`: {doc:.80}");
        };
        let body = format!(
            "{}\n",
            lines.collect::<Vec<_>>().join("\n").trim_end_matches('\n')
        );
        bodies.entry(source.to_owned()).or_default().push(body);
    }
    if bodies.is_empty() {
        bail!("`helm template` rendered nothing");
    }
    Ok(bodies
        .into_iter()
        .map(|(source, docs)| {
            let text = format!(
                "# Generated by `cargo xtask deploy render` from {CHART_DIR}/templates/{source}\n\
                 # with the chart's default values: edit the chart, not this file.\n{}",
                docs.join("---\n")
            );
            (source, text)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_grouped_by_template_in_order() {
        let stream =
            "---\n# Source: podnet/templates/rbac.yaml\n# why\napiVersion: v1\nkind: A\n\n\
                      ---\n# Source: podnet/templates/service.yaml\nkind: S\n\n\
                      ---\n# Source: podnet/templates/rbac.yaml\nkind: B\n";
        let files = split_by_template(stream).unwrap();
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["rbac.yaml", "service.yaml"]
        );
        let rbac = &files["rbac.yaml"];
        assert!(rbac.starts_with("# Generated by `cargo xtask deploy render` from deploy/helm/podnet/templates/rbac.yaml\n"));
        assert!(
            rbac.ends_with("this file.\n# why\napiVersion: v1\nkind: A\n---\nkind: B\n"),
            "{rbac}"
        );
        assert!(files["service.yaml"].ends_with("this file.\nkind: S\n"));
    }

    #[test]
    fn a_document_without_its_source_is_refused() {
        assert!(split_by_template("---\napiVersion: v1\n").is_err());
        assert!(split_by_template("").is_err());
    }
}
