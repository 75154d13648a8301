//! The daemon behind the local API and the metrics endpoint: both loop over
//! the subsystems; only `status` and the agent-wide families are the
//! daemon's own.

use std::sync::Arc;

use serde_json::Value;

use super::Daemon;
use crate::{
    api::{
        protocol::{self as p, method},
        server::Handler,
    },
    metrics::{
        self, pods::RegistryPodLabels, server::Readiness, shared::SharedFamilies, text::Encoder,
    },
    subsystem::to_json,
};

/// Answers API calls: `status` itself, anything else through the subsystem
/// that serves it.
pub struct ApiHandler(pub Arc<Daemon>);

impl Handler for ApiHandler {
    fn handle(&self, m: &str, params: Value) -> Result<Value, p::ApiError> {
        self.handle_by(m, params, None)
    }

    fn handle_by(
        &self,
        m: &str,
        params: Value,
        deadline_unix_ms: Option<u64>,
    ) -> Result<Value, p::ApiError> {
        if m == method::STATUS {
            return to_json(&self.0.status());
        }
        match self
            .0
            .subsystems()
            .iter()
            .find(|s| s.methods().contains(&m))
        {
            Some(subsystem) => subsystem.handle_by(m, params, deadline_unix_ms),
            None => Err(p::ApiError::unknown_method(m)),
        }
    }
}

/// Renders the whole exposition from kernel maps and `/proc` at each scrape;
/// per-pod series are labelled per workload, or per pod in the namespaces
/// `--pod-metrics-namespaces` lists (`metrics::pods`).
pub struct MetricsRenderer {
    daemon: Arc<Daemon>,
    readiness: Readiness,
    kernel: String,
    pod_labels: Arc<RegistryPodLabels>,
}

impl MetricsRenderer {
    /// A renderer for `daemon`; `podnet_ready` follows `readiness`, the state
    /// `/readyz` answers from.
    pub fn new(daemon: Arc<Daemon>, readiness: Readiness) -> Self {
        let pod_labels = Arc::new(RegistryPodLabels::new(
            daemon.config().pods.pod_level.clone(),
            daemon.registry().clone(),
        ));
        Self {
            daemon,
            readiness,
            kernel: crate::sys::kernel_release(),
            pod_labels,
        }
    }
}

impl metrics::MetricsSource for MetricsRenderer {
    fn render(&self) -> String {
        let mut enc = Encoder::with_pod_labels(self.pod_labels.clone());
        metrics::render_build_info(
            &mut enc,
            &self.kernel,
            self.daemon.conntrack().race_hook(),
            self.daemon.tc_mode().as_str(),
        );
        metrics::process::render(&mut enc);
        metrics::selfstats::render(
            &mut enc,
            &crate::bpf::inventory::read_cached(&self.daemon.config().bpffs, self.daemon.tc_mode()),
        );
        metrics::selfstats::render_threads(&mut enc, &crate::heartbeat::registry().health());
        metrics::server::render_ready(&mut enc, &self.readiness);
        metrics::server::render_stats(&mut enc);
        let mut shared = SharedFamilies::default();
        for subsystem in self.daemon.subsystems() {
            subsystem.render_metrics(&mut enc, &mut shared);
        }
        shared.render(&mut enc);
        enc.finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::{api::protocol::METHODS, conntrack, dns, ipam, routing};

    #[test]
    fn every_api_method_has_one_owner() {
        let mut owned: Vec<&str> = [
            conntrack::METHODS,
            dns::METHODS,
            routing::METHODS,
            ipam::service::METHODS,
            &[
                crate::api::protocol::method::STATUS,
                crate::api::protocol::method::FOLLOW,
            ],
        ]
        .concat();
        let count = owned.len();
        owned.sort_unstable();
        owned.dedup();
        assert_eq!(owned.len(), count, "a method with two owners");
        let mut listed = METHODS.to_vec();
        listed.sort_unstable();
        assert_eq!(owned, listed);
    }
}
