//! The cloud provider behind ENI mode: who this instance is, which network
//! interfaces it has, and the calls that change them.
//!
//! [`CloudProvider`] is the seam: the ENI IPAM (`ipam::eni`) is
//! unit-tested against a fake, and [`ec2::Ec2`] implements it with the EC2
//! Query API (form-encoded POSTs signed with [`sigv4`], XML answers read by
//! [`xml`]), identity and credentials from the instance metadata service
//! ([`imds`]). Every call is counted per action and result ([`ApiCalls`]).

pub mod credentials;
pub mod ec2;
pub mod http;
pub mod imds;
pub mod partition;
pub mod sigv4;
pub mod xml;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};

use crate::net::{Cidr, MacAddr};

/// Tag key podnet puts on the interfaces it creates; only those are ever
/// detached or deleted.
pub const MANAGED_TAG: &str = "podnet.io/managed";

/// Who this instance is, as the metadata service tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceIdentity {
    /// `i-...`.
    pub instance_id: String,
    /// The instance type, e.g. `t3.medium`.
    pub instance_type: String,
    /// The region, e.g. `us-east-1`.
    pub region: String,
    /// The availability zone, e.g. `us-east-1a`.
    pub availability_zone: String,
    /// MAC of the primary interface.
    pub mac: MacAddr,
    /// Subnet of the primary interface; new interfaces go there too.
    pub subnet_id: String,
    /// The subnet's IPv4 CIDR.
    pub subnet_cidr: Cidr,
    /// Security groups of the primary interface; new interfaces get them too.
    pub security_groups: Vec<String>,
}

/// Interface limits of an instance type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceLimits {
    /// Network interfaces that can be attached.
    pub max_enis: u32,
    /// IPv4 addresses per interface, the primary included. With prefix
    /// delegation each secondary address slot holds a /28 prefix instead.
    pub ips_per_eni: u32,
}

impl InstanceLimits {
    /// Pod addresses the instance can hold: every slot but each interface's
    /// primary address, times the addresses a slot holds (`u32::MAX` when the
    /// product does not fit).
    pub fn max_pods(&self, kind: SlotKind) -> u32 {
        self.max_enis
            .saturating_mul(self.ips_per_eni.saturating_sub(1))
            .saturating_mul(kind.size())
    }
}

/// What one of an interface's secondary slots holds: one address, or with
/// prefix delegation a `/28` prefix of 16 (EC2's `Ipv4PrefixCount`). podnet
/// names a prefix by its first address, so the warm pool, the ledger and the
/// calls below count slots the same way in both modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotKind {
    /// A secondary private address.
    #[default]
    Address,
    /// A `/28` prefix.
    Prefix,
}

/// Length of the IPv6 prefix delegated for pods (as the AWS VPC CNI's IPv6
/// mode).
pub const IPV6_PREFIX_LEN: u8 = 80;

impl SlotKind {
    /// Prefix length of a delegated prefix.
    pub const PREFIX_LEN: u8 = 28;

    /// Addresses one slot holds.
    pub const fn size(self) -> u32 {
        match self {
            Self::Address => 1,
            Self::Prefix => 1 << (32 - Self::PREFIX_LEN),
        }
    }

    /// The slot `ip` is in, named by its first address.
    pub fn slot_of(self, ip: Ipv4Addr) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(ip) & !(self.size() - 1))
    }

    /// The addresses of the slot named `slot`.
    pub fn addresses(self, slot: Ipv4Addr) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.slot_of(slot));
        // A slot is aligned to its size, so its last address cannot overflow.
        (0..self.size()).map(move |i| Ipv4Addr::from(first | i))
    }

    /// The slots `eni` holds of this kind, ascending: its secondary addresses,
    /// or the first addresses of its `/28` prefixes.
    pub fn slots(self, eni: &EniInfo) -> Vec<Ipv4Addr> {
        match self {
            Self::Address => eni.secondary_ips.clone(),
            Self::Prefix => eni
                .prefixes
                .iter()
                .filter(|p| p.prefix_len() == Self::PREFIX_LEN)
                .filter_map(Cidr::network_v4)
                .collect(),
        }
    }

    /// How logs and errors name a slot.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::Prefix => "/28 prefix",
        }
    }
}

/// One network interface attached to this instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniInfo {
    /// `eni-...`.
    pub id: String,
    /// Its MAC; the kernel link with this MAC is the interface.
    pub mac: MacAddr,
    /// Attachment slot; 0 is the primary interface.
    pub device_index: u32,
    /// `eni-attach-...`, needed to detach.
    pub attachment_id: String,
    /// Its subnet.
    pub subnet_id: String,
    /// Its security groups.
    pub security_groups: Vec<String>,
    /// The primary address; never given to a pod.
    pub primary_ip: Ipv4Addr,
    /// Secondary addresses, ascending.
    pub secondary_ips: Vec<Ipv4Addr>,
    /// Delegated IPv4 prefixes (`/28`), ascending.
    pub prefixes: Vec<Cidr>,
    /// Delegated IPv6 prefixes (`/80`), ascending.
    pub ipv6_prefixes: Vec<Cidr>,
    /// Whether podnet created it (tag [`MANAGED_TAG`]).
    pub managed: bool,
}

/// Errors of cloud calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    /// The endpoint could not be reached or the answer was cut off.
    #[error("{action}: {message}")]
    Transport {
        /// The API action or metadata path.
        action: String,
        /// What happened.
        message: String,
    },
    /// The API refused the call.
    #[error("{action}: {code}: {message}")]
    Api {
        /// The API action.
        action: String,
        /// The error code, e.g. `RequestLimitExceeded`.
        code: String,
        /// The error message.
        message: String,
    },
    /// The answer could not be understood.
    #[error("{action}: unexpected answer: {message}")]
    Decode {
        /// The API action or metadata path.
        action: String,
        /// What is wrong.
        message: String,
    },
    /// No credentials were found.
    #[error("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or attach an instance profile ({0})")]
    NoCredentials(String),
}

impl CloudError {
    /// Whether the API asked to slow down.
    pub fn is_throttle(&self) -> bool {
        matches!(self, Self::Api { code, .. } if code == "RequestLimitExceeded" || code == "Throttling" || code.ends_with("Throttled"))
    }

    /// Whether EC2 found no free `/28` block in the subnet for a prefix: its
    /// free addresses are too scattered (`InsufficientCidrBlocks`).
    pub fn is_insufficient_cidr_blocks(&self) -> bool {
        matches!(self, Self::Api { code, .. } if code == "InsufficientCidrBlocks")
    }

    /// The `result` label of [`ApiCalls`].
    pub fn result_label(&self) -> &'static str {
        match self {
            _ if self.is_throttle() => "throttled",
            Self::Api { .. } => "error",
            Self::Transport { .. } | Self::NoCredentials(_) => "unreachable",
            Self::Decode { .. } => "bad_answer",
        }
    }
}

/// The cloud calls ENI mode makes. Blocking: they run on the ENI thread.
pub trait CloudProvider: Send + Sync {
    /// This instance.
    fn identity(&self) -> Result<InstanceIdentity, CloudError>;
    /// Interface limits of `instance_type` (`DescribeInstanceTypes`).
    fn limits(&self, instance_type: &str) -> Result<InstanceLimits, CloudError>;
    /// Interfaces attached to `instance_id`, by device index.
    fn list_enis(&self, instance_id: &str) -> Result<Vec<EniInfo>, CloudError>;
    /// Creates an interface in `subnet_id` with `security_groups`, tagged as
    /// podnet's, with `slots` secondary slots of `kind`, and attaches it at
    /// `device_index`. Returns it as the calls' answers describe it (a
    /// listing may not show it yet).
    fn create_and_attach_eni(
        &self,
        instance_id: &str,
        subnet_id: &str,
        security_groups: &[String],
        device_index: u32,
        kind: SlotKind,
        slots: u32,
    ) -> Result<EniInfo, CloudError>;
    /// Adds `count` slots of `kind` to `eni_id` in one call; returns the
    /// slots the answer names (a listing may not show them yet).
    fn assign(&self, eni_id: &str, kind: SlotKind, count: u32)
        -> Result<Vec<Ipv4Addr>, CloudError>;
    /// Delegates one IPv6 `/80` prefix of its subnet to `eni_id`
    /// (`AssignIpv6Addresses` with `Ipv6PrefixCount`); returns it as the
    /// answer names it (a listing may not show it yet).
    fn assign_ipv6_prefix(&self, eni_id: &str) -> Result<Cidr, CloudError>;
    /// Removes `slots` of `kind` from `eni_id` in one call.
    fn unassign(&self, eni_id: &str, kind: SlotKind, slots: &[Ipv4Addr]) -> Result<(), CloudError>;
    /// Detaches and deletes an interface podnet created.
    fn detach_and_delete_eni(&self, eni_id: &str, attachment_id: &str) -> Result<(), CloudError>;
    /// Interfaces podnet created for `instance_id` that are attached
    /// nowhere (left by a crash between create and attach, or a delete that
    /// failed): the instance's listing never shows them.
    fn list_detached_enis(&self, instance_id: &str) -> Result<Vec<DetachedEni>, CloudError>;
    /// Deletes an interface that is attached nowhere.
    fn delete_eni(&self, eni_id: &str) -> Result<(), CloudError>;
    /// `subnet_id`'s prefix and free addresses (`DescribeSubnets`).
    fn describe_subnet(&self, subnet_id: &str) -> Result<SubnetInfo, CloudError>;
}

/// A subnet as `DescribeSubnets` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubnetInfo {
    /// Its IPv4 prefix.
    pub cidr: Cidr,
    /// Free addresses (`availableIpAddressCount`).
    pub free: u64,
}

/// An interface podnet created that is attached nowhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetachedEni {
    /// `eni-...`.
    pub id: String,
    /// When podnet created it (tag [`CREATED_TAG`]; `None` when absent).
    pub created_unix_s: Option<u64>,
}

/// Tag holding when podnet created an interface, in seconds since the epoch.
pub const CREATED_TAG: &str = "podnet.io/created-at";

/// Cloud API calls by action and result (`podnet_cloud_api_calls_total`).
/// Cloning shares the counts.
#[derive(Clone, Debug, Default)]
pub struct ApiCalls {
    inner: Arc<Mutex<BTreeMap<(String, &'static str), u64>>>,
}

impl ApiCalls {
    /// Counts one call.
    pub fn record(&self, action: &str, result: &'static str) {
        *self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((action.to_owned(), result))
            .or_default() += 1;
    }

    /// Every (action, result) count.
    pub fn snapshot(&self) -> BTreeMap<(String, &'static str), u64> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Calls of `action` with any result.
    pub fn total(&self, action: &str) -> u64 {
        self.snapshot()
            .iter()
            .filter(|((a, _), _)| a == action)
            .map(|(_, n)| n)
            .sum()
    }
}
