//! podnet: an eBPF node networking agent for Kubernetes.
//!
//! One folder per subsystem: [`bpf`] loads and pins kernel programs,
//! [`conntrack`] turns insert races into named pods and flows, [`endpoint`]
//! knows which pod owns which address, [`metrics`] and [`api`] expose it all.

pub mod api;
pub mod bpf;
pub mod cloud;
pub mod config;
pub mod conntrack;
pub mod ctl;
pub mod daemon;
pub mod dns;
pub mod endpoint;
pub mod flowdrops;
pub mod heartbeat;
pub mod ipam;
pub mod kube;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod options;
pub mod pods;
pub mod recent;
pub mod routing;
pub mod subsystem;
pub mod sys;
