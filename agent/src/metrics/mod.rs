//! Prometheus metrics, the ground floor every subsystem renders through: the
//! text-format [`text::Encoder`], one [`Histogram`], the agent's own process
//! and BPF figures ([`process`], [`selfstats`]), counter continuity across
//! restarts ([`continuity`]) and the HTTP [`server`] for `/metrics`,
//! `/healthz` and `/readyz`. Each subsystem renders its own families
//! (`conntrack::metrics`, `dns::metrics`, ...); [`pods`] decides whether
//! per-pod series name the pod or its workload.
//!
//! Values live in kernel maps and `/proc`; a scrape reads them and renders a
//! fresh exposition through a [`MetricsSource`], so there is no second copy
//! of any counter in user space.

pub mod continuity;
pub mod histogram;
pub mod pods;
pub mod process;
pub mod selfstats;
pub mod server;
pub mod shared;
pub mod text;

pub use histogram::Histogram;
use text::{Encoder, MetricType};

/// Renders the whole exposition for one scrape.
///
/// Implemented for any `Fn() -> String + Send + Sync`, so a closure that
/// gathers every subsystem's families can be handed to the [`server`].
/// Called on a blocking thread: it may read `/proc` and kernel maps.
pub trait MetricsSource: Send + Sync {
    /// The exposition text (Prometheus text format 0.0.4).
    fn render(&self) -> String;
}

impl<F> MetricsSource for F
where
    F: Fn() -> String + Send + Sync,
{
    fn render(&self) -> String {
        self()
    }
}

/// Writes `podnet_build_info{version,kernel,race_hook,tc_attach} 1`;
/// `kernel` is the running kernel's release (`uname -r`, e.g. from
/// `sys::kernel_release`), `race_hook` the hook that counts insert races,
/// `tc_attach` how the TC programs attach (`tcx` or `tc`).
pub fn render_build_info(enc: &mut Encoder, kernel: &str, race_hook: &str, tc_attach: &str) {
    enc.family(
        "podnet_build_info",
        MetricType::Gauge,
        "Always 1; labels carry the podnet version, the running kernel release, the insert-race hook and the TC attach mode.",
    )
    .sample(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("kernel", kernel),
            ("race_hook", race_hook),
            ("tc_attach", tc_attach),
        ],
        1_u64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_version_and_kernel() {
        let mut enc = Encoder::new();
        render_build_info(&mut enc, "6.18.0-podnet", "tp_btf/kfree_skb", "tcx");
        assert_eq!(
            enc.finish(),
            format!(
                "# HELP podnet_build_info Always 1; labels carry the podnet version, the running kernel release, the insert-race hook and the TC attach mode.\n\
                 # TYPE podnet_build_info gauge\n\
                 podnet_build_info{{version=\"{}\",kernel=\"6.18.0-podnet\",race_hook=\"tp_btf/kfree_skb\",tc_attach=\"tcx\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn closures_are_sources() {
        let source: std::sync::Arc<dyn MetricsSource> = std::sync::Arc::new(|| "x 1\n".to_owned());
        assert_eq!(source.render(), "x 1\n");
    }
}
