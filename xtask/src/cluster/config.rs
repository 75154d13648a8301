//! Configuration files of the cluster's programs, with the settings these machines need.
//!
//! The machines have cgroup v1 (hybrid), no `CAP_SYS_RESOURCE` (no rlimit or
//! `oom_score_adj` below the current value) and no systemd. What that takes:
//!
//! | program | setting | why |
//! |---|---|---|
//! | kubelet | `failCgroupV1: false` | cgroup v1 is in maintenance; kubelet 1.35+ refuses it by default |
//! | kubelet | `cgroupDriver: cgroupfs`, `cgroupRoot: /podnet-cluster/<node>` | no systemd; two kubelets on one machine need separate roots |
//! | kubelet | `oomScoreAdj: 0` | lowering its own `oom_score_adj` to -999 needs `CAP_SYS_RESOURCE` |
//! | kubelet | `resolvConf: ""` | pods must not inherit the machine's resolvers (no traffic leaves the machine) |
//! | kubelet | eviction thresholds at 1 %, image GC off | imported images cannot be pulled again |
//! | kubelet | node-local `/proc/sys` values | see [`super::layout::KUBELET_SYSCTLS`] |
//! | containerd | `restrict_oom_score_adj = true` | pods' `oom_score_adj` (e.g. -997 for node-critical pods) is clamped to containerd's own, which it may set |
//! | containerd | runc from Debian, `SystemdCgroup = false` | crun fails on hybrid cgroups |
//! | containerd | `use_internal_loopback = true` | `/opt/cni/bin` starts empty, as on a bare node; the chain's plugins come from podnet's installer |
//! | containerd | sandbox image `localhost/podnet-pause:e2e` | no registry: a busybox `sleep` as the pod's infrastructure container |
//! | kube-proxy | `conntrack.maxPerCore: 0`, TCP timeouts `0s` | `nf_conntrack_max` is machine-wide and read-only in a network namespace |

use super::layout::{self, Node};

/// The pause image every pod sandbox runs.
pub const PAUSE_IMAGE: &str = "localhost/podnet-pause:e2e";
/// The toolbox image of the tests' pods.
pub const TOOLBOX_IMAGE: &str = "localhost/podnet-toolbox:e2e";
/// The CoreDNS image.
pub const COREDNS_IMAGE: &str = "localhost/podnet-coredns:e2e";
/// podnet's image repository; the tag is given per build.
pub const PODNET_REPOSITORY: &str = "localhost/podnet";
/// The tag `up` installs.
pub const PODNET_TAG: &str = "e2e";
/// A second tag of the same image on every node, for rolling updates.
pub const PODNET_NEXT_TAG: &str = "e2e-next";

/// containerd's configuration (version 3, containerd 2.x).
pub fn containerd(runc: &str) -> String {
    format!(
        r#"version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  enable_unprivileged_icmp = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"
    use_internal_loopback = true

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
"#
    )
}

/// kubelet's `KubeletConfiguration`.
pub fn kubelet(node: &Node) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: /etc/kubernetes/pki/ca.crt
authorization:
  mode: Webhook
address: {address}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: {cgroup}
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
clusterDNS: [{dns}]
clusterDomain: {domain}
resolvConf: ""
maxPods: 110
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
  imagefs.inodesFree: 1%
"#,
        address = node.address,
        cgroup = node.cgroup(),
        dns = layout::DNS_SERVICE_IP,
        domain = layout::CLUSTER_DOMAIN,
    )
}

/// kube-proxy's `KubeProxyConfiguration` (iptables mode).
pub fn kube_proxy(node: &Node) -> String {
    format!(
        r"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: /etc/kubernetes/kube-proxy.kubeconfig
hostnameOverride: {name}
clusterCIDR: {cluster_cidr}
bindAddress: {address}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
",
        name = node.name,
        cluster_cidr = layout::CLUSTER_CIDR,
        address = node.address,
    )
}

/// The API server's audit policy: every request of podnet's service account, at the
/// Metadata level (who, which verb on which object); nothing of anyone else.
pub const AUDIT_POLICY: &str = r"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    users: [system:serviceaccount:kube-system:podnet]
  - level: None
";

/// Cluster objects applied once the API server is up (`bootstrap.yaml`): kubelet API access
/// for the API server and the cluster DNS (CoreDNS as a Deployment behind `kube-dns`).
pub fn bootstrap_objects() -> String {
    include_str!("bootstrap.yaml")
        .replace("{{COREDNS_IMAGE}}", COREDNS_IMAGE)
        .replace("{{DNS_SERVICE_IP}}", &layout::DNS_SERVICE_IP.to_string())
}

/// The overlay that installs the shipped bundle with the image built here: the only change
/// to `deploy/` is the image reference (`shipped_name`: the name the bundle sets).
pub fn overlay_kustomization(deploy_dir: &str, shipped_name: &str, tag: &str) -> String {
    format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {deploy_dir}\n\
         images:\n  - name: {shipped_name}\n    newName: {PODNET_REPOSITORY}\n    newTag: {tag}\n\
         patches:\n  - target: {{kind: DaemonSet, name: podnet}}\n    patch: |-\n\
         \x20     - op: add\n\
         \x20       path: /spec/template/spec/containers/0/env/-\n\
         \x20       value: {{name: PODNET_POD_METRICS_NAMESPACES, value: \"{PER_POD_NAMESPACES}\"}}\n"
    )
}

/// The namespaces whose series the cluster's agents keep per pod (the rest per workload, the
/// shipped default): those of the end-to-end and rolling-update suites, whose tests follow
/// single pods.
pub const PER_POD_NAMESPACES: &str = "e2e,upgrade";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_files_name_the_node() {
        let node = layout::NODES[1];
        assert!(kubelet(&node).contains("cgroupRoot: /podnet-cluster/node-2\n"));
        assert!(kubelet(&node).contains("address: 10.200.0.12\n"));
        assert!(kube_proxy(&node).contains("hostnameOverride: node-2\n"));
        assert!(containerd("/usr/sbin/runc").contains("BinaryName = \"/usr/sbin/runc\""));
    }

    #[test]
    fn the_overlay_sets_the_image_and_the_per_pod_namespaces() {
        let text = overlay_kustomization("../src/deploy", "registry.example/podnet", "e2e");
        assert!(text.contains("  - ../src/deploy\n"), "{text}");
        assert!(
            text.contains("  - name: registry.example/podnet\n"),
            "{text}"
        );
        assert!(
            text.contains("newName: localhost/podnet\n    newTag: e2e\n"),
            "{text}"
        );
        assert!(
            text.contains("value: {name: PODNET_POD_METRICS_NAMESPACES, value: \"e2e,upgrade\"}\n"),
            "{text}"
        );
        let patches = text.matches("- op:").count();
        assert_eq!(patches, 1, "{text}");
    }

    #[test]
    fn bootstrap_placeholders_are_filled() {
        let text = bootstrap_objects();
        assert!(!text.contains("{{"), "{text}");
        assert!(text.contains("clusterIP: 10.96.0.10\n"));
        assert!(text.contains("image: localhost/podnet-coredns:e2e\n"));
    }
}
