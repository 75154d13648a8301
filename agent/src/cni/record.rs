//! An endpoint as podnet-cni registers it with the agent, and as the
//! checkpoint keeps it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{endpoint::Endpoint, ipam::allocator::AttachmentKey};

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

    /// The registry's view of it.
    pub fn to_endpoint(&self) -> Endpoint {
        Endpoint {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            ips: self.ips.clone(),
            interface: self.interface.clone(),
            container_id: Some(self.container_id.clone()),
            if_name: Some(self.if_name.clone()),
        }
    }
}
