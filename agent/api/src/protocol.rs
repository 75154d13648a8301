//! The wire protocol of the agent's Unix socket API, shared by the agent,
//! podnetctl and podnet-cni.
//!
//! One request per connection: the client writes one JSON object and a
//! newline, the agent answers with one JSON object and a newline, then closes.
//!
//! ```text
//! → {"version":1,"method":"conntrack.races","params":{"limit":100}}
//! ← {"version":1,"ok":true,"result":[...]}
//! ← {"version":1,"ok":false,"error":{"code":"unknown_method","message":"..."}}
//! ```
//!
//! [`method::FOLLOW`] is the one stream: its answer line is followed by one
//! JSON event per line, pushed by the agent as events happen, until the
//! client closes the connection. A follower that does not keep up loses
//! events, never the agent's time: it is told how many in a `lost` line.
//!
//! ```text
//! → {"version":1,"method":"follow","params":{"filter":{"namespace":"shop"}}}
//! ← {"version":1,"ok":true,"result":{"follower":1,"buffer":4096}}
//! ← {"type":"race","time_unix_ms":...,"loser":{"namespace":"shop","pod":"b"},...}
//! ← {"type":"dns","outcome":"timeout",...}
//! ← {"type":"lost","events":311}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// Largest request the agent reads, newline included.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Largest response a client reads, newline included.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Method names.
pub mod method {
    /// Recent insert races, oldest first. Params: [`super::RacesParams`];
    /// result: an array of `conntrack::events::RaceRecord`.
    pub const CONNTRACK_RACES: &str = "conntrack.races";
    /// The agent's status, as one JSON object.
    pub const STATUS: &str = "status";
    /// Per pod and DNS server: rate, p50, p99, timeouts, error rate over
    /// about a minute; result: an array of `dns::top::TopRow`.
    pub const DNS_TOP: &str = "dns.top";
    /// Recent slow, failed and unanswered DNS queries with their names,
    /// oldest first. Params: [`super::DnsSlowParams`]; result: an array of
    /// `dns::decode::QueryRecord`.
    pub const DNS_SLOW: &str = "dns.slow";
    /// Registers a pod attachment (podnet-cni, chained role).
    pub const ENDPOINT_ADD: &str = "endpoint.add";
    /// Removes a pod attachment (idempotent).
    pub const ENDPOINT_DEL: &str = "endpoint.del";
    /// Verifies a pod attachment against what the runtime believes.
    pub const ENDPOINT_CHECK: &str = "endpoint.check";
    /// The registered pod attachments.
    pub const ENDPOINT_LIST: &str = "endpoint.list";
    /// Removes attachments not listed as valid.
    pub const ENDPOINT_GC: &str = "endpoint.gc";
    /// Allocates addresses for an attachment (idempotent).
    pub const IPAM_ALLOCATE: &str = "ipam.allocate";
    /// Releases an attachment's addresses (idempotent).
    pub const IPAM_RELEASE: &str = "ipam.release";
    /// Releases allocations not listed as valid.
    pub const IPAM_GC: &str = "ipam.gc";
    /// Pools, use and cooldowns.
    pub const IPAM_STATUS: &str = "ipam.status";
    /// Routing state, desired versus actual, as of the last reconcile;
    /// result: `routing::show::RoutesView`.
    pub const ROUTES_SHOW: &str = "routes.show";
    /// A stream of insert races, failed DNS queries and netfilter drops as
    /// they happen. Params: [`super::FollowParams`]; the answer line is
    /// followed by one event per line until the client closes.
    pub const FOLLOW: &str = "follow";
}

/// Every method the agent serves; anything else is `unknown_method`.
pub const METHODS: &[&str] = &[
    method::CONNTRACK_RACES,
    method::STATUS,
    method::DNS_TOP,
    method::DNS_SLOW,
    method::ENDPOINT_ADD,
    method::ENDPOINT_DEL,
    method::ENDPOINT_CHECK,
    method::ENDPOINT_LIST,
    method::ENDPOINT_GC,
    method::IPAM_ALLOCATE,
    method::IPAM_RELEASE,
    method::IPAM_GC,
    method::IPAM_STATUS,
    method::ROUTES_SHOW,
    method::FOLLOW,
];

/// One request.
///
/// Unknown fields are ignored, so a client may send `deadline_unix_ms` to an
/// agent that predates it, and a request without it (an older client) has no
/// deadline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version; must be [`VERSION`].
    pub version: u32,
    /// One of [`METHODS`].
    pub method: String,
    /// Method parameters; `null` when absent.
    #[serde(default)]
    pub params: Value,
    /// When the client stops waiting for the answer, in milliseconds since
    /// the Unix epoch (client and agent share the node's clock). The agent
    /// refuses work it would start after this moment
    /// ([`ErrorCode::DeadlineExceeded`]) and does not leave behind a change it
    /// made for a client that is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix_ms: Option<u64>,
}

impl Request {
    /// A request of this protocol version, without a deadline.
    pub fn new(method: impl Into<String>, params: Value) -> Self {
        Self {
            version: VERSION,
            method: method.into(),
            params,
            deadline_unix_ms: None,
        }
    }

    /// The same request with a deadline.
    #[must_use]
    pub fn with_deadline(mut self, deadline_unix_ms: u64) -> Self {
        self.deadline_unix_ms = Some(deadline_unix_ms);
        self
    }
}

/// Milliseconds since the Unix epoch now, the clock of
/// [`Request::deadline_unix_ms`] (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One response: `result` when `ok`, else `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version of the answer.
    pub version: u32,
    /// Whether the call succeeded.
    pub ok: bool,
    /// The result, when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    /// A successful response.
    pub fn success(result: Value) -> Self {
        Self {
            version: VERSION,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A failed response.
    pub fn failure(error: ApiError) -> Self {
        Self {
            version: VERSION,
            ok: false,
            result: None,
            error: Some(error),
        }
    }

    /// The result or the error. A response that says `ok` without a result
    /// yields `null`; one that says not `ok` without an error yields an
    /// [`ErrorCode::Internal`] error.
    pub fn into_result(self) -> Result<Value, ApiError> {
        if self.ok {
            Ok(self.result.unwrap_or(Value::Null))
        } else {
            Err(self.error.unwrap_or_else(|| {
                ApiError::new(
                    ErrorCode::Internal,
                    "the agent reported a failure without an error",
                )
            }))
        }
    }
}

/// What went wrong, in a form programs can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is not valid JSON or lacks a field.
    BadRequest,
    /// The request's protocol version is not [`VERSION`].
    UnsupportedVersion,
    /// The method is not one of [`METHODS`].
    UnknownMethod,
    /// The parameters do not fit the method.
    InvalidParams,
    /// The request exceeds [`MAX_REQUEST_BYTES`].
    RequestTooLarge,
    /// The request did not arrive in time.
    Timeout,
    /// The peer is not allowed to use the API.
    PermissionDenied,
    /// The agent cannot serve the method right now (e.g. still starting).
    Unavailable,
    /// The agent failed while serving the request.
    Internal,
    /// A resource ran out (e.g. no free pod address).
    ResourceExhausted,
    /// The named object does not exist.
    NotFound,
    /// The object exists but differs from what the caller expected.
    Mismatch,
    /// The request collides with what another object holds (e.g. an address
    /// another endpoint is registered with).
    Conflict,
    /// The request's deadline passed before the agent could serve it; nothing
    /// was changed, the call may be retried.
    DeadlineExceeded,
    /// A code this build does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnknownMethod => "unknown_method",
            Self::InvalidParams => "invalid_params",
            Self::RequestTooLarge => "request_too_large",
            Self::Timeout => "timeout",
            Self::PermissionDenied => "permission_denied",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::ResourceExhausted => "resource_exhausted",
            Self::NotFound => "not_found",
            Self::Mismatch => "mismatch",
            Self::Conflict => "conflict",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answered by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ApiError {
    /// What kind of error.
    pub code: ErrorCode,
    /// What happened, for people.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Parameters that do not fit the method.
    pub fn invalid_params(method: &str, error: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorCode::InvalidParams,
            format!("invalid params for {method}: {error}"),
        )
    }

    /// A method that is not served.
    pub fn unknown_method(method: &str) -> Self {
        Self::new(
            ErrorCode::UnknownMethod,
            format!(
                "unknown method {method:?}; known methods: {}",
                METHODS.join(", ")
            ),
        )
    }

    /// The agent failed while serving the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// How many races `conntrack.races` returns when `limit` is not given.
pub const DEFAULT_RACES_LIMIT: usize = 100;

/// Parameters of [`method::CONNTRACK_RACES`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RacesParams {
    /// Return at most this many of the newest races.
    #[serde(default = "default_races_limit")]
    pub limit: usize,
    /// Only races that match, before the limit.
    #[serde(default, skip_serializing_if = "EventFilter::is_empty")]
    pub filter: EventFilter,
}

impl Default for RacesParams {
    fn default() -> Self {
        Self {
            limit: DEFAULT_RACES_LIMIT,
            filter: EventFilter::default(),
        }
    }
}

fn default_races_limit() -> usize {
    DEFAULT_RACES_LIMIT
}

/// How many queries `dns.slow` returns when `limit` is not given.
pub const DEFAULT_DNS_SLOW_LIMIT: usize = 100;

/// Parameters of [`method::DNS_SLOW`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSlowParams {
    /// Return at most this many of the newest queries.
    #[serde(default = "default_dns_slow_limit")]
    pub limit: usize,
    /// Only queries that match, before the limit.
    #[serde(default, skip_serializing_if = "EventFilter::is_empty")]
    pub filter: EventFilter,
}

impl Default for DnsSlowParams {
    fn default() -> Self {
        Self {
            limit: DEFAULT_DNS_SLOW_LIMIT,
            filter: EventFilter::default(),
        }
    }
}

fn default_dns_slow_limit() -> usize {
    DEFAULT_DNS_SLOW_LIMIT
}

/// Every cause an event can carry, as [`EventFilter::cause`] names it:
/// an insert race, a DNS query that timed out, was slow, or failed with its
/// response code (lower case), or another netfilter drop.
pub const CAUSES: &[&str] = &[
    "insert_race",
    "timeout",
    "slow",
    "servfail",
    "nxdomain",
    "refused",
    "netfilter_drop",
    "retried",
    "dropped",
    "unanswered",
    "late",
];

/// Which events and records a caller wants: every field that is set must
/// match; an empty filter matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    /// The pod's namespace (`""`: host traffic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The DNS server, or the race's destination: an address, or an
    /// address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Any of these causes (one of [`CAUSES`]); empty: any cause.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cause: Vec<String>,
}

impl EventFilter {
    /// True when the filter matches everything.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Checks the causes and the server's form, so a typo is an error and
    /// not a filter that never matches.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(unknown) = self.cause.iter().find(|c| !CAUSES.contains(&c.as_str())) {
            return Err(format!(
                "unknown cause {unknown:?}; known causes: {}",
                CAUSES.join(", ")
            ));
        }
        if let Some(server) = &self.server {
            if server.parse::<std::net::IpAddr>().is_err()
                && server.parse::<std::net::SocketAddr>().is_err()
            {
                return Err(format!(
                    "server {server:?} is neither an address nor an address:port"
                ));
            }
        }
        Ok(())
    }
}

/// Parameters of [`method::FOLLOW`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowParams {
    /// Only events that match.
    #[serde(default, skip_serializing_if = "EventFilter::is_empty")]
    pub filter: EventFilter,
}

/// The answer line of [`method::FOLLOW`], before the events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowAccepted {
    /// The follower's number, as `status` lists it.
    pub follower: u64,
    /// Events the agent holds for a follower that falls behind; beyond them
    /// the oldest are lost and counted.
    pub buffer: usize,
}

/// Decodes a method's parameters; `null` (no params) decodes as `T::default()`.
pub fn parse_params<T>(method: &str, params: Value) -> Result<T, ApiError>
where
    T: serde::de::DeserializeOwned + Default,
{
    if params.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(params).map_err(|e| ApiError::invalid_params(method, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_shapes() {
        let req = Request::new(method::CONNTRACK_RACES, json!({"limit": 100}));
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"version":1,"method":"conntrack.races","params":{"limit":100}}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::success(json!([1]))).unwrap(),
            r#"{"version":1,"ok":true,"result":[1]}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::failure(ApiError::new(
                ErrorCode::UnknownMethod,
                "no"
            )))
            .unwrap(),
            r#"{"version":1,"ok":false,"error":{"code":"unknown_method","message":"no"}}"#
        );
    }

    #[test]
    fn a_deadline_is_sent_only_when_set_and_old_requests_have_none() {
        let req = Request::new(method::STATUS, Value::Null).with_deadline(1_700_000_000_123);
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"version":1,"method":"status","params":null,"deadline_unix_ms":1700000000123}"#
        );
        let old: Request =
            serde_json::from_str(r#"{"version":1,"method":"status","params":null}"#).unwrap();
        assert_eq!(old.deadline_unix_ms, None);
        assert_eq!(
            serde_json::to_string(&Response::failure(ApiError::new(
                ErrorCode::DeadlineExceeded,
                "late"
            )))
            .unwrap(),
            r#"{"version":1,"ok":false,"error":{"code":"deadline_exceeded","message":"late"}}"#
        );
    }

    #[test]
    fn params_default_when_absent() {
        let req: Request = serde_json::from_str(r#"{"version":1,"method":"status"}"#).unwrap();
        assert!(req.params.is_null());
        let p: RacesParams = parse_params(method::CONNTRACK_RACES, Value::Null).unwrap();
        assert_eq!(p.limit, DEFAULT_RACES_LIMIT);
        let p: RacesParams = parse_params(method::CONNTRACK_RACES, json!({})).unwrap();
        assert_eq!(p.limit, DEFAULT_RACES_LIMIT);
        let e =
            parse_params::<RacesParams>(method::CONNTRACK_RACES, json!({"limit": -1})).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParams);
        assert!(
            e.message
                .starts_with("invalid params for conntrack.races: "),
            "{}",
            e.message
        );
    }

    #[test]
    fn filters_on_the_wire_and_their_checks() {
        assert_eq!(
            serde_json::to_value(RacesParams::default()).unwrap(),
            json!({"limit": 100})
        );
        let params = FollowParams {
            filter: EventFilter {
                namespace: Some("shop".into()),
                cause: vec!["timeout".into(), "insert_race".into()],
                ..EventFilter::default()
            },
        };
        let wire = serde_json::to_value(&params).unwrap();
        assert_eq!(
            wire,
            json!({"filter": {"namespace": "shop", "cause": ["timeout", "insert_race"]}})
        );
        assert_eq!(
            parse_params::<FollowParams>(method::FOLLOW, wire).unwrap(),
            params
        );
        assert!(
            parse_params::<FollowParams>(method::FOLLOW, json!({"filter": {"ns": "x"}})).is_err()
        );
        assert_eq!(params.filter.validate(), Ok(()));
        let bad = EventFilter {
            cause: vec!["timout".into()],
            ..EventFilter::default()
        };
        assert_eq!(
            bad.validate().unwrap_err(),
            "unknown cause \"timout\"; known causes: insert_race, timeout, slow, servfail, nxdomain, refused, netfilter_drop, retried, dropped, unanswered, late"
        );
        for (server, ok) in [
            ("10.0.0.1", true),
            ("10.0.0.1:53", true),
            ("[fd00::1]:53", true),
            ("dns", false),
        ] {
            let f = EventFilter {
                server: Some(server.into()),
                ..EventFilter::default()
            };
            assert_eq!(f.validate().is_ok(), ok, "{server}");
        }
    }

    #[test]
    fn unknown_error_codes_from_newer_agents_decode() {
        let r: Response = serde_json::from_str(
            r#"{"version":1,"ok":false,"error":{"code":"quota","message":"m"}}"#,
        )
        .unwrap();
        assert_eq!(r.into_result().unwrap_err().code, ErrorCode::Unknown);
    }
}
