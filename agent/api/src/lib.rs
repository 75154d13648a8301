//! podnet-api: what every podnet binary shares, and nothing else.
//!
//! The agent's Unix socket API: [`protocol`] (the envelope, method names and
//! errors), [`call`] (every call typed, a method with its parameters),
//! [`wire`] (the endpoint and IPAM calls' parameters and answers) and
//! [`client`] (the blocking client of podnet-cni and podnetctl); the records
//! those calls carry ([`endpoint`], [`ipam`]); IP prefixes ([`net`]);
//! configured durations ([`duration`]); and the filesystem check both sides
//! make ([`sys`]). It links no eBPF, async runtime or HTTP stack, so the CNI
//! plugin that depends on it stays small.

pub mod call;
pub mod client;
pub mod duration;
pub mod endpoint;
pub mod ipam;
pub mod net;
pub mod protocol;
pub mod sys;
pub mod wire;
