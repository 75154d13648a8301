//! Pod labels from a real container runtime: a containerd of the test's own
//! (its root, state and sockets in a temporary directory, never the system's),
//! a pod sandbox with host networking and a Deployment pod's labels made with
//! `crictl runp`, read back through podnet's CRI client; then the agent,
//! pointed at that socket, keeps the pod's DNS series per workload.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use podnet::{endpoint::Workload, pods::cri};
use podnet_tests::{
    dns_query_message, in_netns, require_root, start_dns_responder, unavailable, wait_for, Agent,
    EndpointSpec, NsChild, Topology,
};

const CONTAINERD_DIR: &str = "/opt/podnet-tools/containerd-v2.2.10/bin";
const CRICTL: &str = "/opt/podnet-tools/cri-tools-v1.34.0/bin/crictl";
const RUNC: &str = "/usr/sbin/runc";
/// The sandbox image of the cluster tooling (`cargo xtask cluster pause-image`).
const PAUSE_IMAGE: &str = "localhost/podnet-pause:e2e";

/// The Deployment pod's identity and labels, as the kubelet passes them.
const NAMESPACE: &str = "shop";
const POD: &str = "cart-7d9f8b6c5d-x2k9p";
const LABELS: [(&str, &str); 2] = [("app", "cart"), ("pod-template-hash", "7d9f8b6c5d")];

/// A containerd with everything under one temporary directory; stopped by
/// PID (SIGTERM, then SIGKILL after 10 s) and its directory removed on drop,
/// after its sandboxes are removed.
struct Containerd {
    dir: PathBuf,
    child: Option<Child>,
    sandboxes: Vec<String>,
}

impl Containerd {
    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("podnet-containerd-")
            .tempdir()?
            .keep();
        let d = dir.display();
        let config = format!(
            r#"version = 3
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "native"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  # The sandbox's oom_score_adj (-998) is below what this machine lets
  # containerd set (no CAP_SYS_RESOURCE): clamp it, as the cluster does.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{d}/cni-bin"]
    conf_dir = "{d}/cni-conf"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
"#
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let path = format!(
            "{CONTAINERD_DIR}:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new(Path::new(CONTAINERD_DIR).join("containerd"))
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let containerd = Self {
            dir,
            child: Some(child),
            sandboxes: Vec::new(),
        };
        if !wait_for(
            || containerd.ctr(&["version"]).is_ok(),
            Duration::from_secs(20),
        ) {
            bail!("containerd did not answer; log:\n{}", containerd.log());
        }
        Ok(containerd)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Result<String> {
        run(Command::new(Path::new(CONTAINERD_DIR).join("ctr"))
            .arg("--address")
            .arg(self.socket())
            .arg("--namespace=k8s.io")
            .args(args))
    }

    fn crictl(&self, args: &[&str]) -> Result<String> {
        run(Command::new(CRICTL)
            .arg("--runtime-endpoint")
            .arg(format!("unix://{}", self.socket().display()))
            .arg("--timeout=20s")
            .args(args))
    }

    /// Imports the cluster tooling's sandbox image.
    fn import_pause_image(&self) -> Result<()> {
        let archive = self.dir.join("pause.tar");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run(Command::new(cargo)
            .args(["xtask", "cluster", "pause-image"])
            .arg(&archive))
        .context("writing the sandbox image with cargo xtask cluster pause-image")?;
        self.ctr(&["images", "import", &archive.to_string_lossy()])?;
        Ok(())
    }

    /// `crictl runp` of a host-network sandbox of pod `namespace/name` with
    /// `labels`; its id.
    fn run_sandbox(
        &mut self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<String> {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let logs = self.dir.join("pod-logs");
        std::fs::create_dir_all(&logs)?;
        let config = serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "attempt": 0},
            "labels": labels,
            "log_directory": logs,
            // NamespaceMode NODE: the host's network, no CNI.
            "linux": {"security_context": {"namespace_options": {"network": 2}}},
        });
        let file = self.dir.join(format!("{name}.json"));
        std::fs::write(&file, serde_json::to_vec(&config)?)?;
        let id = self
            .crictl(&["runp", &file.to_string_lossy()])?
            .trim()
            .to_owned();
        self.sandboxes.push(id.clone());
        Ok(id)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in std::mem::take(&mut self.sandboxes) {
            let _ = self.crictl(&["stopp", &id]);
            let _ = self.crictl(&["rmp", &id]);
        }
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id()).unwrap();
            // SAFETY: kill takes no pointers; `pid` is our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let ended = wait_for(
                || child.try_wait().is_ok_and(|s| s.is_some()),
                Duration::from_secs(10),
            );
            if !ended {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Mounts below the root (a snapshotter's) go before the directory.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let prefix = self.dir.to_string_lossy().into_owned();
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|p| p.starts_with(&prefix))
                .collect();
            points.sort_unstable_by_key(|p| std::cmp::Reverse(p.len()));
            for point in points {
                let _ = Command::new("umount").arg(point).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this machine has what the test runs: root and the binaries.
fn can_run() -> bool {
    if !require_root() {
        return false;
    }
    for bin in [
        Path::new(CONTAINERD_DIR).join("containerd"),
        Path::new(CONTAINERD_DIR).join("containerd-shim-runc-v2"),
        Path::new(CONTAINERD_DIR).join("ctr"),
        PathBuf::from(CRICTL),
        PathBuf::from(RUNC),
    ] {
        if !bin.exists() {
            return unavailable(&format!(
                "{} is missing: run cargo xtask setup",
                bin.display()
            ));
        }
    }
    true
}

fn started() -> Containerd {
    let containerd = Containerd::start().unwrap();
    containerd
        .import_pause_image()
        .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", containerd.log()));
    containerd
}

#[test]
fn sandbox_labels_and_workload_read_back_from_containerd() {
    if !can_run() {
        return;
    }
    let mut containerd = started();
    let id = containerd
        .run_sandbox(NAMESPACE, POD, &LABELS)
        .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", containerd.log()));

    let one = cri::list_pod_sandbox_blocking(&containerd.socket(), Some(&id)).unwrap();
    assert_eq!(one.len(), 1, "{one:?}");
    let sandbox = &one[0];
    assert_eq!(sandbox.id, id);
    let meta = sandbox.metadata.clone().unwrap();
    assert_eq!(
        (
            meta.namespace.as_str(),
            meta.name.as_str(),
            meta.uid.as_str(),
            meta.attempt
        ),
        (NAMESPACE, POD, "uid-cart-7d9f8b6c5d-x2k9p", 0)
    );
    assert_eq!(sandbox.state, 0, "SANDBOX_READY");
    let expected: BTreeMap<String, String> = LABELS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(sandbox.labels, expected);
    let metadata = podnet::pods::metadata_of(sandbox);
    assert_eq!(
        metadata.workload(),
        Workload {
            kind: "Deployment".into(),
            name: "cart".into()
        }
    );
    // Unfiltered, the one sandbox; an unknown id, none.
    let all = cri::list_pod_sandbox_blocking(&containerd.socket(), None).unwrap();
    assert_eq!(all.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), [id]);
    assert!(
        cri::list_pod_sandbox_blocking(&containerd.socket(), Some("0123abcd"))
            .unwrap()
            .is_empty()
    );
}

/// Sends `count` DNS queries (A) from `pod` to `server`.
fn send_queries(pod: &podnet_tests::Netns, src: IpAddr, server: SocketAddr, count: u16) {
    in_netns(pod, move || {
        let socket = UdpSocket::bind(SocketAddr::new(src, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 512];
        for id in 0..count {
            socket
                .send_to(&dns_query_message(0x4000 + id, "ok.test", 1), server)
                .unwrap();
            // One answer per query keeps them apart.
            let _ = socket.recv_from(&mut buf);
        }
    })
    .unwrap();
}

/// The test DNS responder on port 53 of the topology's server.
fn dns_responder(topo: &Topology) -> NsChild {
    start_dns_responder(topo.server(), &[topo.server_ipv4().into()]).unwrap()
}

#[test]
fn agent_keeps_series_per_workload_with_labels_from_containerd() {
    if !can_run() {
        return;
    }
    let mut containerd = started();
    let id = containerd
        .run_sandbox(NAMESPACE, POD, &LABELS)
        .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", containerd.log()));
    let topo = Topology::builder().name("cri").pods(2).build().unwrap();
    let (cart, debug) = (topo.pod(0), topo.pod(1));
    let endpoints = [
        EndpointSpec::new(NAMESPACE, POD, &[IpAddr::V4(cart.ipv4())])
            .interface(cart.host_if())
            .container_id(&id),
        // No sandbox in the runtime: the pod is its own workload.
        EndpointSpec::new(NAMESPACE, "debug", &[IpAddr::V4(debug.ipv4())])
            .interface(debug.host_if())
            .container_id("0123abcd"),
    ];
    let responder = dns_responder(&topo);
    let socket = containerd.socket().to_string_lossy().into_owned();
    // The agent's default: series per workload in every namespace.
    let agent = Agent::start_with(
        topo.node(),
        &endpoints,
        &["--cri-socket", &socket, "--pod-metrics-namespaces="],
    )
    .unwrap();
    let known = wait_for(
        || {
            agent
                .metrics(topo.node())
                .is_ok_and(|m| m.count("podnet_pod_sandboxes", &[("metadata", "known")]) == 1)
        },
        Duration::from_secs(10),
    );
    assert!(known, "sandbox not looked up; agent log:\n{}", agent.log());
    let links = wait_for(
        || {
            agent
                .api("status", serde_json::Value::Null)
                .is_ok_and(|s| s["dns"]["links"].as_array().map(Vec::len) == Some(4))
        },
        Duration::from_secs(10),
    );
    assert!(
        links,
        "DNS programs not attached; agent log:\n{}",
        agent.log()
    );
    let server = SocketAddr::new(topo.server_ipv4().into(), 53);
    send_queries(cart.netns(), IpAddr::V4(cart.ipv4()), server, 3);
    send_queries(debug.netns(), IpAddr::V4(debug.ipv4()), server, 2);
    let s = server.ip().to_string();
    let deployment = [
        ("namespace", NAMESPACE),
        ("workload_kind", "Deployment"),
        ("workload", "cart"),
        ("server", s.as_str()),
        ("qtype", "A"),
    ];
    let pod = [
        ("namespace", NAMESPACE),
        ("workload_kind", "Pod"),
        ("workload", "debug"),
        ("server", s.as_str()),
        ("qtype", "A"),
    ];
    let counted = wait_for(
        || {
            agent.metrics(topo.node()).is_ok_and(|m| {
                m.count("podnet_dns_requests_total", &deployment) == 3
                    && m.count("podnet_dns_requests_total", &pod) == 2
            })
        },
        Duration::from_secs(10),
    );
    let m = agent.metrics(topo.node()).unwrap();
    assert!(counted, "{}", m.0);
    assert_eq!(m.count_sum("podnet_dns_requests_total"), 5);
    assert_eq!(
        m.count("podnet_pod_sandboxes", &[("metadata", "unknown")]),
        1
    );
    // No series names a pod.
    assert!(
        m.0.lines()
            .filter(|l| l.starts_with("podnet_dns_"))
            .all(|l| !l.contains("pod=")),
        "{}",
        m.0
    );
    assert_eq!(
        m.count("podnet_cri_requests_total", &[("result", "error")]),
        0
    );
    drop(responder);
}
