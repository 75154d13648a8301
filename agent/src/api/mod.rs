//! The agent's local API on a Unix socket (`--socket`, mode 0600, root only),
//! used by podnet-cni and podnetctl; the only place debugging data is served.
//!
//! [`protocol`] defines the wire format (one JSON request and one JSON answer
//! per connection, each a line), [`server`] serves it in the agent through a
//! [`server::Handler`], [`client`] is the blocking client of both tools, and
//! [`view`] renders results for people.

pub use podnet_api::{call, client, protocol};
pub mod follow;
pub mod server;
pub mod status_view;
pub mod view;
