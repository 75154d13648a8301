//! CNI: the `podnet-cni` plugin (spec 1.1.0; accepts 0.4.0 and 1.0.0
//! configurations) and the agent side of its calls.
//!
//! The plugin is synchronous (no async runtime): [`spec`] decodes stdin and
//! builds results and errors, [`env`] validates the `CNI_*` environment,
//! [`plugin`] runs a command in the chained or the IPAM role against the
//! agent's API. [`service`] is the agent's side: the endpoint and IPAM
//! methods, backed by the persisted [`crate::ipam::state::NodeState`].
//!
//! Error codes: the spec's (1 incompatible version, 2 unsupported field,
//! 3 unknown container, 4 invalid environment, 6 decode failure, 7 invalid
//! network configuration, 11 try again later, 50 cannot serve ADD — IPAM
//! exhausted, 51 cannot serve ADD and existing pods may be degraded — agent
//! unreachable) and podnet's: 100 agent unreachable, 101 IPAM exhausted,
//! 102 the agent refused or failed the request, 103 CHECK found a mismatch.

pub mod entry;
pub mod env;
pub mod plugin;
pub mod record;
pub mod service;
pub mod spec;
pub mod view;
pub mod wire;

#[cfg(test)]
mod tests;
