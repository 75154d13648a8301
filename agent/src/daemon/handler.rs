//! The daemon behind the local API and the metrics endpoint.

use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

use super::Daemon;
use crate::{
    api::{
        protocol::{self as p, method},
        server::Handler,
    },
    conntrack::metrics as mc,
    metrics::{self, text::Encoder, text::MetricType},
};

/// Answers API calls from the daemon's state.
pub struct ApiHandler(pub Arc<Daemon>);

impl Handler for ApiHandler {
    fn handle(&self, m: &str, params: Value) -> Result<Value, p::ApiError> {
        let json =
            |v: serde_json::Result<Value>| v.map_err(|e| p::ApiError::internal(e.to_string()));
        match m {
            method::CONNTRACK_RACES => {
                let params: p::RacesParams = p::parse_params(m, params)?;
                json(serde_json::to_value(self.0.races().recent(params.limit)))
            }
            method::STATUS => json(serde_json::to_value(self.0.status())),
            method::DNS_TOP => match self.0.dns().top() {
                Ok(rows) => json(serde_json::to_value(rows)),
                Err(e) => Err(p::ApiError::internal(e.to_string())),
            },
            method::DNS_SLOW => {
                let params: p::DnsSlowParams = p::parse_params(m, params)?;
                json(serde_json::to_value(self.0.dns().slow(params.limit)))
            }
            method::ROUTES_SHOW => json(serde_json::to_value(self.0.routing().show())),
            m if crate::ipam::service::IpamService::serves(m) => self.0.cni().handle(m, params),
            _ => Err(p::ApiError::unknown_method(m)),
        }
    }
}

/// Renders the whole exposition from kernel maps and `/proc` at each scrape.
pub struct MetricsRenderer {
    daemon: Arc<Daemon>,
    kernel: String,
    top: Mutex<mc::TopDestinations>,
}

impl MetricsRenderer {
    /// A renderer for `daemon`.
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Self {
            daemon,
            kernel: super::kernel_release(),
            top: Mutex::new(mc::TopDestinations::new()),
        }
    }
}

impl metrics::MetricsSource for MetricsRenderer {
    fn render(&self) -> String {
        let mut enc = Encoder::new();
        let race_hook = self.daemon.status_race_hook();
        metrics::render_build_info(
            &mut enc,
            &self.kernel,
            race_hook,
            self.daemon.tc_mode().as_str(),
        );
        metrics::process::render(&mut enc);
        metrics::selfstats::render(
            &mut enc,
            &crate::bpf::inventory::read(&self.daemon.config().bpffs),
        );
        self.daemon.cni().render_metrics(&mut enc);
        self.daemon.routing().render_metrics(&mut enc);
        let dns = self
            .daemon
            .dns()
            .snapshot()
            .map_err(
                |e| tracing::warn!(error = %e, "reading the DNS maps failed; DNS metrics omitted"),
            )
            .ok();
        let dns_lost: Vec<(&str, u64)> = dns
            .iter()
            .map(|s| (crate::dns::metrics::PROGRAM, s.counters.events_lost))
            .collect();
        if let Some(snapshot) = &dns {
            crate::dns::metrics::render(&mut enc, snapshot, self.daemon.registry());
        }
        match self.daemon.snapshot() {
            Ok(snapshot) => {
                let (stats, fill) = self.daemon.kernel_stats();
                let mut top = self.top.lock().unwrap_or_else(PoisonError::into_inner);
                let sources = mc::Sources {
                    snapshot: &snapshot,
                    stats: stats.as_ref(),
                    fill,
                };
                mc::render_with_events_lost(
                    &mut enc,
                    &sources,
                    self.daemon.registry(),
                    &mut top,
                    &dns_lost,
                );
                let c = snapshot.counters;
                let mut map_full = enc.family(
                    "podnet_bpf_map_full_total",
                    MetricType::Counter,
                    "Updates a kernel map could not take because it was full; non-zero means per-key counts are no longer complete.",
                );
                map_full
                    .sample(&[("map", "conntrack_drops")], c.drop_keys_full)
                    .sample(&[("map", "conntrack_race_destinations")], c.dest_keys_full);
                if let Some(d) = &dns {
                    crate::dns::metrics::map_full_samples(&mut map_full, &d.counters);
                }
                let mut skipped = enc.family(
                    "podnet_bpf_skipped_packets_total",
                    MetricType::Counter,
                    "Packets a kernel program counted and skipped: a kernel read failed or the packet was not IP; for dns, see the reason label.",
                );
                skipped
                    .sample(
                        &[("program", mc::PROGRAM), ("reason", "read_error")],
                        c.read_errors,
                    )
                    .sample(&[("program", mc::PROGRAM), ("reason", "not_ip")], c.not_ip);
                if let Some(d) = &dns {
                    crate::dns::metrics::skipped_samples(&mut skipped, &d.counters);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the tracer's maps failed; conntrack metrics omitted");
            }
        }
        enc.finish()
    }
}
