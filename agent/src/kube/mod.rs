//! The agent's only use of the Kubernetes API: a `GET` of its own Node, at start, for the
//! node's pod CIDRs (`spec.podCIDRs`) in node-cidr IPAM mode.
//!
//! No list, no watch, nothing per pod: the load on the API server is one request per agent
//! start (a few more while kube-controller-manager has not assigned the CIDRs yet). The
//! credentials are the pod's projected service-account token (re-read on every request: the
//! kubelet rotates it) and the cluster CA, and the address is the `kubernetes` Service's
//! (`KUBERNETES_SERVICE_HOST`/`_PORT`, which the kubelet sets in every container; reached
//! through kube-proxy, without DNS).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use crate::net::Cidr;

/// Where the kubelet mounts the service-account token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Not in a pod: no `KUBERNETES_SERVICE_HOST`.
    #[error("KUBERNETES_SERVICE_HOST is not set: not running in a Kubernetes pod")]
    NotInCluster,
    /// A credential file could not be read.
    #[error("reading {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TLS could not be set up with the cluster CA.
    #[error("TLS with the cluster CA {path}: {message}")]
    Tls {
        /// The CA file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The request did not get an answer.
    #[error("GET {url}: {message}")]
    Transport {
        /// The URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// The API server refused (RBAC, missing Node, ...).
    #[error("GET {url}: HTTP {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The answer's body (a Kubernetes `Status` object), shortened.
        body: String,
    },
    /// The Node object could not be read.
    #[error("Node {node}: {message}")]
    Node {
        /// The node's name.
        node: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A client for the API server of the cluster the agent runs in.
#[derive(Clone)]
pub struct InCluster {
    base_url: String,
    token_path: PathBuf,
    agent: ureq::Agent,
}

impl std::fmt::Debug for InCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InCluster")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl InCluster {
    /// The in-cluster client: the address from the environment the kubelet sets, the token
    /// and CA from [`SERVICE_ACCOUNT_DIR`].
    pub fn from_environment() -> Result<Self, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".to_owned());
        let dir = PathBuf::from(SERVICE_ACCOUNT_DIR);
        Self::new(
            &base_url(&host, &port),
            dir.join("token"),
            &dir.join("ca.crt"),
        )
    }

    /// A client for `base_url` trusting the CA in `ca_path`, authenticating with the bearer
    /// token read from `token_path` on each request.
    pub fn new(base_url: &str, token_path: PathBuf, ca_path: &Path) -> Result<Self, KubeError> {
        let pem = std::fs::read(ca_path).map_err(|source| KubeError::Credentials {
            path: ca_path.to_owned(),
            source,
        })?;
        let tls_error = |message: String| KubeError::Tls {
            path: ca_path.to_owned(),
            message,
        };
        let ca = native_tls::Certificate::from_pem(&pem).map_err(|e| tls_error(e.to_string()))?;
        let tls = native_tls::TlsConnector::builder()
            .add_root_certificate(ca)
            .build()
            .map_err(|e| tls_error(e.to_string()))?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(REQUEST_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .tls_connector(Arc::new(tls))
            .build();
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            token_path,
            agent,
        })
    }

    /// `GET /api/v1/nodes/<node>`: the Node's pod CIDRs, empty while none is assigned.
    pub fn node_pod_cidrs(&self, node: &str) -> Result<Vec<Cidr>, KubeError> {
        let url = format!("{}/api/v1/nodes/{}", self.base_url, path_segment(node));
        let token =
            std::fs::read_to_string(&self.token_path).map_err(|source| KubeError::Credentials {
                path: self.token_path.clone(),
                source,
            })?;
        let answer = match self
            .agent
            .get(&url)
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .set("Accept", "application/json")
            .set(
                "User-Agent",
                concat!("podnet-agent/", env!("CARGO_PKG_VERSION")),
            )
            .call()
        {
            Ok(answer) => answer,
            Err(ureq::Error::Status(status, answer)) => {
                let body = answer.into_string().unwrap_or_default();
                return Err(KubeError::Status {
                    url,
                    status,
                    body: body.chars().take(300).collect(),
                });
            }
            Err(ureq::Error::Transport(e)) => {
                return Err(KubeError::Transport {
                    url,
                    message: e.to_string(),
                })
            }
        };
        let body = answer.into_string().map_err(|e| KubeError::Transport {
            url: url.clone(),
            message: format!("reading the answer: {e}"),
        })?;
        parse_pod_cidrs(node, &body)
    }
}

/// The first wait between two tries of [`wait_for_pod_cidrs`]; it doubles up to
/// [`MAX_RETRY_WAIT`].
const FIRST_RETRY_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between two tries.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// Asks for `node`'s pod CIDRs until it has some: the controller-manager assigns them soon
/// after the Node registers, and an API server that is briefly away, or RBAC being fixed,
/// should not need an agent restart. `waiting` is told why each try failed.
pub fn wait_for_pod_cidrs(
    client: &InCluster,
    node: &str,
    mut waiting: impl FnMut(&str),
) -> Vec<Cidr> {
    let mut wait = FIRST_RETRY_WAIT;
    loop {
        let reason = match client.node_pod_cidrs(node) {
            Ok(cidrs) if !cidrs.is_empty() => return cidrs,
            Ok(_) => format!("Node {node} has no spec.podCIDRs yet"),
            Err(e) => e.to_string(),
        };
        waiting(&reason);
        std::thread::sleep(wait);
        wait = (wait * 2).min(MAX_RETRY_WAIT);
    }
}

/// `https://<host>:<port>`, with brackets around an IPv6 host.
fn base_url(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

/// A node name as a URL path segment. Node names are DNS subdomains (lower-case letters,
/// digits, `-` and `.`); anything else is percent-encoded rather than trusted.
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct NodeObject {
    #[serde(default)]
    spec: NodeSpec,
}

#[derive(Default, Deserialize)]
struct NodeSpec {
    #[serde(default, rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(default, rename = "podCIDRs")]
    pod_cidrs: Vec<String>,
}

/// The pod CIDRs of a Node object: `spec.podCIDRs`, else the older single `spec.podCIDR`.
pub fn parse_pod_cidrs(node: &str, json: &str) -> Result<Vec<Cidr>, KubeError> {
    let object: NodeObject = serde_json::from_str(json).map_err(|e| KubeError::Node {
        node: node.to_owned(),
        message: format!("not a Node object: {e}"),
    })?;
    let spec = object.spec;
    let texts = if spec.pod_cidrs.is_empty() {
        spec.pod_cidr.into_iter().collect()
    } else {
        spec.pod_cidrs
    };
    texts
        .iter()
        .map(|text| {
            text.parse().map_err(|e| KubeError::Node {
                node: node.to_owned(),
                message: format!("spec.podCIDRs: {e}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidrs_of_a_node() {
        let json = r#"{"kind":"Node","metadata":{"name":"node-1"},
            "spec":{"podCIDR":"10.244.1.0/24","podCIDRs":["10.244.1.0/24","fd00:10:244:1::/64"]}}"#;
        let cidrs = parse_pod_cidrs("node-1", json).unwrap();
        assert_eq!(
            cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.244.1.0/24", "fd00:10:244:1::/64"]
        );
    }

    #[test]
    fn the_single_pod_cidr_of_older_nodes_counts() {
        let json = r#"{"spec":{"podCIDR":"10.244.2.0/24"}}"#;
        assert_eq!(
            parse_pod_cidrs("n", json).unwrap()[0].to_string(),
            "10.244.2.0/24"
        );
    }

    #[test]
    fn a_node_without_cidrs_has_none_yet() {
        assert!(parse_pod_cidrs("n", r#"{"spec":{}}"#).unwrap().is_empty());
        assert!(parse_pod_cidrs("n", r#"{"metadata":{}}"#)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bad_objects_are_errors_that_name_the_node() {
        for bad in [
            "",
            "node",
            r#"{"spec":"x"}"#,
            r#"{"spec":{"podCIDRs":"10.0.0.0/8"}}"#,
        ] {
            let err = parse_pod_cidrs("node-7", bad).unwrap_err().to_string();
            assert!(
                err.starts_with("Node node-7: not a Node object"),
                "{bad}: {err}"
            );
        }
        let err = parse_pod_cidrs("node-7", r#"{"spec":{"podCIDRs":["10.244.1.5/24"]}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("host bits"), "{err}");
    }

    #[test]
    fn urls() {
        assert_eq!(base_url("10.96.0.1", "443"), "https://10.96.0.1:443");
        assert_eq!(base_url("fd00::1", "443"), "https://[fd00::1]:443");
        assert_eq!(
            path_segment("ip-10-0-1-5.ec2.internal"),
            "ip-10-0-1-5.ec2.internal"
        );
        assert_eq!(path_segment("a/../b c"), "a%2F..%2Fb%20c");
    }
}
