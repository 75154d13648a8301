//! Parameters and results of the agent's endpoint and IPAM methods, shared
//! by podnet-cni, podnetctl and the agent.

use serde::{Deserialize, Serialize};

use crate::{
    endpoint::{AttachmentKey, EndpointRecord},
    ipam::{Allocation, Cooldown, EniStatus, PoolUsage},
};

/// The CNI command a call is made for (a metrics label); `podnetctl` and
/// other callers leave it empty.
pub type CommandName = String;

/// `ipam.allocate`, `ipam.release`, `endpoint.del`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeyParams {
    /// CNI command.
    #[serde(default)]
    pub command: CommandName,
    /// Container id.
    pub container_id: String,
    /// Interface name.
    pub if_name: String,
    /// CNI network name.
    #[serde(default)]
    pub network: String,
}

impl KeyParams {
    /// The attachment key.
    pub fn key(&self) -> AttachmentKey {
        AttachmentKey::new(&self.container_id, &self.if_name)
    }
}

/// `endpoint.add`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AddParams {
    /// CNI command.
    #[serde(default)]
    pub command: CommandName,
    /// The endpoint.
    pub endpoint: EndpointRecord,
}

impl Default for AddParams {
    fn default() -> Self {
        Self {
            command: String::new(),
            endpoint: EndpointRecord {
                container_id: String::new(),
                if_name: String::new(),
                network: String::new(),
                netns: String::new(),
                namespace: String::new(),
                pod: String::new(),
                pod_uid: String::new(),
                interface: None,
                ips: Vec::new(),
            },
        }
    }
}

/// `endpoint.check`: what the runtime believes the attachment is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CheckParams {
    /// CNI command.
    #[serde(default)]
    pub command: CommandName,
    /// Container id.
    pub container_id: String,
    /// Interface name.
    pub if_name: String,
    /// Addresses from the previous result.
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// Host-side interface from the previous result.
    #[serde(default)]
    pub interface: Option<String>,
}

/// `endpoint.gc`, `ipam.gc`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GcParams {
    /// CNI command.
    #[serde(default)]
    pub command: CommandName,
    /// The network whose attachments are collected; all when empty.
    #[serde(default)]
    pub network: String,
    /// Attachments to keep.
    #[serde(default)]
    pub valid: Vec<AttachmentKey>,
}

/// `ipam.status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StatusParams {
    /// CNI command.
    #[serde(default)]
    pub command: CommandName,
    /// Return this attachment's allocation too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// With `container_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_name: Option<String>,
}

/// Result of `ipam.status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamStatus {
    /// `node-cidr` or `eni`.
    pub mode: String,
    /// Use of each pool.
    pub pools: Vec<PoolUsage>,
    /// Addresses cooling down.
    pub cooldowns: Vec<Cooldown>,
    /// Allocations.
    pub allocations: usize,
    /// Why an ADD would fail for lack of addresses now, if it would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhausted: Option<String>,
    /// The asked attachment's allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Allocation>,
    /// ENI mode: the instance and each ENI's use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eni: Option<EniStatus>,
}

/// Result of `ipam.release`, `endpoint.del`, and the GCs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// How many were released or removed.
    pub removed: usize,
}
