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
    /// IPv4 addresses per interface, the primary included.
    pub ips_per_eni: u32,
}

impl InstanceLimits {
    /// Pods the instance can hold: every address but each interface's primary
    /// (`u32::MAX` when the product does not fit).
    pub fn max_pods(&self) -> u32 {
        self.max_enis
            .saturating_mul(self.ips_per_eni.saturating_sub(1))
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
    /// podnet's, with `secondary` secondary addresses, and attaches it at
    /// `device_index`. Returns it as the calls' answers describe it (a
    /// listing may not show it yet).
    fn create_and_attach_eni(
        &self,
        instance_id: &str,
        subnet_id: &str,
        security_groups: &[String],
        device_index: u32,
        secondary: u32,
    ) -> Result<EniInfo, CloudError>;
    /// Adds `count` secondary addresses to `eni_id` in one call; returns the
    /// addresses the answer names (a listing may not show them yet).
    fn assign_ips(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Addr>, CloudError>;
    /// Removes `ips` from `eni_id` in one call.
    fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError>;
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
