//! The cluster's network: the VPC namespace (a bridge and a router), one namespace per node
//! with its uplink on the bridge, and a leg for the machine itself (kubectl, the tests).

use anyhow::Result;

use super::{
    layout::{self, Node, HOST_LINK, NODE_UPLINK, VPC_BRIDGE, VPC_NETNS, VPC_PREFIX_LEN},
    system,
};

/// The VPC side of the machine's leg.
const HOST_LINK_PEER: &str = "vpc-host";

/// Runs `ip` with the words of `command` (names and addresses never contain spaces).
fn ip(command: &str) -> Result<()> {
    let words: Vec<&str> = command.split_whitespace().collect();
    system::ip(&words)
}

/// Creates the VPC, the nodes' namespaces and links, and the machine's leg.
pub fn create() -> Result<()> {
    create_vpc()?;
    for node in &layout::NODES {
        connect_node(node)?;
    }
    connect_host()
}

/// The VPC namespace: a bridge holding the router's address, forwarding on, no redirects (a
/// VPC router routes; it does not tell nodes to talk to each other directly).
fn create_vpc() -> Result<()> {
    let router = layout::VPC_ROUTER;
    ip(&format!("netns add {VPC_NETNS}"))?;
    ip(&format!("-n {VPC_NETNS} link set lo up"))?;
    ip(&format!("-n {VPC_NETNS} link add {VPC_BRIDGE} type bridge"))?;
    ip(&format!(
        "-n {VPC_NETNS} addr add {router}/{VPC_PREFIX_LEN} dev {VPC_BRIDGE}"
    ))?;
    ip(&format!("-n {VPC_NETNS} link set {VPC_BRIDGE} up"))?;
    system::sysctl(VPC_NETNS, "net.ipv4.ip_forward", "1")?;
    system::sysctl(VPC_NETNS, "net.ipv4.conf.all.send_redirects", "0")?;
    system::sysctl(
        VPC_NETNS,
        &format!("net.ipv4.conf.{VPC_BRIDGE}.send_redirects"),
        "0",
    )
}

/// A node's namespace, its uplink on the VPC bridge, its address and default route.
fn connect_node(node: &Node) -> Result<()> {
    let (netns, port, address) = (node.netns, node.vpc_port, node.address);
    ip(&format!("netns add {netns}"))?;
    ip(&format!("-n {netns} link set lo up"))?;
    ip(&format!(
        "link add {NODE_UPLINK} netns {netns} type veth peer name {port} netns {VPC_NETNS}"
    ))?;
    ip(&format!(
        "-n {VPC_NETNS} link set {port} master {VPC_BRIDGE} up"
    ))?;
    ip(&format!(
        "-n {netns} addr add {address}/{VPC_PREFIX_LEN} dev {NODE_UPLINK}"
    ))?;
    ip(&format!("-n {netns} link set {NODE_UPLINK} up"))?;
    ip(&format!(
        "-n {netns} route add default via {}",
        layout::VPC_ROUTER
    ))?;
    system::sysctl(netns, "net.ipv4.ip_forward", "1")
}

/// The machine's leg on the VPC subnet, and a route to the pods through the VPC (never the
/// machine's default route). Both go with the link when the VPC namespace is deleted.
fn connect_host() -> Result<()> {
    ip(&format!(
        "link add {HOST_LINK} type veth peer name {HOST_LINK_PEER} netns {VPC_NETNS}"
    ))?;
    ip(&format!(
        "-n {VPC_NETNS} link set {HOST_LINK_PEER} master {VPC_BRIDGE} up"
    ))?;
    ip(&format!(
        "addr add {}/{VPC_PREFIX_LEN} dev {HOST_LINK}",
        layout::HOST_ADDR
    ))?;
    ip(&format!("link set {HOST_LINK} up"))?;
    ip(&format!(
        "route add {} via {} dev {HOST_LINK}",
        layout::CLUSTER_CIDR,
        layout::VPC_ROUTER
    ))
}

/// Routes each node's pod CIDRs to the node in the VPC, as alias-IP ranges are routed.
pub fn route_pod_cidrs(node: &Node, cidrs: &[String]) -> Result<()> {
    for cidr in cidrs {
        ip(&format!(
            "-n {VPC_NETNS} route replace {cidr} via {}",
            node.address
        ))?;
    }
    Ok(())
}
