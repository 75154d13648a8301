//! Every call the agent serves, typed: a method paired with its parameters.
//! podnet-cni and podnetctl build requests from a [`Call`]; the agent's
//! subsystems decode each request into one and match on it, so a method and
//! the shape of its parameters are written down once.

use serde_json::Value;

use crate::{
    protocol::{method, parse_params, ApiError, DnsSlowParams, FollowParams, RacesParams},
    wire::{AddParams, CheckParams, GcParams, KeyParams, StatusParams},
};

/// One call with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    /// `conntrack.races`.
    ConntrackRaces(RacesParams),
    /// `status`.
    Status,
    /// `dns.top`.
    DnsTop,
    /// `dns.slow`.
    DnsSlow(DnsSlowParams),
    /// `endpoint.add`.
    EndpointAdd(AddParams),
    /// `endpoint.del`.
    EndpointDel(KeyParams),
    /// `endpoint.check`.
    EndpointCheck(CheckParams),
    /// `endpoint.list`.
    EndpointList,
    /// `endpoint.gc`.
    EndpointGc(GcParams),
    /// `ipam.allocate`.
    IpamAllocate(KeyParams),
    /// `ipam.release`.
    IpamRelease(KeyParams),
    /// `ipam.gc`.
    IpamGc(GcParams),
    /// `ipam.status`.
    IpamStatus(StatusParams),
    /// `routes.show`.
    RoutesShow,
    /// `follow`.
    Follow(FollowParams),
}

impl Call {
    /// The method name on the wire.
    pub fn method(&self) -> &'static str {
        match self {
            Self::ConntrackRaces(_) => method::CONNTRACK_RACES,
            Self::Status => method::STATUS,
            Self::DnsTop => method::DNS_TOP,
            Self::DnsSlow(_) => method::DNS_SLOW,
            Self::EndpointAdd(_) => method::ENDPOINT_ADD,
            Self::EndpointDel(_) => method::ENDPOINT_DEL,
            Self::EndpointCheck(_) => method::ENDPOINT_CHECK,
            Self::EndpointList => method::ENDPOINT_LIST,
            Self::EndpointGc(_) => method::ENDPOINT_GC,
            Self::IpamAllocate(_) => method::IPAM_ALLOCATE,
            Self::IpamRelease(_) => method::IPAM_RELEASE,
            Self::IpamGc(_) => method::IPAM_GC,
            Self::IpamStatus(_) => method::IPAM_STATUS,
            Self::RoutesShow => method::ROUTES_SHOW,
            Self::Follow(_) => method::FOLLOW,
        }
    }

    /// The parameters on the wire (`null` for calls that take none).
    pub fn params(&self) -> Value {
        let value = match self {
            Self::ConntrackRaces(p) => serde_json::to_value(p),
            Self::DnsSlow(p) => serde_json::to_value(p),
            Self::EndpointAdd(p) => serde_json::to_value(p),
            Self::EndpointDel(p) | Self::IpamAllocate(p) | Self::IpamRelease(p) => {
                serde_json::to_value(p)
            }
            Self::EndpointCheck(p) => serde_json::to_value(p),
            Self::EndpointGc(p) | Self::IpamGc(p) => serde_json::to_value(p),
            Self::IpamStatus(p) => serde_json::to_value(p),
            Self::Follow(p) => serde_json::to_value(p),
            Self::Status | Self::DnsTop | Self::EndpointList | Self::RoutesShow => Ok(Value::Null),
        };
        // Plain structs of strings, numbers and addresses always serialise.
        value.unwrap_or(Value::Null)
    }

    /// Decodes a request: an unknown method is `unknown_method`; parameters
    /// that do not fit are `invalid_params`. Calls about one attachment need
    /// their parameters; the others take `null` as their defaults, and calls
    /// without parameters ignore what is sent.
    pub fn decode(m: &str, params: Value) -> Result<Self, ApiError> {
        Ok(match m {
            method::CONNTRACK_RACES => Self::ConntrackRaces(parse_params(m, params)?),
            method::STATUS => Self::Status,
            method::DNS_TOP => Self::DnsTop,
            method::DNS_SLOW => Self::DnsSlow(parse_params(m, params)?),
            method::ENDPOINT_ADD => Self::EndpointAdd(required(m, params)?),
            method::ENDPOINT_DEL => Self::EndpointDel(required(m, params)?),
            method::ENDPOINT_CHECK => Self::EndpointCheck(required(m, params)?),
            method::ENDPOINT_LIST => Self::EndpointList,
            method::ENDPOINT_GC => Self::EndpointGc(parse_params(m, params)?),
            method::IPAM_ALLOCATE => Self::IpamAllocate(required(m, params)?),
            method::IPAM_RELEASE => Self::IpamRelease(required(m, params)?),
            method::IPAM_GC => Self::IpamGc(parse_params(m, params)?),
            method::IPAM_STATUS => Self::IpamStatus(parse_params(m, params)?),
            method::ROUTES_SHOW => Self::RoutesShow,
            method::FOLLOW => Self::Follow(parse_params(m, params)?),
            _ => return Err(ApiError::unknown_method(m)),
        })
    }
}

/// Parameters that must be present (no default for a missing object).
fn required<T: serde::de::DeserializeOwned>(m: &str, params: Value) -> Result<T, ApiError> {
    serde_json::from_value(params).map_err(|e| ApiError::invalid_params(m, e))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::protocol::{ErrorCode, METHODS};

    #[test]
    fn every_method_decodes_to_the_call_that_names_it() {
        for &m in METHODS {
            let params = match m {
                method::ENDPOINT_ADD => json!({"endpoint": {
                    "containerId": "c1", "ifName": "eth0", "ips": ["10.0.0.2"]}}),
                method::ENDPOINT_DEL | method::IPAM_ALLOCATE | method::IPAM_RELEASE => {
                    json!({"containerId": "c1", "ifName": "eth0"})
                }
                method::ENDPOINT_CHECK => json!({"containerId": "c1", "ifName": "eth0"}),
                _ => Value::Null,
            };
            let call = Call::decode(m, params.clone()).unwrap();
            assert_eq!(call.method(), m);
            assert_eq!(Call::decode(m, call.params()).unwrap(), call, "{m}");
        }
    }

    #[test]
    fn params_on_the_wire() {
        let status = Call::IpamStatus(StatusParams {
            command: "STATUS".into(),
            ..StatusParams::default()
        });
        assert_eq!(status.params(), json!({"command": "STATUS"}));
        assert_eq!(
            Call::ConntrackRaces(RacesParams {
                limit: 5,
                ..RacesParams::default()
            })
            .params(),
            json!({"limit": 5})
        );
        assert_eq!(Call::RoutesShow.params(), Value::Null);
    }

    #[test]
    fn bad_requests_are_refused_by_kind() {
        let e = Call::decode("ipam.allocat", Value::Null).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownMethod);
        let e = Call::decode(method::IPAM_ALLOCATE, Value::Null).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParams);
        assert!(
            e.message.starts_with("invalid params for ipam.allocate: "),
            "{e}"
        );
        let e = Call::decode(method::DNS_SLOW, json!({"limit": "x"})).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParams);
        assert_eq!(
            Call::decode(method::IPAM_GC, Value::Null).unwrap(),
            Call::IpamGc(GcParams::default())
        );
    }
}
