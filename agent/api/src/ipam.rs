//! What the agent's IPAM answers: allocations, pool use, cooldowns and, in
//! ENI mode, each ENI's use.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::{endpoint::AttachmentKey, net::Cidr};

/// One address handed out, with how the pod configures it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    /// The address.
    pub ip: IpAddr,
    /// Its prefix (the pod's subnet).
    pub prefix: Cidr,
    /// The gateway of that subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// The addresses of one attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Which attachment.
    #[serde(flatten)]
    pub key: AttachmentKey,
    /// The CNI network name it was allocated for (GC is per network).
    #[serde(default)]
    pub network: String,
    /// One address per family.
    pub ips: Vec<Assigned>,
    /// Unix time of the allocation, in milliseconds.
    #[serde(rename = "allocatedUnixMs")]
    pub allocated_unix_ms: u64,
}

/// An address that was released and may not be handed out before `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cooldown {
    /// The address.
    pub ip: IpAddr,
    /// Unix time in milliseconds from which it may be reused.
    #[serde(rename = "untilUnixMs")]
    pub until_unix_ms: u64,
}

/// Use of one address source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolUsage {
    /// The source's name, e.g. `node-cidr 10.244.1.0/24`.
    pub name: String,
    /// Its prefix.
    pub prefix: Cidr,
    /// Its gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Addresses it can hand out (saturating for huge IPv6 prefixes).
    pub capacity: u64,
    /// Addresses handed out.
    pub allocated: u64,
    /// Addresses cooling down.
    pub cooldown: u64,
    /// Addresses free now.
    pub free: u64,
}

impl PoolUsage {
    /// `node-cidr 10.244.1.0/24: 253/253 addresses allocated, 4 cooling down`.
    pub fn describe(&self) -> String {
        format!(
            "{}: {}/{} addresses allocated, {} cooling down",
            self.name, self.allocated, self.capacity, self.cooldown
        )
    }
}

/// What `ipam.status` adds in ENI mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniStatus {
    /// Instance id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Instance type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// Interfaces the instance type can attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_enis: Option<u32>,
    /// Pods the instance can hold (ENIs × (addresses per ENI − 1), × 16
    /// with prefix delegation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pods: Option<u32>,
    /// Whether ENIs hold `/28` prefixes instead of single addresses.
    #[serde(default)]
    pub prefix_delegation: bool,
    /// EC2 answers `InsufficientCidrBlocks` since the agent started.
    #[serde(default)]
    pub insufficient_cidr_blocks: u64,
    /// Per ENI.
    pub enis: Vec<EniUsage>,
    /// The last cloud error, while it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// More pods the node can address: the ENIs it may attach (less those
    /// attached by someone else) times their secondary addresses, less the
    /// addresses allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods_remaining: Option<u32>,
    /// Free addresses of the pods' subnet, as EC2 last reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_free: Option<u64>,
}

/// Use of one ENI (`podnetctl ipam`, `podnet_ipam_eni_addresses`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniUsage {
    /// `eni-...`.
    pub eni: String,
    /// Attachment slot.
    pub device_index: u32,
    /// Kernel link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Whether podnet created it.
    pub managed: bool,
    /// Primary address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_ip: Option<Ipv4Addr>,
    /// Pod addresses (secondary addresses, or those of its prefixes).
    pub addresses: u64,
    /// Delegated `/28` prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// Of which allocated to pods.
    pub allocated: u64,
    /// Of which cooling down.
    pub cooldown: u64,
    /// Of which free.
    pub free: u64,
}
