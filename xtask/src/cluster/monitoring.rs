//! Prometheus as prometheus-operator users run it: the operator turns the shipped PodMonitor
//! and PrometheusRule into a Prometheus configuration and rule files, and a Prometheus server
//! scrapes the agents with exactly that configuration.
//!
//! In a cluster, the operator's `StatefulSet` runs Prometheus with a config-reloader that expands
//! `$(SHARD)` and `$(POD_NAME)` and an in-cluster service account. Here the Prometheus CR has no
//! replicas; `cluster up` reads the generated configuration, expands those two as the
//! reloader does, points its Kubernetes service discovery at the API server with the
//! administrator's certificate (in-cluster credentials do not exist outside a pod), and starts
//! the server in the VPC namespace. The relabelling is the operator's, untouched.

use std::{fs, path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context as _, Result};
use serde_norway::Value;

use super::{
    components::{PROMETHEUS, PROMETHEUS_OPERATOR},
    layout, pki,
    state::{self, State},
    system::{self, Place},
    up::start_daemon,
};
use crate::cmd;

/// The Prometheus server's address (in the VPC namespace; the machine reaches it).
pub const PROMETHEUS_ADDR: &str = "10.200.0.1:9090";
/// The Prometheus object of `monitoring.yaml`.
const PROMETHEUS_NAMESPACE: &str = "monitoring";
const PROMETHEUS_NAME: &str = "podnet";
/// How long the operator and the server may take.
const TIMEOUT: Duration = Duration::from_mins(2);

fn dir() -> PathBuf {
    layout::cluster_path("prometheus")
}

/// Starts the operator, waits for the configuration it generates, and starts Prometheus
/// with it.
pub fn start(state: &mut State) -> Result<()> {
    let file = layout::cluster_path("monitoring.yaml");
    fs::write(&file, include_str!("monitoring.yaml"))?;
    cmd::stdout(state::kubectl().arg("apply").arg("-f").arg(&file))?;
    let cgroup = layout::control_plane_cgroup();
    let place = Place {
        cgroup: &cgroup,
        netns: layout::VPC_NETNS,
        mount_ns: None,
    };
    let pki_file = |name: &str| pki::file(name).display().to_string();
    start_daemon(
        state,
        "prometheus-operator",
        place,
        &PROMETHEUS_OPERATOR.bin("operator"),
        &[
            format!("--apiserver={}", layout::api_server_url()),
            format!("--ca-file={}", pki_file("ca.crt")),
            format!("--cert-file={}", pki_file("admin.crt")),
            format!("--key-file={}", pki_file("admin.key")),
            "--web.listen-address=127.0.0.1:8080".to_owned(),
            "--kubelet-endpoints=false".to_owned(),
            format!("--namespaces={PROMETHEUS_NAMESPACE},kube-system"),
        ],
        &[],
    )?;
    let rules = dir().join("rules");
    fs::create_dir_all(&rules)?;
    let mut config = String::new();
    system::wait_until(
        "prometheus-operator generated the configuration and the podnet rules",
        TIMEOUT,
        || {
            config = generated_config()?;
            Ok(config.contains("podMonitor/kube-system/podnet/") && write_rule_files(&rules)? > 0)
        },
    )?;
    let config_file = dir().join("prometheus.yml");
    fs::write(&config_file, runnable_config(&config, &rules)?)?;
    start_daemon(
        state,
        "prometheus",
        place,
        &PROMETHEUS.bin("prometheus"),
        &[
            format!("--config.file={}", config_file.display()),
            format!("--storage.tsdb.path={}", dir().join("data").display()),
            format!("--web.listen-address={PROMETHEUS_ADDR}"),
        ],
        &[],
    )?;
    system::wait_until("Prometheus scrapes both agents", TIMEOUT, || {
        let up = query("up{job=\"podnet\"} == 1")?;
        Ok(up.matches("\"instance\"").count() == layout::NODES.len())
    })
}

/// The configuration the operator wrote into the Secret `prometheus-podnet`.
fn generated_config() -> Result<String> {
    let mut kubectl = state::kubectl();
    kubectl.args([
        "get",
        "secret",
        "-n",
        PROMETHEUS_NAMESPACE,
        &format!("prometheus-{PROMETHEUS_NAME}"),
        "-o",
        "go-template={{index .data \"prometheus.yaml.gz\" | base64decode}}",
    ]);
    let gz = kubectl.output().context("kubectl get secret")?;
    if !gz.status.success() {
        bail!("{}", String::from_utf8_lossy(&gz.stderr).trim());
    }
    let file = dir().join("prometheus.yaml.gz");
    fs::create_dir_all(dir())?;
    fs::write(&file, &gz.stdout)?;
    cmd::stdout(Command::new("gzip").arg("-dc").arg(&file))
}

/// Writes the rule files of the ConfigMap `prometheus-podnet-rulefiles-0` into `dir`;
/// returns how many there are.
fn write_rule_files(dir: &std::path::Path) -> Result<usize> {
    let json = cmd::stdout(state::kubectl().args([
        "get",
        "configmap",
        "-n",
        PROMETHEUS_NAMESPACE,
        &format!("prometheus-{PROMETHEUS_NAME}-rulefiles-0"),
        "-o",
        "json",
    ]))?;
    let map: serde_json::Value = serde_json::from_str(&json)?;
    let data = map["data"].as_object().cloned().unwrap_or_default();
    for (name, text) in &data {
        fs::write(dir.join(name), text.as_str().unwrap_or_default())?;
    }
    Ok(data.len())
}

/// The generated configuration made runnable outside a pod (see the module's doc): env
/// placeholders expanded, rule files at `rules`, service discovery given the API server.
fn runnable_config(generated: &str, rules: &std::path::Path) -> Result<String> {
    let expanded = generated
        .replace("$(SHARD)", "0")
        .replace("$(POD_NAME)", &format!("prometheus-{PROMETHEUS_NAME}-0"));
    let mut config: Value = serde_norway::from_str(&expanded)?;
    config["rule_files"] = Value::Sequence(vec![Value::from(
        rules.join("*.yaml").display().to_string(),
    )]);
    let tls: Value = serde_norway::from_str(&format!(
        "{{ca_file: {}, cert_file: {}, key_file: {}}}",
        pki::file("ca.crt").display(),
        pki::file("admin.crt").display(),
        pki::file("admin.key").display()
    ))?;
    for scrape in config["scrape_configs"]
        .as_sequence_mut()
        .into_iter()
        .flatten()
    {
        for sd in scrape["kubernetes_sd_configs"]
            .as_sequence_mut()
            .into_iter()
            .flatten()
        {
            sd["api_server"] = Value::from(layout::api_server_url());
            sd["tls_config"] = tls.clone();
        }
    }
    Ok(serde_norway::to_string(&config)?)
}

/// An instant query; the answer's JSON text.
pub fn query(expr: &str) -> Result<String> {
    http_get(
        PROMETHEUS_ADDR,
        &format!("/api/v1/query?query={}", percent_encode(expr)),
    )
}

/// `GET path` from `addr` over HTTP/1.0; the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let addr: std::net::SocketAddr = addr.parse()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header in the answer")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            percent_encode("up{job=\"podnet\"} == 1"),
            "up%7Bjob%3D%22podnet%22%7D%20%3D%3D%201"
        );
    }

    #[test]
    fn the_generated_configuration_runs_outside_a_pod_with_its_relabelling_intact() {
        let generated = "global:\n  external_labels:\n    prometheus_replica: $(POD_NAME)\n\
                         rule_files:\n- /etc/prometheus/rules/prometheus-podnet-rulefiles-0/*.yaml\n\
                         scrape_configs:\n- job_name: podMonitor/kube-system/podnet/0\n  \
                         kubernetes_sd_configs:\n  - role: pod\n  relabel_configs:\n  \
                         - regex: $(SHARD);|.+;.+\n    action: keep\n";
        let text = runnable_config(generated, std::path::Path::new("/r")).unwrap();
        let config: Value = serde_norway::from_str(&text).unwrap();
        assert_eq!(
            config["global"]["external_labels"]["prometheus_replica"],
            "prometheus-podnet-0"
        );
        assert_eq!(config["rule_files"][0], "/r/*.yaml");
        let scrape = &config["scrape_configs"][0];
        assert_eq!(scrape["relabel_configs"][0]["regex"], "0;|.+;.+");
        let sd = &scrape["kubernetes_sd_configs"][0];
        assert_eq!(sd["role"], "pod");
        assert_eq!(sd["api_server"], "https://10.200.0.1:6443");
        assert!(sd["tls_config"]["cert_file"]
            .as_str()
            .unwrap()
            .ends_with("pki/admin.crt"));
    }
}
