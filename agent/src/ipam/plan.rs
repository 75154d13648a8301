//! Addressing plans: a cluster CIDR split into clusters, each cluster into
//! node pod CIDRs (`podnetctl plan`). Pure functions.

use std::fmt::Write as _;

use serde::Serialize;

use crate::net::Cidr;

/// Errors of [`plan`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The bits do not fit the address.
    #[error("{cidr} has {available} bits to split; --cluster-bits {cluster_bits} + --node-bits {node_bits} leave fewer than 2 host bits per node")]
    TooManyBits {
        /// The cluster CIDR.
        cidr: Cidr,
        /// Bits after its prefix.
        available: u8,
        /// Cluster bits asked.
        cluster_bits: u8,
        /// Node bits asked.
        node_bits: u8,
    },
    /// An index past the end.
    #[error("{what} index {index} is out of range: there are {count}")]
    Index {
        /// `node` or `cluster`.
        what: &'static str,
        /// The index asked.
        index: u128,
        /// How many there are.
        count: u128,
    },
}

/// An addressing plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The whole range.
    pub cluster_cidr: Cidr,
    /// Prefix length of one cluster.
    pub cluster_prefix_len: u8,
    /// Number of clusters.
    pub clusters: u128,
    /// Prefix length of one node.
    pub node_prefix_len: u8,
    /// Nodes per cluster.
    pub nodes_per_cluster: u128,
    /// Pod addresses per node (network, gateway and broadcast kept back).
    pub pods_per_node: u128,
    /// The CIDR of the chosen cluster.
    pub cluster: Cidr,
    /// The chosen cluster's index.
    pub cluster_index: u128,
    /// The CIDR of the chosen node, when a node index was given.
    pub node: Option<(u128, Cidr)>,
}

/// Splits `cidr` into `2^cluster_bits` clusters of `2^node_bits` nodes each.
pub fn plan(
    cidr: Cidr,
    cluster_bits: u8,
    node_bits: u8,
    cluster_index: u128,
    node_index: Option<u128>,
) -> Result<Plan, PlanError> {
    let available = cidr.host_bits();
    let used = u16::from(cluster_bits) + u16::from(node_bits);
    if used + 2 > u16::from(available) {
        return Err(PlanError::TooManyBits {
            cidr,
            available,
            cluster_bits,
            node_bits,
        });
    }
    let cluster_prefix_len = cidr.prefix_len() + cluster_bits;
    let node_prefix_len = cluster_prefix_len + node_bits;
    let clusters = 1u128 << cluster_bits;
    let nodes_per_cluster = 1u128 << node_bits;
    let host_bits = cidr.family().bits() - node_prefix_len;
    let pods_per_node = 1u128
        .checked_shl(u32::from(host_bits))
        .map_or(u128::MAX, |n| n - 3);
    let cluster = cidr
        .subnet(cluster_prefix_len, cluster_index)
        .ok_or(PlanError::Index {
            what: "cluster",
            index: cluster_index,
            count: clusters,
        })?;
    let node = match node_index {
        None => None,
        Some(i) => Some((
            i,
            cluster.subnet(node_prefix_len, i).ok_or(PlanError::Index {
                what: "node",
                index: i,
                count: nodes_per_cluster,
            })?,
        )),
    };
    Ok(Plan {
        cluster_cidr: cidr,
        cluster_prefix_len,
        clusters,
        node_prefix_len,
        nodes_per_cluster,
        pods_per_node,
        cluster,
        cluster_index,
        node,
    })
}

impl Plan {
    /// The plan as `podnetctl plan` prints it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "cluster CIDR:      {}", self.cluster_cidr);
        let _ = writeln!(
            out,
            "clusters:          {} (/{} each)",
            self.clusters, self.cluster_prefix_len
        );
        let _ = writeln!(
            out,
            "nodes per cluster: {} (/{} each)",
            self.nodes_per_cluster, self.node_prefix_len
        );
        let _ = writeln!(out, "pods per node:     {}", self.pods_per_node);
        let _ = writeln!(
            out,
            "cluster {}:         {}",
            self.cluster_index, self.cluster
        );
        if let Some((i, node)) = self.node {
            let _ = writeln!(out, "node {i}:            {node}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_plan() {
        let p = plan("10.0.0.0/8".parse().unwrap(), 4, 12, 0, Some(5)).unwrap();
        assert_eq!(p.clusters, 16);
        assert_eq!(p.nodes_per_cluster, 4096);
        assert_eq!(p.node_prefix_len, 24);
        assert_eq!(p.pods_per_node, 253);
        assert_eq!(p.cluster.to_string(), "10.0.0.0/12");
        assert_eq!(p.node.unwrap().1.to_string(), "10.0.5.0/24");
        let p = plan("10.0.0.0/8".parse().unwrap(), 4, 12, 3, Some(4095)).unwrap();
        assert_eq!(p.cluster.to_string(), "10.48.0.0/12");
        assert_eq!(p.node.unwrap().1.to_string(), "10.63.255.0/24");
        assert_eq!(
            plan("10.0.0.0/8".parse().unwrap(), 4, 12, 0, Some(4096))
                .unwrap_err()
                .to_string(),
            "node index 4096 is out of range: there are 4096"
        );
        assert!(matches!(
            plan("10.0.0.0/8".parse().unwrap(), 10, 13, 0, None),
            Err(PlanError::TooManyBits { .. })
        ));
        let p = plan("fd00::/48".parse().unwrap(), 4, 12, 1, Some(2)).unwrap();
        assert_eq!(p.node.unwrap().1.to_string(), "fd00:0:0:1002::/64");
    }

    #[test]
    fn render() {
        let p = plan("10.0.0.0/8".parse().unwrap(), 4, 12, 0, Some(1)).unwrap();
        assert_eq!(
            p.render(),
            "cluster CIDR:      10.0.0.0/8\nclusters:          16 (/12 each)\nnodes per cluster: 4096 (/24 each)\npods per node:     253\ncluster 0:         10.0.0.0/12\nnode 1:            10.0.1.0/24\n"
        );
    }
}
