//! The one shape every subsystem has, as the daemon sees it.
//!
//! A subsystem (conntrack, dns, routing, ipam) is started by its own
//! `start` with its own settings and the endpoint registry, owns its state
//! and threads, and then answers the daemon through [`Subsystem`]: its API
//! methods, its metric families, and stopping. The daemon keeps a list of
//! them and loops; it knows no subsystem's methods or families.

use serde_json::Value;

use crate::{
    api::protocol::ApiError,
    metrics::{shared::SharedFamilies, text::Encoder},
};

/// A started subsystem.
pub trait Subsystem: Send + Sync {
    /// Short name (`conntrack`, `dns`, `routing`, `ipam`), for logs.
    fn name(&self) -> &'static str;

    /// The API methods it serves (see `api::protocol::method`).
    fn methods(&self) -> &'static [&'static str] {
        &[]
    }

    /// Serves one of [`Subsystem::methods`].
    fn handle(&self, method: &str, _params: Value) -> Result<Value, ApiError> {
        Err(ApiError::unknown_method(method))
    }

    /// Serves one of [`Subsystem::methods`] for a client that gives up at
    /// `deadline_unix_ms` (see `api::server::Handler::handle_by`); a
    /// subsystem whose calls can wait overrides it.
    fn handle_by(
        &self,
        method: &str,
        params: Value,
        deadline_unix_ms: Option<u64>,
    ) -> Result<Value, ApiError> {
        let _ = deadline_unix_ms;
        self.handle(method, params)
    }

    /// Writes its own metric families into `enc`, and its samples of the
    /// families several subsystems share into `shared`.
    fn render_metrics(&self, enc: &mut Encoder, shared: &mut SharedFamilies);

    /// Stops its threads; what it put in the kernel stays in place.
    fn stop(&self);
}

/// Serialises an API result (a failure is an internal error: the types are
/// plain data).
pub fn to_json<T: serde::Serialize>(value: &T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::internal(e.to_string()))
}
