//! `cluster up` and `cluster down`.

use std::{
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use super::{
    components::{self, CONTAINERD, COREDNS, ETCD, KUBERNETES},
    config,
    image::{Image, RootFs, IMAGE_PATH},
    layout::{self, Node},
    monitoring, network, pki,
    state::{self, State},
    system::{self, Place},
};
use crate::{cmd, setup};

/// Debian's runc, which containerd runs containers with.
const RUNC: &str = "/usr/sbin/runc";
/// How long the control plane, a node or podnet may take to come up.
const START_TIMEOUT: Duration = Duration::from_mins(3);
/// How long `down` waits for the cluster's processes to end after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `cluster up`.
#[derive(Debug, Default, Args)]
pub struct UpArgs {
    /// Build podnet in release mode for its image (default: the debug build the tests use).
    #[arg(long)]
    release: bool,
}

/// Starts the cluster (after tearing down a previous one) and installs podnet.
pub fn run(args: &UpArgs) -> Result<()> {
    setup::ensure()?;
    let binaries = build_podnet(args.release)?;
    if state::path().exists() || layout::NODES.iter().any(|n| system::netns_exists(n.netns)) {
        println!("cluster: removing the previous cluster first");
        down()?;
    }
    let mut state = State::default();
    let result = start(&mut state, &binaries);
    // Whatever happened, record what runs so that `down` can stop it.
    state.save()?;
    result?;
    state::print_status(false)
}

fn start(state: &mut State, binaries: &Path) -> Result<()> {
    for dir in ["logs", "images", "etcd", "overlay"] {
        fs::create_dir_all(layout::cluster_path(dir))?;
    }
    for mount_point in layout::HOST_MOUNT_POINTS {
        if !Path::new(mount_point).exists() {
            fs::create_dir_all(mount_point)?;
            state.created_mount_points.push((*mount_point).to_owned());
        }
    }
    state.save()?;
    println!("cluster: certificates and kubeconfigs");
    pki::create()?;
    fs::write(
        layout::cluster_path("audit-policy.yaml"),
        config::AUDIT_POLICY,
    )?;
    println!("cluster: images");
    write_images(binaries)?;
    println!("cluster: network");
    network::create()?;
    println!("cluster: control plane");
    start_control_plane(state)?;
    state.save()?;
    println!("cluster: nodes");
    for node in &layout::NODES {
        start_node(state, node)?;
        state.save()?;
    }
    route_pod_cidrs()?;
    println!("cluster: CoreDNS, monitoring CRDs");
    apply_stdin(&config::bootstrap_objects())?;
    apply_monitoring_crds()?;
    println!("cluster: podnet from deploy/");
    install_podnet(config::PODNET_TAG)?;
    wait_ready()?;
    println!("cluster: prometheus-operator and Prometheus");
    monitoring::start(state)?;
    super::write_status().map(drop)
}

/// Builds the podnet binaries (debug or release) and returns their directory.
fn build_podnet(release: bool) -> Result<PathBuf> {
    let mut build = cmd::cargo();
    build.args([
        "build",
        "--bin",
        "podnet-agent",
        "--bin",
        "podnet-cni",
        "--bin",
        "podnetctl",
    ]);
    if release {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    Ok(cmd::target_dir().join(if release { "release" } else { "debug" }))
}

/// podnet's image: the three binaries, the CNI installer and the `ptp` plugin the shipped
/// chain needs, iptables (nft) with its extensions, CA certificates and a busybox shell,
/// as the Dockerfile's runtime stage has them.
pub fn podnet_image(binaries: &Path, tag: &str) -> Result<Image> {
    let mut rootfs = RootFs::default();
    for binary in ["podnet-agent", "podnet-cni", "podnetctl"] {
        rootfs.executable(
            &binaries.join(binary),
            Path::new("/usr/local/bin").join(binary),
        )?;
    }
    let deploy = cmd::workspace_root().join("deploy");
    rootfs.file(
        deploy.join("install-cni.sh"),
        "/usr/local/bin/install-cni.sh",
        0o755,
    );
    rootfs.file("/usr/lib/cni/ptp", "/usr/lib/cni/ptp", 0o755);
    rootfs.executable(
        Path::new("/usr/sbin/xtables-nft-multi"),
        "/usr/sbin/xtables-nft-multi",
    )?;
    for name in [
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables",
        "ip6tables-save",
        "ip6tables-restore",
    ] {
        rootfs.symlink(Path::new("/usr/sbin").join(name), "xtables-nft-multi");
    }
    let extensions = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    for entry in fs::read_dir(extensions)? {
        let path = entry?.path();
        rootfs.executable(&path, &path)?;
    }
    rootfs.file(
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/ssl/certs/ca-certificates.crt",
        0o644,
    );
    rootfs.busybox()?;
    Ok(Image {
        reference: format!("{}:{tag}", config::PODNET_REPOSITORY),
        rootfs,
        entrypoint: vec!["/usr/local/bin/podnet-agent".to_owned()],
        env: vec![IMAGE_PATH.to_owned()],
    })
}

/// The archive of image `reference`.
fn archive(reference: &str) -> PathBuf {
    let name = reference
        .trim_start_matches("localhost/")
        .replace([':', '/'], "_");
    layout::cluster_path("images").join(format!("{name}.tar"))
}

/// An image of Debian's busybox with `entrypoint`.
fn busybox_image(reference: &str, entrypoint: &[&str]) -> Result<Image> {
    let mut rootfs = RootFs::default();
    rootfs.busybox()?;
    rootfs.dir("/tmp", 0o1777);
    Ok(Image {
        reference: reference.to_owned(),
        rootfs,
        entrypoint: entrypoint.iter().map(|s| (*s).to_owned()).collect(),
        env: vec![IMAGE_PATH.to_owned()],
    })
}

/// The pod sandbox: sleeps; containerd ends it with SIGKILL.
fn pause_image() -> Result<Image> {
    busybox_image(config::PAUSE_IMAGE, &["/bin/sleep", "2147483647"])
}

/// `cluster pause-image ARCHIVE`: the sandbox image alone, for tests that run
/// a containerd of their own.
pub(super) fn write_pause_image(archive: &Path) -> Result<()> {
    pause_image()?.write_archive(archive)
}

fn write_images(binaries: &Path) -> Result<()> {
    let mut images = vec![
        podnet_image(binaries, config::PODNET_TAG)?,
        busybox_image(config::TOOLBOX_IMAGE, &["/bin/sh"])?,
        pause_image()?,
    ];
    let mut rootfs = RootFs::default();
    rootfs.file(COREDNS.bin("coredns"), "/coredns", 0o755);
    images.push(Image {
        reference: config::COREDNS_IMAGE.to_owned(),
        rootfs,
        entrypoint: vec!["/coredns".to_owned()],
        env: vec![IMAGE_PATH.to_owned()],
    });
    for image in images {
        image.write_archive(&archive(&image.reference))?;
    }
    Ok(())
}

fn os(args: &[String]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

pub(super) fn start_daemon(
    state: &mut State,
    name: &str,
    place: Place<'_>,
    program: &Path,
    args: &[String],
    env: &[(&str, &OsStr)],
) -> Result<()> {
    let args = os(args);
    let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let log = layout::cluster_path(&format!("logs/{}.log", name.replace('/', "-")));
    let pid = system::spawn_daemon(place, program, &args, env, &log)?;
    println!("started {name} (pid {pid}, log {})", log.display());
    state.daemons.insert(name.to_owned(), pid);
    Ok(())
}

fn pki_arg(flag: &str, file: &str) -> String {
    format!("--{flag}={}", pki::file(file).display())
}

fn start_control_plane(state: &mut State) -> Result<()> {
    let cgroup = layout::control_plane_cgroup();
    system::create_cgroup(&cgroup)?;
    let place = Place {
        cgroup: &cgroup,
        netns: layout::VPC_NETNS,
        mount_ns: None,
    };
    let etcd_dir = layout::cluster_path("etcd");
    start_daemon(
        state,
        "etcd",
        place,
        &ETCD.bin("etcd"),
        &[
            "--name=podnet".to_owned(),
            format!("--data-dir={}", etcd_dir.display()),
            "--listen-client-urls=http://127.0.0.1:2379".to_owned(),
            "--advertise-client-urls=http://127.0.0.1:2379".to_owned(),
            "--listen-peer-urls=http://127.0.0.1:2380".to_owned(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".to_owned(),
            "--initial-cluster=podnet=http://127.0.0.1:2380".to_owned(),
            "--listen-metrics-urls=http://127.0.0.1:2381".to_owned(),
        ],
        &[],
    )?;
    start_daemon(
        state,
        "kube-apiserver",
        place,
        &KUBERNETES.bin("kube-apiserver"),
        &[
            format!("--advertise-address={}", layout::VPC_ROUTER),
            format!("--secure-port={}", layout::API_PORT),
            "--etcd-servers=http://127.0.0.1:2379".to_owned(),
            format!("--service-cluster-ip-range={}", layout::SERVICE_CIDR),
            pki_arg("tls-cert-file", "apiserver.crt"),
            pki_arg("tls-private-key-file", "apiserver.key"),
            pki_arg("client-ca-file", "ca.crt"),
            pki_arg("kubelet-client-certificate", "apiserver-kubelet-client.crt"),
            pki_arg("kubelet-client-key", "apiserver-kubelet-client.key"),
            "--kubelet-preferred-address-types=InternalIP".to_owned(),
            format!(
                "--service-account-issuer=https://kubernetes.default.svc.{}",
                layout::CLUSTER_DOMAIN
            ),
            pki_arg("service-account-key-file", "sa.pub"),
            pki_arg("service-account-signing-key-file", "sa.key"),
            "--authorization-mode=Node,RBAC".to_owned(),
            "--enable-admission-plugins=NodeRestriction".to_owned(),
            "--allow-privileged=false".to_owned(),
            format!(
                "--audit-policy-file={}",
                layout::cluster_path("audit-policy.yaml").display()
            ),
            format!("--audit-log-path={}", layout::audit_log().display()),
            "--audit-log-format=json".to_owned(),
            "--profiling=false".to_owned(),
        ],
        &[],
    )?;
    system::wait_until("the API server answers /readyz", START_TIMEOUT, || {
        Ok(
            cmd::stdout(state::kubectl().args(["get", "--raw", "/readyz"]))
                .is_ok_and(|body| body.trim() == "ok"),
        )
    })?;
    start_controllers(state, place)
}

/// kube-controller-manager (node IPAM: a pod CIDR per Node) and kube-scheduler.
fn start_controllers(state: &mut State, place: Place<'_>) -> Result<()> {
    let kubeconfig = |stem: &str| format!("{}", pki::kubeconfig(stem).display());
    let controller_manager = kubeconfig("controller-manager");
    start_daemon(
        state,
        "kube-controller-manager",
        place,
        &KUBERNETES.bin("kube-controller-manager"),
        &[
            format!("--kubeconfig={controller_manager}"),
            format!("--authentication-kubeconfig={controller_manager}"),
            format!("--authorization-kubeconfig={controller_manager}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--leader-elect=false".to_owned(),
            "--allocate-node-cidrs=true".to_owned(),
            format!("--cluster-cidr={}", layout::CLUSTER_CIDR),
            format!("--node-cidr-mask-size={}", layout::NODE_CIDR_MASK),
            format!("--service-cluster-ip-range={}", layout::SERVICE_CIDR),
            pki_arg("root-ca-file", "ca.crt"),
            pki_arg("service-account-private-key-file", "sa.key"),
            pki_arg("cluster-signing-cert-file", "ca.crt"),
            pki_arg("cluster-signing-key-file", "ca.key"),
            "--use-service-account-credentials=true".to_owned(),
        ],
        &[],
    )?;
    let scheduler = kubeconfig("scheduler");
    start_daemon(
        state,
        "kube-scheduler",
        place,
        &KUBERNETES.bin("kube-scheduler"),
        &[
            format!("--kubeconfig={scheduler}"),
            format!("--authentication-kubeconfig={scheduler}"),
            format!("--authorization-kubeconfig={scheduler}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--leader-elect=false".to_owned(),
        ],
        &[],
    )?;
    Ok(())
}

/// The node's `/etc/kubernetes`: CA, kubeconfigs and the configuration files.
fn write_node_files(node: &Node) -> Result<()> {
    let etc = node.dir().join("etc-kubernetes");
    fs::create_dir_all(etc.join("pki"))?;
    fs::copy(pki::file("ca.crt"), etc.join("pki/ca.crt"))?;
    fs::copy(
        pki::kubeconfig(&format!("kubelet-{}", node.name)),
        etc.join("kubelet.kubeconfig"),
    )?;
    fs::copy(
        pki::kubeconfig("kube-proxy"),
        etc.join("kube-proxy.kubeconfig"),
    )?;
    fs::write(etc.join("kubelet.yaml"), config::kubelet(node))?;
    fs::write(etc.join("kube-proxy.yaml"), config::kube_proxy(node))?;
    fs::write(etc.join("containerd.toml"), config::containerd(RUNC))?;
    Ok(())
}

fn start_node(state: &mut State, node: &Node) -> Result<()> {
    fs::create_dir_all(node.dir())?;
    write_node_files(node)?;
    system::create_node_mount_ns(node)?;
    let cgroup = node.cgroup();
    let system_cgroup = format!("{cgroup}/system");
    system::create_cgroup(&system_cgroup)?;
    let mount_ns = node.mount_ns();
    let place = Place {
        cgroup: &system_cgroup,
        netns: node.netns,
        mount_ns: Some(&mount_ns),
    };
    // containerd finds its shim on PATH.
    let path = format!(
        "{}:{}",
        CONTAINERD.dir().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    start_daemon(
        state,
        &format!("{}/containerd", node.name),
        place,
        &CONTAINERD.bin("containerd"),
        &["--config=/etc/kubernetes/containerd.toml".to_owned()],
        &[("PATH", OsStr::new(&path))],
    )?;
    let ctr = CONTAINERD.bin("ctr");
    system::wait_until(
        &format!("containerd on {} answers", node.name),
        START_TIMEOUT,
        || Ok(system::in_node(node, &[ctr.as_os_str(), OsStr::new("version")], None).is_ok()),
    )?;
    for reference in [
        config::PAUSE_IMAGE.to_owned(),
        config::TOOLBOX_IMAGE.to_owned(),
        config::COREDNS_IMAGE.to_owned(),
        format!("{}:{}", config::PODNET_REPOSITORY, config::PODNET_TAG),
    ] {
        import_image(node, &archive(&reference))?;
    }
    let podnet = format!("{}:{}", config::PODNET_REPOSITORY, config::PODNET_TAG);
    let next = format!("{}:{}", config::PODNET_REPOSITORY, config::PODNET_NEXT_TAG);
    system::in_node(
        node,
        &[
            ctr.as_os_str(),
            OsStr::new("--namespace=k8s.io"),
            OsStr::new("images"),
            OsStr::new("tag"),
            OsStr::new(&podnet),
            OsStr::new(&next),
        ],
        None,
    )?;
    start_daemon(
        state,
        &format!("{}/kubelet", node.name),
        place,
        &KUBERNETES.bin("kubelet"),
        &[
            "--config=/etc/kubernetes/kubelet.yaml".to_owned(),
            "--kubeconfig=/etc/kubernetes/kubelet.kubeconfig".to_owned(),
            format!("--hostname-override={}", node.name),
            format!("--node-ip={}", node.address),
        ],
        &[],
    )?;
    start_daemon(
        state,
        &format!("{}/kube-proxy", node.name),
        place,
        &KUBERNETES.bin("kube-proxy"),
        &["--config=/etc/kubernetes/kube-proxy.yaml".to_owned()],
        &[],
    )?;
    Ok(())
}

/// Imports an image archive into a node's containerd (namespace `k8s.io`, kubelet's).
pub fn import_image(node: &Node, archive: &Path) -> Result<()> {
    let ctr = CONTAINERD.bin("ctr");
    system::in_node(
        node,
        &[
            ctr.as_os_str(),
            OsStr::new("--namespace=k8s.io"),
            OsStr::new("images"),
            OsStr::new("import"),
            OsStr::new("-"),
        ],
        Some(archive),
    )
    .with_context(|| format!("importing {} into {}", archive.display(), node.name))?;
    Ok(())
}

/// Routes each node's pod CIDR to the node in the VPC, once the controller-manager has
/// given every Node one.
fn route_pod_cidrs() -> Result<()> {
    let mut cidrs = std::collections::BTreeMap::default();
    system::wait_until(
        "every node registered with a pod CIDR",
        START_TIMEOUT,
        || {
            cidrs = state::pod_cidrs()?;
            Ok(layout::NODES
                .iter()
                .all(|node| cidrs.get(node.name).is_some_and(|c| !c.is_empty())))
        },
    )?;
    for node in &layout::NODES {
        network::route_pod_cidrs(node, &cidrs[node.name])?;
        println!(
            "vpc: {:?} via {} ({})",
            cidrs[node.name], node.address, node.name
        );
    }
    Ok(())
}

fn apply_stdin(manifests: &str) -> Result<()> {
    let file = layout::cluster_path("bootstrap.yaml");
    fs::write(&file, manifests)?;
    cmd::stdout(state::kubectl().arg("apply").arg("-f").arg(&file)).map(drop)
}

fn apply_monitoring_crds() -> Result<()> {
    for crd in components::monitoring_crds()? {
        cmd::stdout(
            state::kubectl()
                .args(["apply", "--server-side", "-f"])
                .arg(&crd),
        )?;
    }
    cmd::stdout(state::kubectl().args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/podmonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    ]))
    .map(drop)
}

/// `kubectl apply -k` of an overlay of `deploy/` that sets the image to `localhost/podnet:<tag>`.
pub fn install_podnet(tag: &str) -> Result<()> {
    let overlay = layout::cluster_path("overlay");
    fs::create_dir_all(&overlay)?;
    let deploy = cmd::workspace_root().join("deploy");
    // kustomize takes a base by relative path only.
    let up_to_root = "../".repeat(overlay.components().count() - 1);
    let base = format!(
        "{up_to_root}{}",
        deploy.display().to_string().trim_start_matches('/')
    );
    fs::write(
        overlay.join("kustomization.yaml"),
        config::overlay_kustomization(&base, &shipped_image_name(&deploy)?, tag),
    )?;
    cmd::run(state::kubectl().arg("apply").arg("-k").arg(&overlay))
}

/// The image name of the shipped DaemonSet (`deploy/manifests/daemonset.yaml`, the chart's
/// default `image.repository`) without its tag: what an overlay's `images:` must name to
/// change it.
fn shipped_image_name(deploy: &Path) -> Result<String> {
    let path = deploy.join("manifests/daemonset.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let doc: serde_norway::Value = serde_norway::from_str(&text)?;
    let image = ["spec", "template", "spec", "containers"]
        .iter()
        .try_fold(&doc, |value, key| value.get(key))
        .and_then(|containers| containers.get(0))
        .and_then(|container| container.get("image"))
        .and_then(serde_norway::Value::as_str)
        .with_context(|| format!("{}: no container image", path.display()))?;
    Ok(image_name(image).to_owned())
}

/// `registry:5000/podnet:0.1.0` -> `registry:5000/podnet`: the image reference without its
/// tag (a colon after the last slash).
fn image_name(image: &str) -> &str {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => image,
    }
}

fn wait_ready() -> Result<()> {
    for (what, args) in [
        (
            "podnet DaemonSet rolled out",
            &[
                "rollout",
                "status",
                "daemonset/podnet",
                "-n",
                "kube-system",
                "--timeout=10s",
            ][..],
        ),
        (
            "both nodes Ready",
            &[
                "wait",
                "--for=condition=Ready",
                "node",
                "--all",
                "--timeout=10s",
            ][..],
        ),
        (
            "CoreDNS rolled out",
            &[
                "rollout",
                "status",
                "deployment/coredns",
                "-n",
                "kube-system",
                "--timeout=10s",
            ][..],
        ),
    ] {
        system::wait_until(what, START_TIMEOUT, || {
            Ok(cmd::stdout(state::kubectl().args(args)).is_ok())
        })?;
        println!("ok: {what}");
    }
    Ok(())
}

/// Stops every process of the cluster and removes what it made.
pub fn down() -> Result<()> {
    let state = State::load()?;
    let mut problems = Vec::new();
    let mut note = |result: Result<()>| {
        if let Err(e) = result {
            eprintln!("cluster down: {e:#}");
            problems.push(format!("{e:#}"));
        }
    };
    // Every daemon and container is in the cluster's cgroups.
    note(system::kill_cgroup(
        &format!("/{}", layout::CGROUP_PARENT),
        KILL_TIMEOUT,
    ));
    for node in &layout::NODES {
        note(system::remove_node_mount_ns(node));
    }
    for netns in layout::NODES
        .iter()
        .map(|n| n.netns)
        .chain([layout::VPC_NETNS])
    {
        if system::netns_exists(netns) {
            note(system::ip(&["netns", "del", netns]));
        }
    }
    // The host's leg goes with its peer in the VPC namespace; a half-made one may remain.
    if Path::new("/sys/class/net").join(layout::HOST_LINK).exists() {
        note(system::ip(&["link", "del", layout::HOST_LINK]));
    }
    for mount_point in &state.created_mount_points {
        note(fs::remove_dir(mount_point).with_context(|| format!("removing {mount_point}")));
    }
    if Path::new(layout::CLUSTER_DIR).exists() {
        note(
            fs::remove_dir_all(layout::CLUSTER_DIR)
                .with_context(|| format!("removing {}", layout::CLUSTER_DIR)),
        );
    }
    if problems.is_empty() {
        println!("cluster: down, nothing left");
        Ok(())
    } else {
        bail!("cluster down left {} problem(s)", problems.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_name_drops_only_the_tag() {
        assert_eq!(
            image_name("registry.example.invalid/podnet/podnet:0.1.0"),
            "registry.example.invalid/podnet/podnet"
        );
        assert_eq!(
            image_name("registry:5000/podnet:e2e"),
            "registry:5000/podnet"
        );
        assert_eq!(image_name("registry:5000/podnet"), "registry:5000/podnet");
    }
}
