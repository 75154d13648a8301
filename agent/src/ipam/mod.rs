//! IP address management for pods on this node.
//!
//! [`allocator`] hands out addresses from [`source`]s (the node's pod CIDRs,
//! or the ENI warm pool of [`eni`]), keyed by (container id, interface
//! name), with a cooldown before a released address is reused. [`state`]
//! joins the allocator, the endpoints podnet-cni registered and the
//! crash-safe checkpoint of [`store`]; [`commit`] writes concurrent changes
//! together; [`recovery`] checks a state restored from the checkpoint's copy
//! against the pods that exist; [`service`] serves podnet-cni's
//! `endpoint.*` and `ipam.*` calls over it; [`view`] renders its answers for
//! podnetctl; [`plan`] computes addressing plans.

pub mod allocator;
pub mod commit;
pub mod eni;
pub mod plan;
pub mod recovery;
pub mod service;
pub mod source;
pub mod state;
pub mod store;
pub mod view;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a released address waits before it is handed out again.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);

/// Wall-clock time, behind a trait so tests control it. Wall time (not
/// monotonic) because cooldowns outlive the process in the checkpoint.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> u64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// IPAM modes (`--ipam-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpamMode {
    /// Addresses from the node's pod CIDR(s) (alias IP / pod CIDR).
    #[default]
    NodeCidr,
    /// Secondary addresses of ENIs, from a warm pool.
    Eni,
}

/// IPAM errors.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// No address is free in a family.
    #[error("no free address: {pools}")]
    Exhausted {
        /// Every pool of the family, described with its use.
        pools: String,
    },
    /// The agent has no address source (no `--node-cidr`).
    #[error("IPAM has no addresses to give: start podnet-agent with --node-cidr")]
    NoSources,
    /// A checkpoint that contradicts itself.
    #[error("inconsistent IPAM state: {0}")]
    Inconsistent(String),
    /// The checkpoint could not be read or written.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// An endpoint asks for an address another endpoint is registered with.
    #[error("{ip} is already registered to {holder}; refusing a second owner")]
    AddressConflict {
        /// The contested address.
        ip: std::net::IpAddr,
        /// The endpoint holding it: `namespace/pod (container id/interface)`.
        holder: String,
    },
    /// The caller's deadline passed before its change could be made, or
    /// while it was written (then it was taken back).
    #[error("the caller's deadline passed {late_ms} ms ago while the change waited for the disk; nothing was changed, retry later")]
    DeadlineExceeded {
        /// How long ago the deadline passed.
        late_ms: u64,
    },
}

impl IpamError {
    /// Whether retrying later may succeed (CNI code 11).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Store(store::StoreError::Write { .. })
                | Self::Exhausted { .. }
                | Self::DeadlineExceeded { .. }
        )
    }
}

#[cfg(test)]
mod tests;
