//! Custom networking: pods on secondary ENIs in a subnet, with security
//! groups, chosen per availability zone (as the AWS VPC CNI's `ENIConfig`),
//! the primary ENI left to the node.

use std::{collections::BTreeMap, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{
    cloud::{CloudError, CloudProvider, InstanceIdentity},
    net::Cidr,
};

/// The ENIs of one availability zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EniConfig {
    /// `subnet-...`: where pods' ENIs are created (in the node's VPC and zone).
    pub subnet: String,
    /// `sg-...`: their security groups; empty: the primary ENI's.
    #[serde(default)]
    pub security_groups: Vec<String>,
}

/// `--eni-configs`: availability zone -> [`EniConfig`]. Empty: pods share
/// the primary ENI's subnet and security groups, the primary included.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EniConfigs(pub BTreeMap<String, EniConfig>);

impl FromStr for EniConfigs {
    type Err = String;

    /// JSON: `{"us-east-1a": {"subnet": "subnet-1", "securityGroups": ["sg-1"]}}`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_str(s).map_err(|e| {
            format!(
                "{e}: expected {{\"<availability zone>\": {{\"subnet\": \"subnet-...\", \"securityGroups\": [\"sg-...\"]}}}}"
            )
        })
    }
}

/// Where pods' addresses come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    /// The subnet of the ENIs podnet creates.
    pub subnet_id: String,
    /// Its IPv4 prefix.
    pub subnet_cidr: Cidr,
    /// Security groups of the ENIs podnet creates.
    pub security_groups: Vec<String>,
    /// Whether the primary ENI is left to the node (custom networking).
    pub primary_is_nodes: bool,
}

impl PodNetwork {
    /// The primary ENI's subnet and security groups, the primary included.
    pub fn of_instance(identity: &InstanceIdentity) -> Self {
        Self {
            subnet_id: identity.subnet_id.clone(),
            subnet_cidr: identity.subnet_cidr,
            security_groups: identity.security_groups.clone(),
            primary_is_nodes: false,
        }
    }

    /// The pod network of `identity` under `configs`: its zone's entry, with
    /// the subnet's prefix from the cloud. A zone without an entry is an
    /// error naming it.
    pub fn resolve(
        configs: &EniConfigs,
        identity: &InstanceIdentity,
        cloud: &dyn CloudProvider,
    ) -> Result<Self, CloudError> {
        if configs.0.is_empty() {
            return Ok(Self::of_instance(identity));
        }
        let zone = &identity.availability_zone;
        let config = configs.0.get(zone).ok_or_else(|| CloudError::Decode {
            action: "--eni-configs".into(),
            message: format!(
                "no entry for this node's availability zone {zone} (entries: {})",
                configs.0.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })?;
        let subnet = cloud.describe_subnet(&config.subnet)?;
        Ok(Self {
            subnet_id: config.subnet.clone(),
            subnet_cidr: subnet.cidr,
            security_groups: if config.security_groups.is_empty() {
                identity.security_groups.clone()
            } else {
                config.security_groups.clone()
            },
            primary_is_nodes: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_from_json_and_a_bad_one_says_what_is_expected() {
        let c: EniConfigs =
            r#"{"us-east-1a": {"subnet": "subnet-1", "securityGroups": ["sg-1"]}, "us-east-1b": {"subnet": "subnet-2"}}"#
                .parse()
                .unwrap();
        assert_eq!(c.0["us-east-1a"].security_groups, ["sg-1"]);
        assert!(c.0["us-east-1b"].security_groups.is_empty());
        let e = r#"{"us-east-1a": {"subnets": "subnet-1"}}"#.parse::<EniConfigs>().unwrap_err();
        assert!(e.contains("unknown field `subnets`"), "{e}");
        assert!(e.contains("securityGroups"), "{e}");
    }
}
