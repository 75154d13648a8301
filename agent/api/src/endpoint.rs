//! Pod attachments: the key that names one, and the endpoint podnet-cni
//! registers with the agent (the checkpoint keeps the same record).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One pod attachment registered by podnet-cni.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointRecord {
    /// The container (sandbox) id.
    pub container_id: String,
    /// The interface name inside the pod.
    pub if_name: String,
    /// The CNI network name.
    #[serde(default)]
    pub network: String,
    /// The pod's network namespace path.
    #[serde(default)]
    pub netns: String,
    /// Kubernetes namespace (`K8S_POD_NAMESPACE`).
    #[serde(default)]
    pub namespace: String,
    /// Pod name (`K8S_POD_NAME`).
    #[serde(default)]
    pub pod: String,
    /// Pod uid (`K8S_POD_UID`).
    #[serde(default)]
    pub pod_uid: String,
    /// Host-side interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The pod's addresses on this attachment.
    pub ips: Vec<IpAddr>,
}

impl EndpointRecord {
    /// The attachment's key.
    pub fn key(&self) -> AttachmentKey {
        AttachmentKey::new(&self.container_id, &self.if_name)
    }
}

/// What identifies one pod network attachment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    /// The container (sandbox) id.
    #[serde(rename = "containerId")]
    pub container_id: String,
    /// The interface name inside the pod.
    #[serde(rename = "ifName")]
    pub if_name: String,
}

impl AttachmentKey {
    /// A key.
    pub fn new(container_id: impl Into<String>, if_name: impl Into<String>) -> Self {
        Self {
            container_id: container_id.into(),
            if_name: if_name.into(),
        }
    }
}

impl std::fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container_id, self.if_name)
    }
}

/// The longest container id a runtime may pass (`CNI_CONTAINERID`).
pub const MAX_CONTAINER_ID: usize = 255;
/// The longest interface name the kernel accepts (`IFNAMSIZ` − 1).
pub const MAX_IFNAME: usize = 15;

/// Checks a container id: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 255 bytes;
/// the error says what is wrong.
pub fn validate_container_id(id: &str) -> Result<(), String> {
    let mut bytes = id.bytes();
    let ok_first = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let ok_rest = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok_first || !ok_rest || id.len() > MAX_CONTAINER_ID {
        return Err(format!(
            "CNI_CONTAINERID {id:?} must match [A-Za-z0-9][A-Za-z0-9_.-]* and be at most {MAX_CONTAINER_ID} characters"
        ));
    }
    Ok(())
}

/// Checks an interface name: 1 to 15 bytes, not `.` or `..`, no `/`, `:`,
/// whitespace or NUL; the error says what is wrong.
pub fn validate_if_name(name: &str) -> Result<(), String> {
    let bad_char = name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if name.is_empty() || name.len() > MAX_IFNAME || name == "." || name == ".." || bad_char {
        return Err(format!(
            "CNI_IFNAME {name:?} is not a valid interface name (1-{MAX_IFNAME} characters, not \".\" or \"..\", no '/', ':', whitespace or NUL)"
        ));
    }
    Ok(())
}
