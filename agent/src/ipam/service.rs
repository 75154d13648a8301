//! The agent's side of podnet-cni: the `endpoint.*` and `ipam.*` API methods
//! over the persisted [`NodeState`], the endpoint registry's CNI source, and
//! the CNI and IPAM metrics.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use podnet_api::{
    call::Call,
    endpoint::{validate_container_id, validate_if_name, EndpointRecord},
    wire::{CheckParams, IpamStatus, Removed},
};

use crate::{
    api::protocol::{method, ApiError, ErrorCode},
    endpoint::{Endpoint, Registry, Source},
    ipam::{
        allocator::{AttachmentKey, PoolUsage},
        commit::GroupCommit,
        recovery::{self, GraceRelease, NetnsProbe, NsfsProbe},
        source::{AddressSource, NodeCidr},
        state::{change, NodeState},
        store::{RealFs, StateLock, Store},
        Clock, IpamError, IpamMode, SystemClock, DEFAULT_COOLDOWN,
    },
    metrics::{
        shared::SharedFamilies,
        text::{Encoder, MetricType},
        Histogram,
    },
    net::{Cidr, CidrList},
    options::{duration_arg, duration_key, long_duration_arg, long_duration_key, options},
    subsystem::{to_json, Subsystem},
};

/// Upper bounds of the CNI request duration histogram, in seconds.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

options! {
    /// IPAM's section of the configuration.
    pub struct IpamOptions {
        /// IPAM mode: `node-cidr` (the node's pod CIDR) or `eni` (secondary
        /// addresses of ENIs, from a warm pool) [default: node-cidr].
        #[arg(long, env = "PODNET_IPAM_MODE", value_enum)]
        pub ipam_mode: Option<IpamMode>,
        /// Pod CIDR(s) of this node in node-cidr mode, comma-separated (at most
        /// one address per family per pod, e.g. `10.244.1.0/24,fd00:10:244:1::/64`).
        #[arg(long, env = "PODNET_NODE_CIDR")]
        pub node_cidr: Option<CidrList>,
        /// This node's name: in node-cidr mode without --node-cidr, the agent reads the pod
        /// CIDRs of this Node (one GET of `spec.podCIDRs` through the in-cluster service
        /// account) before it serves pods. The DaemonSet sets it from `spec.nodeName`.
        #[arg(long, env = "PODNET_NODE_NAME")]
        pub node_name: Option<String>,
        /// ENI mode: free addresses to keep ready; with --minimum-ip-target it
        /// takes precedence over --warm-eni-target (at most 65536) [default: unset].
        #[arg(long, env = "PODNET_WARM_IP_TARGET")]
        pub warm_ip_target: Option<u32>,
        /// ENI mode: addresses to hold at least, free or not (at most 65536)
        /// [default: unset].
        #[arg(long, env = "PODNET_MINIMUM_IP_TARGET")]
        pub minimum_ip_target: Option<u32>,
        /// ENI mode: whole ENIs' worth of free addresses (or prefixes) to keep
        /// when no other target is set (at most 1024) [default: 1].
        #[arg(long, env = "PODNET_WARM_ENI_TARGET")]
        pub warm_eni_target: Option<u32>,
        /// ENI mode: ENIs hold /28 prefixes of 16 pod addresses instead of
        /// single secondary addresses (EC2 prefix delegation; Nitro instances)
        /// [default: false].
        #[arg(long, env = "PODNET_ENI_PREFIX_DELEGATION", num_args = 0..=1, default_missing_value = "true")]
        pub eni_prefix_delegation: Option<bool>,
        /// ENI mode: pods also get an IPv6 address, of a /80 prefix delegated to
        /// the primary ENI (the AWS VPC CNI's IPv6 mode; not with --eni-configs)
        /// [default: false].
        #[arg(long, env = "PODNET_ENI_IPV6", num_args = 0..=1, default_missing_value = "true")]
        pub eni_ipv6: Option<bool>,
        /// ENI mode with prefix delegation: wholly free /28 prefixes to keep
        /// when no IP target is set (at most 4096) [default: unset: the
        /// --warm-eni-target decides].
        #[arg(long, env = "PODNET_WARM_PREFIX_TARGET")]
        pub warm_prefix_target: Option<u32>,
        /// ENI mode: EC2 API endpoint, e.g. a local emulator
        /// [default: `https://ec2.<region>.amazonaws.com`].
        #[arg(long, env = "PODNET_CLOUD_ENDPOINT")]
        pub cloud_endpoint: Option<String>,
        /// ENI mode: instance metadata endpoint [default: `http://169.254.169.254`].
        #[arg(long, env = "PODNET_IMDS_ENDPOINT")]
        pub imds_endpoint: Option<String>,
        /// ENI mode: how old an ENI podnet created for this instance must be,
        /// while attached nowhere, before it is deleted as leaked (e.g. `5m`,
        /// 1s to 24h) [default: 5m].
        #[arg(long, env = "PODNET_ENI_LEAK_GRACE", value_parser = long_duration_arg)]
        #[serde(default, deserialize_with = "long_duration_key")]
        pub eni_leak_grace: Option<Duration>,
        /// ENI mode, custom networking: per availability zone, the subnet and
        /// security groups of the ENIs that hold pod addresses, as JSON, e.g.
        /// `{"us-east-1a": {"subnet": "subnet-1", "securityGroups": ["sg-1"]}}`
        /// (as the AWS VPC CNI's `ENIConfig`); the primary ENI is then left to
        /// the node [default: unset: pods share the primary ENI's subnet].
        #[arg(long, env = "PODNET_ENI_CONFIGS")]
        pub eni_configs: Option<crate::ipam::eni::custom::EniConfigs>,
        /// After the IPAM checkpoint was found damaged and restored from its
        /// copy: how long a pod whose network namespace is gone keeps its
        /// address before it is released (e.g. `60s`) [default: 60s].
        #[arg(long, env = "PODNET_IPAM_RECOVERY_GRACE", value_parser = duration_arg)]
        #[serde(default, deserialize_with = "duration_key")]
        pub ipam_recovery_grace: Option<Duration>,
        /// How long a CNI ADD may wait, once its pod is registered, for the
        /// agent to put the pod's programs, rules and routes in the kernel
        /// before it answers, so the pod is traced and routed from its first
        /// packet (e.g. `2s`, 1ms to 60s); when it elapses the ADD answers
        /// anyway and they follow [default: unset: the ADD answers at once].
        #[arg(long, env = "PODNET_CNI_ADD_WAIT", value_parser = duration_arg)]
        #[serde(default, deserialize_with = "duration_key")]
        pub cni_add_wait: Option<Duration>,
    }
}

/// `--warm-eni-target` (as the AWS VPC CNI).
pub const DEFAULT_WARM_ENI_TARGET: u32 = 1;

/// Largest `--warm-ip-target` and `--minimum-ip-target`: the addresses of the
/// largest subnet a VPC allows (/16). An instance cannot hold more, so a
/// larger target is a typo, not a wish.
pub const MAX_IP_TARGET: u32 = 1 << 16;

/// Largest `--warm-prefix-target`: the `/28` prefixes of a `/16` subnet.
pub const MAX_WARM_PREFIX_TARGET: u32 = MAX_IP_TARGET / 16;

/// Largest `--warm-eni-target`: more network interfaces than any instance
/// type attaches (`maximumNetworkInterfaces` of `DescribeInstanceTypes`).
pub const MAX_WARM_ENI_TARGET: u32 = 1 << 10;

impl IpamOptions {
    /// The settings, defaults filled in; an error names the flag whose value
    /// is out of range.
    pub fn settings(self) -> Result<IpamSettings, String> {
        for (flag, value, max) in [
            ("warm-ip-target", self.warm_ip_target, MAX_IP_TARGET),
            ("minimum-ip-target", self.minimum_ip_target, MAX_IP_TARGET),
            ("warm-eni-target", self.warm_eni_target, MAX_WARM_ENI_TARGET),
            (
                "warm-prefix-target",
                self.warm_prefix_target,
                MAX_WARM_PREFIX_TARGET,
            ),
        ] {
            if let Some(n) = value.filter(|n| *n > max) {
                return Err(format!("--{flag} {n} is out of range (at most {max})"));
            }
        }
        if self.eni_ipv6 == Some(true) && self.eni_configs.is_some() {
            return Err(
                "--eni-ipv6 cannot be combined with --eni-configs: the IPv6 prefix is \
                 delegated to the primary ENI, which custom networking leaves to the node"
                    .into(),
            );
        }
        Ok(self.resolved())
    }

    /// The settings, defaults filled in, values unchecked.
    fn resolved(self) -> IpamSettings {
        IpamSettings {
            mode: self.ipam_mode.unwrap_or_default(),
            node_cidrs: self.node_cidr.unwrap_or_default().0,
            node_name: self.node_name,
            cooldown: DEFAULT_COOLDOWN,
            recovery_grace: self.ipam_recovery_grace.unwrap_or(recovery::DEFAULT_GRACE),
            add_wait: self.cni_add_wait,
            eni: crate::ipam::eni::EniSettings {
                targets: crate::ipam::eni::warm::Targets {
                    warm_ip: self.warm_ip_target,
                    minimum_ip: self.minimum_ip_target,
                    warm_prefix: self.warm_prefix_target,
                    warm_eni: self.warm_eni_target.unwrap_or(DEFAULT_WARM_ENI_TARGET),
                },
                ipv6: self.eni_ipv6.unwrap_or(false),
                slots: if self.eni_prefix_delegation.unwrap_or(false) {
                    crate::cloud::SlotKind::Prefix
                } else {
                    crate::cloud::SlotKind::Address
                },
                cloud_endpoint: self.cloud_endpoint,
                leak_grace: self
                    .eni_leak_grace
                    .unwrap_or(crate::ipam::eni::DEFAULT_LEAK_GRACE),
                custom: self.eni_configs.unwrap_or_default(),
                imds_endpoint: self
                    .imds_endpoint
                    .unwrap_or_else(|| crate::cloud::imds::DEFAULT_ENDPOINT.to_owned()),
            },
        }
    }
}

/// What the service needs from the agent's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpamSettings {
    /// `--ipam-mode`.
    pub mode: IpamMode,
    /// `--node-cidr`.
    pub node_cidrs: Vec<Cidr>,
    /// `--node-name`: whose Node gives the pod CIDRs when none are set.
    pub node_name: Option<String>,
    /// Cooldown of released addresses.
    pub cooldown: Duration,
    /// `--ipam-recovery-grace`.
    pub recovery_grace: Duration,
    /// `--cni-add-wait`.
    pub add_wait: Option<Duration>,
    /// ENI mode settings.
    pub eni: crate::ipam::eni::EniSettings,
}

impl Default for IpamSettings {
    fn default() -> Self {
        // The defaults are in range.
        IpamOptions::default().resolved()
    }
}

impl IpamSettings {
    /// The Node whose `spec.podCIDRs` the agent must read before it can give
    /// addresses: node-cidr mode, no CIDR configured, and a node name known.
    pub fn node_to_ask_for_pod_cidrs(&self) -> Option<&str> {
        (self.mode == IpamMode::NodeCidr && self.node_cidrs.is_empty())
            .then_some(self.node_name.as_deref())
            .flatten()
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: BTreeMap<(String, String), u64>,
    durations: BTreeMap<String, Histogram>,
    allocations: BTreeMap<&'static str, u64>,
    /// `--cni-add-wait` outcomes: in place before the answer, or not yet.
    add_waits: AddWaits,
}

#[derive(Debug, Default)]
struct AddWaits {
    in_place: u64,
    timed_out: u64,
}

/// The endpoint and IPAM service.
#[derive(Debug)]
pub struct IpamService {
    mode: IpamMode,
    commit: Arc<GroupCommit>,
    eni: Option<crate::ipam::eni::EniIpam>,
    counters: Mutex<Counters>,
    grace: Option<GraceRelease>,
    /// The registry the endpoints are published to, whose followers an ADD
    /// waits for.
    registry: Registry,
    /// `--cni-add-wait`.
    add_wait: Option<Duration>,
    _lock: StateLock,
}

impl IpamService {
    /// Locks `state_dir`, restores the checkpoint and fills the registry's
    /// CNI source from it.
    pub fn open(
        state_dir: &Path,
        config: &IpamSettings,
        registry: Registry,
    ) -> Result<Self, IpamError> {
        Self::open_with(state_dir, config, registry, Arc::new(SystemClock))
    }

    /// Like [`IpamService::open`] with another clock.
    pub fn open_with(
        state_dir: &Path,
        config: &IpamSettings,
        registry: Registry,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IpamError> {
        let eni = (config.mode == IpamMode::Eni)
            .then(|| crate::ipam::eni::EniIpam::new(crate::cloud::ApiCalls::default()));
        let node_cidrs = if eni.is_some() {
            &[][..]
        } else {
            &config.node_cidrs[..]
        };
        let mut sources = node_cidrs
            .iter()
            .map(|c| {
                NodeCidr::new(*c)
                    .map(|s| Arc::new(s) as Arc<dyn AddressSource>)
                    .map_err(|e| IpamError::Config(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(eni) = &eni {
            sources.push(Arc::new(eni.pool().clone()));
            if config.eni.ipv6 {
                sources.push(Arc::new(eni.pool6().clone()));
            }
        }
        let lock = StateLock::acquire(state_dir)?;
        let mut state = NodeState::open(
            sources,
            clock.clone(),
            config.cooldown,
            Store::new(state_dir, Box::new(RealFs::from_env())),
        )?;
        let outside = state.allocator().outside_sources();
        if !outside.is_empty() {
            tracing::warn!(count = outside.len(), first = %outside[0], "allocations outside the configured --node-cidr are kept until released");
        }
        let probe: Arc<dyn NetnsProbe> = Arc::new(NsfsProbe);
        let gone = recover(&mut state, probe.as_ref(), config.recovery_grace)?;
        sync_registry(&registry, &state);
        let usage = state.allocator().usage();
        tracing::info!(
            endpoints = state.endpoints().count(),
            allocations = state.allocator().allocations().count(),
            pools = ?usage.iter().map(PoolUsage::describe).collect::<Vec<_>>(),
            "IPAM state restored"
        );
        let followed = registry.clone();
        let on_durable = {
            Box::new(
                move |state: &NodeState, outcome: crate::ipam::commit::BatchOutcome| {
                    if outcome.endpoints_changed {
                        sync_registry(&registry, state);
                    }
                },
            )
        };
        let commit = Arc::new(GroupCommit::new(state, clock, on_durable));
        let grace = if gone.is_empty() {
            None
        } else {
            Some(
                GraceRelease::start(&commit, probe, gone, config.recovery_grace).map_err(|e| {
                    IpamError::Config(format!("starting the IPAM recovery thread: {e}"))
                })?,
            )
        };
        let service = Self {
            mode: config.mode,
            commit,
            eni,
            counters: Mutex::new(Counters::default()),
            grace,
            registry: followed,
            add_wait: config.add_wait,
            _lock: lock,
        };
        if let Some(eni) = &service.eni {
            crate::ipam::eni::start_ec2(eni, &config.eni, service.commit.shared(), state_dir)?;
        }
        Ok(service)
    }

    /// A pod whose allocation has a link-local gateway (ENI mode) gets its
    /// default route through it here, in its own namespace: `ptp` cannot add
    /// it (see [`crate::routing::pod_gateway`]). Returns the routes for the
    /// CNI result: none for other pods.
    fn pod_default_route(
        &self,
        key: &AttachmentKey,
        ep: &EndpointRecord,
    ) -> Result<Vec<Value>, ApiError> {
        let gateway = self.state().allocator().get(key).and_then(|a| {
            a.ips.iter().find_map(|x| match x.gateway {
                Some(IpAddr::V4(g)) if g.is_link_local() => Some(g),
                _ => None,
            })
        });
        let Some(gateway) = gateway else {
            return Ok(Vec::new());
        };
        if ep.netns.is_empty() {
            return Err(ApiError::invalid_params(
                method::ENDPOINT_ADD,
                format!("{key} has the link-local gateway {gateway}: its network namespace is needed to route through it"),
            ));
        }
        let changed = crate::routing::pod_gateway::ensure_default_route(
            Path::new(&ep.netns),
            &ep.if_name,
            gateway,
        )
        .map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("adding {key}'s default route via {gateway}: {e}"),
            )
        })?;
        if changed {
            tracing::debug!(attachment = %key, %gateway, "pod default route added");
        }
        Ok(vec![json!({"dst": "0.0.0.0/0", "gw": gateway})])
    }

    fn state(&self) -> MutexGuard<'_, NodeState> {
        self.commit.state()
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[allow(clippy::too_many_lines)] // one short arm per method
    fn dispatch(&self, call: Call, deadline: Option<u64>) -> Result<Value, ApiError> {
        match call {
            Call::IpamAllocate(k) => {
                let result = self.commit.run(
                    deadline,
                    Some(k.key()),
                    change::allocate(k.key(), k.network.clone()),
                );
                let label = match &result {
                    Ok(_) => "success",
                    Err(IpamError::Exhausted { .. }) => "exhausted",
                    Err(_) => "error",
                };
                *self.counters().allocations.entry(label).or_default() += 1;
                self.wake_eni();
                let a = result.map_err(ipam_error)?;
                tracing::info!(attachment = %k.key(), ips = ?a.ips.iter().map(|x| x.ip).collect::<Vec<_>>(), "allocated");
                to_json(&a)
            }
            Call::IpamRelease(k) => {
                let released = self
                    .commit
                    .run(deadline, Some(k.key()), change::release(k.key()))
                    .map_err(ipam_error)?;
                self.wake_eni();
                if let Some(a) = &released {
                    tracing::info!(attachment = %a.key, "released");
                }
                to_json(&Removed {
                    removed: usize::from(released.is_some()),
                })
            }
            Call::IpamGc(g) => {
                let valid: BTreeSet<_> = g.valid.into_iter().collect();
                let network = (!g.network.is_empty()).then_some(g.network);
                let freed = self
                    .commit
                    .run(deadline, None, change::gc_allocations(network, valid))
                    .map_err(ipam_error)?;
                tracing::info!(released = freed.len(), "IPAM garbage collected");
                self.wake_eni();
                to_json(&Removed {
                    removed: freed.len(),
                })
            }
            Call::IpamStatus(s) => {
                let state = self.state();
                let alloc = state.allocator();
                let allocation = match (&s.container_id, &s.if_name) {
                    (Some(c), Some(i)) => alloc
                        .get(&crate::ipam::allocator::AttachmentKey::new(c, i))
                        .cloned(),
                    _ => None,
                };
                let status = IpamStatus {
                    mode: match self.mode {
                        IpamMode::NodeCidr => "node-cidr".into(),
                        IpamMode::Eni => "eni".into(),
                    },
                    pools: alloc.usage(),
                    cooldowns: alloc.cooldowns(),
                    allocations: alloc.allocations().count(),
                    exhausted: alloc.exhausted(),
                    allocation,
                    eni: self.eni.as_ref().map(|e| {
                        let (allocated, cooling) = crate::ipam::eni::busy(alloc);
                        e.status(&allocated, &cooling)
                    }),
                };
                to_json(&status)
            }
            Call::EndpointAdd(a) => {
                let ep = a.endpoint;
                validate_container_id(&ep.container_id)
                    .and_then(|()| validate_if_name(&ep.if_name))
                    .map_err(|e| ApiError::invalid_params(method::ENDPOINT_ADD, e))?;
                if ep.ips.is_empty() {
                    return Err(ApiError::invalid_params(
                        method::ENDPOINT_ADD,
                        "an endpoint needs at least one address",
                    ));
                }
                let key = ep.key();
                let pod = format!("{}/{}", ep.namespace, ep.pod);
                let (ips, interface) = (ep.ips.clone(), ep.interface.clone());
                let routes = self.pod_default_route(&key, &ep)?;
                self.commit
                    .run(deadline, Some(key.clone()), change::add_endpoint(ep))
                    .map_err(ipam_error)?;
                tracing::info!(attachment = %key, %pod, ?ips, ?interface, "endpoint added");
                self.wait_for_followers(deadline, &key);
                Ok(json!({ "routes": routes }))
            }
            Call::EndpointDel(k) => {
                let removed = self
                    .commit
                    .run(deadline, Some(k.key()), change::remove_endpoint(k.key()))
                    .map_err(ipam_error)?;
                if removed.is_some() {
                    tracing::info!(attachment = %k.key(), "endpoint removed");
                }
                to_json(&Removed {
                    removed: usize::from(removed.is_some()),
                })
            }
            Call::EndpointCheck(c) => {
                let key = crate::ipam::allocator::AttachmentKey::new(&c.container_id, &c.if_name);
                let state = self.state();
                let ep = state.endpoint(&key).ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::NotFound,
                        format!("no endpoint is registered for {key}"),
                    )
                })?;
                check_endpoint(ep, &c)?;
                Ok(json!({}))
            }
            Call::EndpointList => {
                let state = self.state();
                to_json(&state.endpoints().collect::<Vec<_>>())
            }
            Call::EndpointGc(g) => {
                let valid: BTreeSet<_> = g.valid.into_iter().collect();
                let network = (!g.network.is_empty()).then_some(g.network);
                let removed = self
                    .commit
                    .run(deadline, None, change::gc_endpoints(network, valid))
                    .map_err(ipam_error)?;
                tracing::info!(removed = removed.len(), "endpoints garbage collected");
                to_json(&Removed {
                    removed: removed.len(),
                })
            }
            other => Err(ApiError::unknown_method(other.method())),
        }
    }

    /// With `--cni-add-wait`: waits until the subsystems that follow the
    /// registry have acted on the endpoint just added (its programs, rules
    /// and routes in the kernel), at most the wait and never past the
    /// caller's deadline. When the wait elapses the ADD still succeeds: the
    /// pod is registered and they follow.
    fn wait_for_followers(&self, deadline: Option<u64>, key: &impl std::fmt::Display) {
        let Some(wait) = self.add_wait else {
            return;
        };
        // The answer must still reach the caller: an ADD that waited until
        // podnet-cni gave up would be reported failed with its pod registered.
        let wait = deadline.map_or(wait, |d| {
            let left = d
                .saturating_sub(crate::endpoint::unix_ms_now())
                .saturating_sub(crate::ipam::commit::ANSWER_MARGIN_MS);
            wait.min(Duration::from_millis(left))
        });
        // Read after the commit published the endpoint: it covers this change.
        let generation = self.registry.generation();
        let outcome = self.registry.wait_followers(generation, wait);
        let mut c = self.counters();
        match outcome {
            Ok(()) => c.add_waits.in_place += 1,
            Err(behind) => {
                c.add_waits.timed_out += 1;
                tracing::warn!(attachment = %key, ?behind, ?wait, "CNI ADD answered before the pod's programs, rules and routes were all in place");
            }
        }
    }

    fn wake_eni(&self) {
        if let Some(eni) = &self.eni {
            eni.wake();
        }
    }

    /// ENI mode: hands the ENIs with links to the routing subsystem.
    pub fn publish_enis_to(&self, store: crate::routing::eni::EniStore) {
        if let Some(eni) = &self.eni {
            eni.publish_to(store);
        }
    }

    /// Pod addresses of this node's pools: (allocated, free, cooldown).
    pub fn address_counts(&self) -> (u64, u64, u64) {
        let (mut allocated, mut free, mut cooldown) = (0u64, 0u64, 0u64);
        for u in self.state().allocator().usage() {
            allocated += u.allocated;
            free = free.saturating_add(u.free);
            cooldown += u.cooldown;
        }
        (allocated, free, cooldown)
    }
}

/// The API methods the IPAM service serves (podnet-cni's calls, and
/// podnetctl's `endpoints` and `ipam`).
pub const METHODS: &[&str] = &[
    method::ENDPOINT_ADD,
    method::ENDPOINT_DEL,
    method::ENDPOINT_CHECK,
    method::ENDPOINT_LIST,
    method::ENDPOINT_GC,
    method::IPAM_ALLOCATE,
    method::IPAM_RELEASE,
    method::IPAM_GC,
    method::IPAM_STATUS,
];

impl Subsystem for IpamService {
    fn name(&self) -> &'static str {
        "ipam"
    }

    fn methods(&self) -> &'static [&'static str] {
        METHODS
    }

    fn handle(&self, m: &str, params: Value) -> Result<Value, ApiError> {
        self.handle_by(m, params, None)
    }

    /// Serves one API call, counting it by the CNI command it was made for;
    /// a change is refused or taken back when its caller's deadline passes
    /// while it waits for the disk.
    fn handle_by(
        &self,
        m: &str,
        params: Value,
        deadline_unix_ms: Option<u64>,
    ) -> Result<Value, ApiError> {
        let started = Instant::now();
        let command = params
            .get("command")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .map(str::to_owned);
        let result = Call::decode(m, params).and_then(|call| self.dispatch(call, deadline_unix_ms));
        if let Some(command) = command.filter(|c| is_cni_command(c)) {
            let outcome = match &result {
                Ok(_) => "success".to_owned(),
                Err(e) => e.code.as_str().to_owned(),
            };
            let mut c = self.counters();
            *c.requests.entry((command.clone(), outcome)).or_default() += 1;
            c.durations
                .entry(command)
                .or_insert_with(|| Histogram::new(&DURATION_BUCKETS))
                .observe(started.elapsed());
        }
        result
    }

    /// Writes the IPAM and CNI metric families.
    fn render_metrics(&self, enc: &mut Encoder, _shared: &mut SharedFamilies) {
        if let Some(eni) = &self.eni {
            let (allocated, cooling) = crate::ipam::eni::busy(self.state().allocator());
            eni.render_metrics(enc, &allocated, &cooling);
        }
        let (allocated, free, cooldown) = self.address_counts();
        enc.family(
            "podnet_ipam_addresses",
            MetricType::Gauge,
            "Pod addresses of this node's pools by state.",
        )
        .sample(&[("state", "allocated")], allocated)
        .sample(&[("state", "free")], free)
        .sample(&[("state", "cooldown")], cooldown);
        let stats = self.commit.stats();
        let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        enc.family(
            "podnet_ipam_checkpoint_writes_total",
            MetricType::Counter,
            "Writes of the IPAM checkpoint (each one fsync of the file and one of its directory), by result; concurrent changes share one write.",
        )
        .sample(&[("result", "ok")], load(&stats.writes_ok))
        .sample(&[("result", "error")], load(&stats.writes_failed));
        enc.family(
            "podnet_ipam_checkpoint_changes_total",
            MetricType::Counter,
            "IPAM and endpoint changes made durable by the checkpoint writes.",
        )
        .sample(&[], load(&stats.changes));
        enc.family(
            "podnet_ipam_late_changes_total",
            MetricType::Counter,
            "Changes whose caller's deadline passed while they waited for the disk: refused before they were made, or undone after they were written.",
        )
        .sample(&[("outcome", "refused")], load(&stats.refused_late))
        .sample(&[("outcome", "undone")], load(&stats.undone_late));
        let c = self.counters();
        let mut fam = enc.family(
            "podnet_ipam_allocations_total",
            MetricType::Counter,
            "Address allocation requests by result (success, exhausted, error).",
        );
        for result in ["success", "exhausted", "error"] {
            fam.sample(
                &[("result", result)],
                c.allocations.get(result).copied().unwrap_or(0),
            );
        }
        let mut fam = enc.family(
            "podnet_cni_requests_total",
            MetricType::Counter,
            "Agent API calls made by podnet-cni, by CNI command and result (success or the API error code).",
        );
        for ((command, result), n) in &c.requests {
            fam.sample(&[("command", command), ("result", result)], *n);
        }
        let mut fam = enc.family(
            "podnet_cni_request_duration_seconds",
            MetricType::Histogram,
            "Time the agent took to serve a podnet-cni call, by CNI command.",
        );
        for (command, h) in &c.durations {
            h.write(&mut fam, &[("command", command)]);
        }
        if self.add_wait.is_some() {
            enc.family(
                "podnet_cni_add_waits_total",
                MetricType::Counter,
                "CNI ADDs that waited (--cni-add-wait) for the pod's programs, rules and routes, by outcome: in_place before the ADD answered, or timed_out (the ADD answered first; they followed).",
            )
            .sample(&[("outcome", "in_place")], c.add_waits.in_place)
            .sample(&[("outcome", "timed_out")], c.add_waits.timed_out);
        }
    }

    /// Stops background work (the ENI thread, a recovery's grace thread);
    /// addresses stay as they are.
    fn stop(&self) {
        if let Some(eni) = &self.eni {
            eni.stop();
        }
        if let Some(grace) = &self.grace {
            grace.stop();
        }
    }
}

/// Publishes the endpoints podnet-cni registered to the registry.
fn sync_registry(registry: &Registry, state: &NodeState) {
    registry.replace_source(
        Source::Cni,
        state.endpoints().map(Endpoint::from_record).collect(),
    );
}

/// After the state was restored from the checkpoint's copy: checks it
/// against the pods that exist ([`recovery::check`]), writes what that
/// changed, and logs what was recovered from which file. Returns the
/// endpoints whose network namespace is gone, with it, for the grace release.
fn recover(
    state: &mut NodeState,
    probe: &dyn NetnsProbe,
    grace: Duration,
) -> Result<Vec<(crate::ipam::allocator::AttachmentKey, String)>, IpamError> {
    let Some(r) = state.recovery().cloned() else {
        return Ok(Vec::new());
    };
    let findings = recovery::check(state, probe);
    if findings.adopted > 0 {
        state.flush()?;
    }
    tracing::warn!(
        from = %r.from.display(),
        damaged = %r.damaged.display(),
        kept_as = %r.kept_as.as_ref().map_or_else(|| "-".to_owned(), |p| p.display().to_string()),
        error = %r.error,
        endpoints = state.endpoints().count(),
        allocations = state.allocator().allocations().count(),
        live = findings.live.len(),
        gone = findings.gone.len(),
        without_netns = findings.unknown.len(),
        adopted = findings.adopted,
        grace_s = grace.as_secs_f64(),
        "IPAM checkpoint {} is damaged; state recovered from {}",
        r.damaged.display(),
        r.from.display(),
    );
    Ok(findings
        .gone
        .into_iter()
        .filter_map(|k| state.endpoint(&k).map(|e| (k, e.netns.clone())))
        .collect())
}

fn is_cni_command(c: &str) -> bool {
    matches!(c, "ADD" | "DEL" | "CHECK" | "GC" | "STATUS")
}

#[allow(clippy::needless_pass_by_value)] // a `map_err` adapter
fn ipam_error(e: IpamError) -> ApiError {
    let code = match &e {
        IpamError::Exhausted { .. } => ErrorCode::ResourceExhausted,
        IpamError::DeadlineExceeded { .. } => ErrorCode::DeadlineExceeded,
        e if e.is_transient() => ErrorCode::Unavailable,
        IpamError::NoSources => ErrorCode::Unavailable,
        IpamError::AddressConflict { .. } => ErrorCode::Conflict,
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, e.to_string())
}

fn check_endpoint(ep: &EndpointRecord, c: &CheckParams) -> Result<(), ApiError> {
    let mismatch = |msg: String| Err(ApiError::new(ErrorCode::Mismatch, msg));
    let mut want = ep.ips.clone();
    let mut have = c.ips.clone();
    want.sort_unstable();
    have.sort_unstable();
    if want != have {
        return mismatch(format!(
            "endpoint {}/{} is registered with {want:?}, the runtime has {have:?}",
            ep.container_id, ep.if_name
        ));
    }
    if c.interface.is_some() && c.interface != ep.interface {
        return mismatch(format!(
            "endpoint {}/{} is registered on host interface {:?}, the runtime has {:?}",
            ep.container_id, ep.if_name, ep.interface, c.interface
        ));
    }
    if let Some(name) = &ep.interface {
        if !interface_exists(name) {
            return mismatch(format!(
                "host interface {name} of endpoint {}/{} does not exist",
                ep.container_id, ep.if_name
            ));
        }
    }
    Ok(())
}

/// Whether a link named `name` exists in the agent's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}
