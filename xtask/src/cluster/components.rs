//! The upstream programs of the test cluster, built from their official release modules with
//! the machine's Go and cached under [`TOOLS_ROOT`] keyed by version.
//!
//! Each component gets a small consumer module (`require <module> <version>`, nothing else)
//! and `go build`s the release's own `main` packages from it, so the dependency versions are
//! exactly the release's. `k8s.io/kubernetes` publishes a go.mod that requires its staging
//! modules (`k8s.io/api`, `k8s.io/client-go`, ...) at `v0.0.0`; its consumer module pins each
//! of them to the matching `v0.N.M` with one `replace` line, read from that go.mod.
//!
//! Versions (containerd's RELEASES.md: Kubernetes 1.34 with containerd 2.1.3+; Debian's
//! containerd 1.6.20 is older than the 1.6.39 that 1.34 needs, so containerd is built too):
//!
//! | component | version | binaries |
//! |---|---|---|
//! | Kubernetes | v1.34.4 | kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl |
//! | containerd | v2.2.10 | containerd, containerd-shim-runc-v2, ctr |
//! | cri-tools | v1.34.0 | crictl |
//! | etcd | v3.6.5 (kubeadm's default for 1.34) | etcd |
//! | CoreDNS | v1.12.1 (kubeadm's default for 1.34) | coredns (static: it runs in an image) |
//! | Helm | v4.3.2 | helm (lints, renders and installs `deploy/helm/podnet`) |
//!
//! runc comes from Debian (`runc` 1.1), as do iptables, the CNI reference plugins and
//! busybox-static for the toolbox image.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::cmd;

/// Everything the project installs beside Debian's packages lives below this directory.
pub const TOOLS_ROOT: &str = "/opt/podnet-tools";
/// The oldest Go that builds every component (Helm 4.3's go.mod says 1.26).
const MIN_GO_MINOR: u32 = 26;
/// Written into a component's directory once all its binaries are built.
const COMPLETE_STAMP: &str = ".complete";

/// One upstream program set built from a release module.
#[derive(Debug, Clone, Copy)]
pub struct Component {
    /// Short name: the cache directory is `<TOOLS_ROOT>/<name>-<version>`.
    pub name: &'static str,
    /// The Go module path of the release.
    pub module: &'static str,
    /// The release tag.
    pub version: &'static str,
    /// `(package, binary)`: each `main` package and the file name it is built to.
    pub binaries: &'static [(&'static str, &'static str)],
    /// `-X` settings for the version variables the release build stamps, with `{version}`,
    /// `{major}` and `{minor}` filled in.
    pub version_vars: &'static [&'static str],
    /// Go build tags.
    pub tags: &'static str,
    /// Build a static binary (`CGO_ENABLED=0`): it runs in a container image.
    pub static_binary: bool,
    /// Pin the staging modules that the release's go.mod requires at `v0.0.0`.
    pub pin_staging: bool,
}

/// Kubernetes: the control plane, the node agents and kubectl.
pub const KUBERNETES: Component = Component {
    name: "kubernetes",
    module: "k8s.io/kubernetes",
    version: "v1.34.4",
    binaries: &[
        ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
        (
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kube-controller-manager",
        ),
        ("k8s.io/kubernetes/cmd/kube-scheduler", "kube-scheduler"),
        ("k8s.io/kubernetes/cmd/kubelet", "kubelet"),
        ("k8s.io/kubernetes/cmd/kube-proxy", "kube-proxy"),
        ("k8s.io/kubernetes/cmd/kubectl", "kubectl"),
    ],
    version_vars: &[
        "k8s.io/component-base/version.gitVersion={version}",
        "k8s.io/component-base/version.gitMajor={major}",
        "k8s.io/component-base/version.gitMinor={minor}",
        "k8s.io/component-base/version.gitTreeState=clean",
        "k8s.io/client-go/pkg/version.gitVersion={version}",
        "k8s.io/client-go/pkg/version.gitMajor={major}",
        "k8s.io/client-go/pkg/version.gitMinor={minor}",
    ],
    tags: "",
    static_binary: false,
    pin_staging: true,
};

/// containerd and its runc shim.
pub const CONTAINERD: Component = Component {
    name: "containerd",
    module: "github.com/containerd/containerd/v2",
    version: "v2.2.10",
    binaries: &[
        (
            "github.com/containerd/containerd/v2/cmd/containerd",
            "containerd",
        ),
        (
            "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
            "containerd-shim-runc-v2",
        ),
        ("github.com/containerd/containerd/v2/cmd/ctr", "ctr"),
    ],
    version_vars: &["github.com/containerd/containerd/v2/version.Version={version}"],
    // The btrfs snapshotter needs libbtrfs headers; the cluster uses overlayfs.
    tags: "no_btrfs",
    static_binary: false,
    pin_staging: false,
};

/// crictl, to look at a node's containers as kubelet sees them.
pub const CRI_TOOLS: Component = Component {
    name: "cri-tools",
    module: "sigs.k8s.io/cri-tools",
    version: "v1.34.0",
    binaries: &[("sigs.k8s.io/cri-tools/cmd/crictl", "crictl")],
    version_vars: &["sigs.k8s.io/cri-tools/pkg/version.Version={version}"],
    tags: "",
    static_binary: false,
    pin_staging: false,
};

/// etcd, the API server's store.
pub const ETCD: Component = Component {
    name: "etcd",
    module: "go.etcd.io/etcd/server/v3",
    version: "v3.6.5",
    binaries: &[("go.etcd.io/etcd/server/v3", "etcd")],
    version_vars: &[],
    tags: "",
    static_binary: false,
    pin_staging: false,
};

/// CoreDNS, the cluster DNS (runs in an image, so static).
pub const COREDNS: Component = Component {
    name: "coredns",
    module: "github.com/coredns/coredns",
    version: "v1.12.1",
    binaries: &[("github.com/coredns/coredns", "coredns")],
    version_vars: &[],
    tags: "",
    static_binary: true,
    pin_staging: false,
};

/// prometheus-operator: generates Prometheus's scrape configuration from the shipped
/// PodMonitor and its rule files from the PrometheusRule, as it does in users' clusters.
pub const PROMETHEUS_OPERATOR: Component = Component {
    name: "prometheus-operator",
    module: "github.com/prometheus-operator/prometheus-operator",
    version: "v0.85.0",
    binaries: &[(
        "github.com/prometheus-operator/prometheus-operator/cmd/operator",
        "operator",
    )],
    version_vars: &["github.com/prometheus/common/version.Version={version}"],
    tags: "",
    static_binary: false,
    pin_staging: false,
};

/// Prometheus, which scrapes the agents with the configuration prometheus-operator generates.
/// Built from its release module because Debian's 2.42 has no Kubernetes service discovery,
/// which that configuration uses. Without the `builtinassets` tag: the API, no web UI.
pub const PROMETHEUS: Component = Component {
    name: "prometheus",
    module: "github.com/prometheus/prometheus",
    version: "v0.305.0",
    binaries: &[(
        "github.com/prometheus/prometheus/cmd/prometheus",
        "prometheus",
    )],
    version_vars: &["github.com/prometheus/common/version.Version=3.5.0"],
    tags: "",
    static_binary: false,
    pin_staging: false,
};

/// Helm: lints and renders the chart `deploy/helm/podnet` (the kustomize bundle in `deploy/`
/// is its render) and installs it on the test cluster. v4.3.2 is the newest v4 release the
/// Go module proxy serves here; its go.mod asks for Go 1.26.
pub const HELM: Component = Component {
    name: "helm",
    module: "helm.sh/helm/v4",
    version: "v4.3.2",
    binaries: &[("helm.sh/helm/v4/cmd/helm", "helm")],
    version_vars: &[
        "helm.sh/helm/v4/internal/version.version={version}",
        "helm.sh/helm/v4/internal/version.gitTreeState=clean",
    ],
    tags: "",
    static_binary: false,
    pin_staging: false,
};

/// Every component of the cluster.
pub const ALL: &[Component] = &[
    KUBERNETES,
    CONTAINERD,
    CRI_TOOLS,
    ETCD,
    COREDNS,
    PROMETHEUS_OPERATOR,
    PROMETHEUS,
    HELM,
];

impl Component {
    /// The cache directory of this version.
    pub fn dir(&self) -> PathBuf {
        Path::new(TOOLS_ROOT).join(format!("{}-{}", self.name, self.version))
    }

    /// Where binary `name` of this component is.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir().join("bin").join(name)
    }

    /// Whether every binary was built (the stamp is written after the last one).
    pub fn is_built(&self) -> bool {
        self.dir().join(COMPLETE_STAMP).exists()
            && self
                .binaries
                .iter()
                .all(|(_, binary)| self.bin(binary).exists())
    }

    /// `name version`, for messages.
    pub fn label(&self) -> String {
        format!("{} {}", self.name, self.version)
    }

    /// Builds the component with `go` into its cache directory.
    pub fn build(&self, go: &Path) -> Result<()> {
        let dir = self.dir();
        let src = dir.join("src");
        fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
        let _ = fs::remove_file(dir.join(COMPLETE_STAMP));
        let release_go_mod = self.release_go_mod(go)?;
        let staging = if self.pin_staging {
            let staging = parse_staging_requires(&release_go_mod);
            if staging.is_empty() {
                bail!("{}'s go.mod requires no module at v0.0.0", self.label());
            }
            staging
        } else {
            Vec::new()
        };
        let mut go_mod = self.consumer_go_mod(&staging);
        // A consumer module ignores the release's own replace directives: carry over those
        // that pin another version (those to local directories name modules the proxy has).
        for replace in parse_version_replaces(&release_go_mod) {
            let _ = writeln!(go_mod, "\nreplace {replace}");
        }
        fs::write(src.join("go.mod"), go_mod)?;
        let mut build = go_command(go, &src);
        // `-o DIR/` names each binary after its package's last path element; a single
        // package is given its file name instead.
        let output = match self.binaries {
            [(_, binary)] => dir.join("bin").join(binary),
            _ => dir.join("bin").join(""),
        };
        build
            .args(["build", "-trimpath", "-ldflags", &self.ldflags()])
            .arg("-o")
            .arg(output);
        if !self.tags.is_empty() {
            build.args(["-tags", self.tags]);
        }
        if self.static_binary {
            build.env("CGO_ENABLED", "0");
        }
        build.args(self.binaries.iter().map(|(package, _)| *package));
        cmd::run(&mut build).with_context(|| format!("building {}", self.label()))?;
        for (_, binary) in self.binaries {
            if !self.bin(binary).exists() {
                bail!("building {} did not produce {binary}", self.label());
            }
        }
        fs::write(dir.join(COMPLETE_STAMP), b"")?;
        Ok(())
    }

    /// The consumer module: the release required, staging modules pinned.
    fn consumer_go_mod(&self, replaces: &[String]) -> String {
        let mut text = format!(
            "// Generated by `cargo xtask setup`: builds {module} {version} from its release.\n\
             module podnet.local/build/{name}\n\ngo 1.{MIN_GO_MINOR}\n\nrequire {module} {version}\n",
            module = self.module,
            version = self.version,
            name = self.name,
        );
        if !replaces.is_empty() {
            text.push_str("\nreplace (\n");
            let version = staging_version(self.version);
            for module in replaces {
                let _ = writeln!(text, "\t{module} => {module} {version}");
            }
            text.push_str(")\n");
        }
        text
    }

    /// The text of the release's own go.mod.
    fn release_go_mod(&self, go: &Path) -> Result<String> {
        let json = cmd::stdout(
            go_command(go, Path::new(TOOLS_ROOT))
                .args(["mod", "download", "-json"])
                .arg(format!("{}@{}", self.module, self.version)),
        )?;
        let info: serde_json::Value =
            serde_json::from_str(&json).context("reading `go mod download -json`")?;
        let go_mod = info
            .get("GoMod")
            .and_then(serde_json::Value::as_str)
            .context("`go mod download -json` names no GoMod file")?;
        fs::read_to_string(go_mod).with_context(|| format!("reading {go_mod}"))
    }

    fn ldflags(&self) -> String {
        let (major, minor) = major_minor(self.version);
        let mut flags = vec!["-s".to_owned(), "-w".to_owned()];
        for var in self.version_vars {
            flags.push("-X".to_owned());
            flags.push(
                var.replace("{version}", self.version)
                    .replace("{major}", major)
                    .replace("{minor}", minor),
            );
        }
        flags.join(" ")
    }
}

/// `v1.34.4` -> `v0.34.4`: the staging modules' tag for a Kubernetes release.
fn staging_version(version: &str) -> String {
    match version.strip_prefix("v1.") {
        Some(rest) => format!("v0.{rest}"),
        None => version.to_owned(),
    }
}

/// `v1.34.4` -> (`1`, `34`).
fn major_minor(version: &str) -> (&str, &str) {
    let mut parts = version.trim_start_matches('v').split('.');
    (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
}

/// Module paths required at exactly `v0.0.0` in a go.mod's text.
fn parse_staging_requires(go_mod: &str) -> Vec<String> {
    let mut modules: Vec<String> = go_mod
        .lines()
        .filter_map(|line| {
            let line = line.split("//").next()?.trim();
            let line = line.strip_prefix("require ").unwrap_or(line);
            let mut words = line.split_whitespace();
            let (module, version) = (words.next()?, words.next()?);
            (version == "v0.0.0" && words.next().is_none()).then(|| module.to_owned())
        })
        .collect();
    modules.sort();
    modules.dedup();
    modules
}

/// The replace directives of a go.mod that pin a module to another version (`a v1 => a v2`,
/// in a block or on their own line); those to local directories are left out.
fn parse_version_replaces(go_mod: &str) -> Vec<String> {
    let mut in_block = false;
    let mut out = Vec::new();
    for line in go_mod.lines() {
        let line = line.split("//").next().unwrap_or("").trim();
        if line == "replace (" {
            in_block = true;
            continue;
        }
        if in_block && line == ")" {
            in_block = false;
            continue;
        }
        let directive = if in_block {
            line
        } else if let Some(rest) = line.strip_prefix("replace ") {
            rest.trim()
        } else {
            continue;
        };
        let Some((_, target)) = directive.split_once("=>") else {
            continue;
        };
        let target = target.trim();
        let local = target.starts_with('.') || target.starts_with('/');
        if !local && target.split_whitespace().count() == 2 {
            out.push(directive.to_owned());
        }
    }
    out
}

/// A `go` command in `dir` that never downloads a toolchain and may update go.sum.
fn go_command(go: &Path, dir: &Path) -> Command {
    let mut command = Command::new(go);
    command
        .current_dir(dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod -buildvcs=false");
    command
}

/// The Go toolchain to build with: the first of `/usr/local/go/bin/go` and `go` on PATH that
/// is at least 1.[`MIN_GO_MINOR`] (Debian's `golang-go`, 1.19, may come first on PATH).
pub fn find_go() -> Result<PathBuf> {
    let mut seen = Vec::new();
    for candidate in [PathBuf::from("/usr/local/go/bin/go"), PathBuf::from("go")] {
        let Ok(version) = cmd::stdout(Command::new(&candidate).args(["env", "GOVERSION"])) else {
            continue;
        };
        let version = version.trim().to_owned();
        if go_minor(&version).is_some_and(|minor| minor >= MIN_GO_MINOR) {
            return Ok(candidate);
        }
        seen.push(format!("{} is {version}", candidate.display()));
    }
    bail!(
        "no Go 1.{MIN_GO_MINOR} or newer found ({}); the cluster's components build with it",
        if seen.is_empty() {
            "none at all".to_owned()
        } else {
            seen.join(", ")
        }
    )
}

/// `go1.26.8` -> 26.
fn go_minor(version: &str) -> Option<u32> {
    version
        .strip_prefix("go1.")?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// prometheus-operator's CRDs (from `example/prometheus-operator-crd/` of its release
/// module): the PodMonitor and PrometheusRule of the shipped bundle, and what the operator
/// itself watches.
const MONITORING_CRDS: &[&str] = &[
    "monitoring.coreos.com_podmonitors.yaml",
    "monitoring.coreos.com_prometheusrules.yaml",
    "monitoring.coreos.com_prometheuses.yaml",
    "monitoring.coreos.com_servicemonitors.yaml",
    "monitoring.coreos.com_probes.yaml",
    "monitoring.coreos.com_scrapeconfigs.yaml",
    "monitoring.coreos.com_prometheusagents.yaml",
    "monitoring.coreos.com_alertmanagers.yaml",
    "monitoring.coreos.com_alertmanagerconfigs.yaml",
    "monitoring.coreos.com_thanosrulers.yaml",
];

/// Where the monitoring CRDs are cached.
fn monitoring_crd_dir() -> PathBuf {
    PROMETHEUS_OPERATOR.dir().join("crds")
}

/// The cached monitoring CRD files.
pub fn monitoring_crds() -> Result<Vec<PathBuf>> {
    let dir = monitoring_crd_dir();
    let files: Vec<PathBuf> = MONITORING_CRDS.iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        bail!("{} is missing; run `cargo xtask setup`", missing.display());
    }
    Ok(files)
}

fn ensure_monitoring_crds(go: &Path) -> Result<()> {
    let (module, version) = (PROMETHEUS_OPERATOR.module, PROMETHEUS_OPERATOR.version);
    let json = cmd::stdout(
        go_command(go, Path::new(TOOLS_ROOT))
            .args(["mod", "download", "-json"])
            .arg(format!("{module}@{version}")),
    )?;
    let info: serde_json::Value = serde_json::from_str(&json)?;
    let source = info
        .get("Dir")
        .and_then(serde_json::Value::as_str)
        .context("`go mod download -json` names no Dir")?;
    let dir = monitoring_crd_dir();
    fs::create_dir_all(&dir)?;
    for file in MONITORING_CRDS {
        let from = Path::new(source)
            .join("example/prometheus-operator-crd")
            .join(file);
        fs::copy(&from, dir.join(file)).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// What is missing of the cluster's programs and files, as short descriptions.
pub fn missing() -> Vec<String> {
    let mut missing: Vec<String> = ALL
        .iter()
        .filter(|c| !c.is_built())
        .map(|c| format!("{} (built from its release module)", c.label()))
        .collect();
    if monitoring_crds().is_err() {
        missing.push(format!("{} CRDs", PROMETHEUS_OPERATOR.label()));
    }
    missing
}

/// Builds every component that is missing.
pub fn ensure_all() -> Result<()> {
    let missing: Vec<&Component> = ALL.iter().filter(|c| !c.is_built()).collect();
    for component in ALL.iter().filter(|c| c.is_built()) {
        println!("ok: {} already built", component.label());
    }
    let crds_missing = monitoring_crds().is_err();
    if missing.is_empty() && !crds_missing {
        return Ok(());
    }
    let go = find_go()?;
    for component in missing {
        println!("installing: {} from its release module", component.label());
        component.build(&go)?;
    }
    if crds_missing {
        println!("installing: {} CRDs", PROMETHEUS_OPERATOR.label());
        ensure_monitoring_crds(&go)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_requires_are_the_v0_0_0_ones() {
        let go_mod = "module k8s.io/kubernetes\n\nrequire (\n\tgithub.com/x/y v1.2.3\n\
                      \tk8s.io/api v0.0.0\n\tk8s.io/utils v0.0.0-20250604170112-4c0f3b243397\n\
                      \tk8s.io/client-go v0.0.0 // indirect\n)\n\nrequire k8s.io/kubelet v0.0.0\n";
        assert_eq!(
            parse_staging_requires(go_mod),
            ["k8s.io/api", "k8s.io/client-go", "k8s.io/kubelet"]
        );
    }

    #[test]
    fn version_replaces_are_carried_over_and_local_ones_left_out() {
        let go_mod = "module x\n\nreplace github.com/fsnotify/fsnotify v1.8.0 => github.com/fsnotify/fsnotify v1.7.0\n\
                      replace (\n\tgithub.com/a/b => ./b\n\tgithub.com/c/d => github.com/c/d v0.2.0 // why\n)\n";
        assert_eq!(
            parse_version_replaces(go_mod),
            [
                "github.com/fsnotify/fsnotify v1.8.0 => github.com/fsnotify/fsnotify v1.7.0",
                "github.com/c/d => github.com/c/d v0.2.0"
            ]
        );
    }

    #[test]
    fn consumer_module_pins_staging_to_the_release() {
        let text = KUBERNETES.consumer_go_mod(&["k8s.io/api".to_owned()]);
        assert!(
            text.contains("require k8s.io/kubernetes v1.34.4\n"),
            "{text}"
        );
        assert!(
            text.contains("\tk8s.io/api => k8s.io/api v0.34.4\n"),
            "{text}"
        );
        assert!(!ETCD.consumer_go_mod(&[]).contains("replace"));
    }

    #[test]
    fn version_stamps() {
        let flags = KUBERNETES.ldflags();
        assert!(flags.starts_with("-s -w -X "), "{flags}");
        assert!(flags.contains("-X k8s.io/component-base/version.gitMinor=34"));
        assert!(flags.contains("-X k8s.io/client-go/pkg/version.gitVersion=v1.34.4"));
        assert_eq!(go_minor("go1.26.8"), Some(26));
        assert_eq!(go_minor("go1.19"), Some(19));
        assert_eq!(go_minor("devel"), None);
    }
}
