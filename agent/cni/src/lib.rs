//! podnet-cni: the CNI plugin (spec 1.1.0; accepts 0.4.0 and 1.0.0
//! configurations), chained after ptp/bridge or as an `ipam` plugin.
//!
//! Synchronous (no async runtime) and linked only against the agent's API
//! crate: [`spec`] decodes stdin and builds results and errors, [`env`]
//! validates the `CNI_*` environment, [`plugin`] runs a command in the chained
//! or the IPAM role against the agent's API, [`entry`] is the whole call as
//! the binary makes it. The agent's side of these calls is `podnet::ipam::service`.
//!
//! Error codes: the spec's (1 incompatible version, 2 unsupported field,
//! 3 unknown container, 4 invalid environment, 6 decode failure, 7 invalid
//! network configuration, 11 try again later, 50 cannot serve ADD — IPAM
//! exhausted, 51 cannot serve ADD and existing pods may be degraded — agent
//! unreachable) and podnet's: 100 agent unreachable, 101 IPAM exhausted,
//! 102 the agent refused or failed the request, 103 CHECK found a mismatch,
//! 104 an address of the attachment is registered to another pod.

pub mod entry;
pub mod env;
pub mod plugin;
pub mod spec;

#[cfg(test)]
mod tests;
