//! The fixed shape of the test cluster: names, addresses and paths.
//!
//! ```text
//!                     host netns (kubectl, tests)  10.200.0.254 on pnc-host
//!                                   |
//!   netns pnc-vpc: bridge vpc0 10.200.0.1/24, routes 10.244.N.0/24 via each node
//!   (the "VPC": routes each node's pod CIDR to that node, as alias-IP ranges are routed)
//!   runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler
//!        |                                   |
//!   netns pnc-node-1  eth0 10.200.0.11   netns pnc-node-2  eth0 10.200.0.12
//!   + its own mount namespace: /run, /var/lib, /var/log, /etc/cni, /opt/cni,
//!     /etc/kubernetes bound from the node's directory, a bpffs of its own
//!   runs containerd, kubelet, kube-proxy; podnet runs there as a DaemonSet pod
//! ```

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// Every file of the cluster (state, certificates, node directories, logs).
pub const CLUSTER_DIR: &str = "/var/lib/podnet-cluster";
/// The network namespace of the "VPC" router and the control plane.
pub const VPC_NETNS: &str = "pnc-vpc";
/// The bridge of the VPC subnet, in [`VPC_NETNS`].
pub const VPC_BRIDGE: &str = "vpc0";
/// The VPC router's (and API server's) address.
pub const VPC_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// Prefix length of the VPC subnet 10.200.0.0/24.
pub const VPC_PREFIX_LEN: u8 = 24;
/// The host's leg on the VPC subnet (kubectl and the tests reach the cluster through it).
pub const HOST_LINK: &str = "pnc-host";
/// The host's address on the VPC subnet.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 254);
/// The API server's port on [`VPC_ROUTER`].
pub const API_PORT: u16 = 6443;
/// Pod addresses of the whole cluster; kube-controller-manager cuts a /24 per node.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Prefix length of each node's pod CIDR.
pub const NODE_CIDR_MASK: u8 = 24;
/// Service `ClusterIPs`.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's `ClusterIP` (first of [`SERVICE_CIDR`]).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The cluster DNS Service's `ClusterIP`.
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// podnet's metrics port (the agent's default, `podnet::config::defaults::METRICS_PORT`, and
/// the chart's `metrics.port`).
pub const PODNET_METRICS_PORT: u16 = 10310;
/// cgroup (below every v1 hierarchy) holding every process the cluster starts.
pub const CGROUP_PARENT: &str = "podnet-cluster";

/// One node of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    /// Kubernetes node name.
    pub name: &'static str,
    /// Network namespace.
    pub netns: &'static str,
    /// Address on the VPC subnet (the node's `InternalIP`).
    pub address: Ipv4Addr,
    /// The VPC bridge port of this node, in [`VPC_NETNS`].
    pub vpc_port: &'static str,
}

/// The cluster's nodes.
pub const NODES: [Node; 2] = [
    Node {
        name: "node-1",
        netns: "pnc-node-1",
        address: Ipv4Addr::new(10, 200, 0, 11),
        vpc_port: "vpc-node-1",
    },
    Node {
        name: "node-2",
        netns: "pnc-node-2",
        address: Ipv4Addr::new(10, 200, 0, 12),
        vpc_port: "vpc-node-2",
    },
];

/// The node's own interface toward the VPC.
pub const NODE_UPLINK: &str = "eth0";

/// The directories a node gets instead of the machine's: `(directory name, mount point)`.
/// Each is bound over the mount point in the node's mount namespace, so the shipped
/// hostPaths (`/run/podnet`, `/var/lib/podnet`, `/etc/cni/net.d`, `/opt/cni/bin`, ...) are the
/// node's own and two agents never share a checkpoint, a socket or a CNI file.
/// `/var/lib` comes last: the node directories live below it ([`CLUSTER_DIR`]) and are
/// hidden inside the node once it is bound.
pub const NODE_DIRS: &[(&str, &str)] = &[
    ("run", "/run"),
    ("var-log", "/var/log"),
    ("etc-cni", "/etc/cni"),
    ("opt-cni", "/opt/cni"),
    ("etc-kubernetes", "/etc/kubernetes"),
    ("var-lib", "/var/lib"),
];

/// The nodes' `/etc/resolv.conf`: a resolver on the node's own loopback, where nothing
/// listens, so a lookup fails at once instead of leaving the machine.
pub const NODE_RESOLV_CONF: &str = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n";

/// Mount points that [`NODE_DIRS`] need on the machine; created by `up` where missing and
/// removed by `down` when `up` created them.
pub const HOST_MOUNT_POINTS: &[&str] = &["/etc/cni", "/opt/cni", "/etc/kubernetes"];

/// Kernel settings kubelet insists on (it writes them when they differ, and fails if it
/// cannot). They are machine-wide, and `kernel.panic_on_oops=1` would turn any oops on a
/// shared test machine into a reboot, so each node's mount namespace shows kubelet these
/// values through files bound over `/proc/sys`, and the machine keeps its own.
/// (`pkg/kubelet/cm/container_manager_linux.go`, `setupKernelTunables`, v1.34.)
pub const KUBELET_SYSCTLS: &[(&str, &str)] = &[
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

impl Node {
    /// The node's directory on the machine.
    pub fn dir(&self) -> PathBuf {
        Path::new(CLUSTER_DIR).join("nodes").join(self.name)
    }

    /// The file its mount namespace is bound to.
    pub fn mount_ns(&self) -> PathBuf {
        self.dir().join("mnt-ns")
    }

    /// `/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(self.netns)
    }

    /// The node's cgroup, relative to a hierarchy's root.
    pub fn cgroup(&self) -> String {
        format!("/{CGROUP_PARENT}/{}", self.name)
    }

    /// Where podnet's metrics are served (hostNetwork: the node's address).
    pub fn metrics_addr(&self) -> String {
        format!("{}:{PODNET_METRICS_PORT}", self.address)
    }
}

/// The cgroup of the control plane's processes.
pub fn control_plane_cgroup() -> String {
    format!("/{CGROUP_PARENT}/control-plane")
}

/// `https://10.200.0.1:6443`.
pub fn api_server_url() -> String {
    format!("https://{VPC_ROUTER}:{API_PORT}")
}

/// Files of the cluster as a whole.
pub fn cluster_path(name: &str) -> PathBuf {
    Path::new(CLUSTER_DIR).join(name)
}

/// The administrator's kubeconfig (what `up` prints as `KUBECONFIG=`).
pub fn admin_kubeconfig() -> PathBuf {
    cluster_path("admin.kubeconfig")
}

/// The API server's audit log (JSON lines).
pub fn audit_log() -> PathBuf {
    cluster_path("logs/audit.log")
}
