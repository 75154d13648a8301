//! One plugin call: decode, validate, talk to the agent, answer.

use std::{collections::BTreeSet, net::IpAddr};

use podnet_api::{
    call::Call,
    client::ClientError,
    endpoint::{AttachmentKey, EndpointRecord},
    ipam::Allocation,
    protocol::ErrorCode,
    wire::{AddParams, CheckParams, GcParams, IpamStatus, KeyParams, StatusParams},
};
use serde_json::{json, Value};

use crate::{
    env::{CniEnv, Command},
    spec::{self, CniError, CniResult, Code, NetConf, Role},
};

/// The agent as the plugin sees it: one call per method.
pub trait AgentApi {
    /// Calls `method` with `params`.
    fn call(&self, method: &str, params: Value) -> Result<Value, ClientError>;
}

/// What a successful call prints on stdout (nothing for DEL, CHECK, GC, STATUS).
pub type Output = Option<String>;

/// Maps an agent call's failure to a CNI error.
pub fn agent_error(e: ClientError) -> CniError {
    match e {
        ClientError::Remote { ref error, .. } => {
            let code = match error.code {
                ErrorCode::ResourceExhausted => Code::IpamExhausted,
                ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::DeadlineExceeded => {
                    Code::TryAgainLater
                }
                ErrorCode::NotFound => Code::UnknownContainer,
                ErrorCode::Mismatch => Code::CheckFailed,
                ErrorCode::Conflict => Code::AddressConflict,
                _ => Code::AgentFailed,
            };
            CniError::new(
                code,
                "the podnet agent refused the request",
                error.message.clone(),
            )
        }
        other => CniError::new(
            Code::AgentUnreachable,
            "the podnet agent is unreachable",
            other.to_string(),
        ),
    }
}

fn call<T: serde::de::DeserializeOwned>(agent: &dyn AgentApi, call: &Call) -> Result<T, CniError> {
    let value = agent
        .call(call.method(), call.params())
        .map_err(agent_error)?;
    serde_json::from_value(value).map_err(|e| {
        CniError::new(
            Code::AgentFailed,
            "unexpected answer from the podnet agent",
            format!("{}: {e}", call.method()),
        )
    })
}

/// Runs a command whose configuration is already decoded.
#[allow(clippy::too_many_lines)] // one short arm per (command, role)
pub fn run(env: &CniEnv, conf: &NetConf, agent: &dyn AgentApi) -> Result<Output, CniError> {
    let command = env.command.as_str().to_owned();
    let key = || KeyParams {
        command: command.clone(),
        container_id: env.container_id.clone(),
        if_name: env.if_name.clone(),
        network: conf.name.clone(),
    };
    match (env.command, conf.role) {
        (Command::Version, _) => Ok(Some(spec::version_json(&conf.cni_version))),
        (Command::Add, Role::Ipam) => {
            let a: Allocation = call(agent, &Call::IpamAllocate(key()))?;
            Ok(Some(ipam_result(&conf.cni_version, &a).to_string()))
        }
        (Command::Add, Role::Chained) => {
            let (prev, raw) = prev_result(conf)?;
            let att = spec::attachment(&prev, &env.if_name);
            if att.ips.is_empty() {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    "invalid network configuration",
                    "prevResult has no address for the pod: podnet-cni must follow a plugin that sets one up",
                ));
            }
            let record = EndpointRecord {
                container_id: env.container_id.clone(),
                if_name: env.if_name.clone(),
                network: conf.name.clone(),
                netns: env.netns.clone(),
                namespace: env.pod.namespace.clone(),
                pod: env.pod.name.clone(),
                pod_uid: env.pod.uid.clone(),
                interface: att.host_interface,
                ips: att.ips,
            };
            let answer: Value = call(
                agent,
                &Call::EndpointAdd(AddParams {
                    command,
                    endpoint: record,
                }),
            )?;
            Ok(Some(
                with_routes(raw.clone(), &answer["routes"]).to_string(),
            ))
        }
        (Command::Del, Role::Ipam) => {
            let _: Value = call(agent, &Call::IpamRelease(key()))?;
            Ok(None)
        }
        (Command::Del, Role::Chained) => {
            let _: Value = call(agent, &Call::EndpointDel(key()))?;
            Ok(None)
        }
        (Command::Check, Role::Chained) => {
            let (prev, _) = prev_result(conf)?;
            let att = spec::attachment(&prev, &env.if_name);
            let _: Value = call(
                agent,
                &Call::EndpointCheck(CheckParams {
                    command,
                    container_id: env.container_id.clone(),
                    if_name: env.if_name.clone(),
                    ips: att.ips,
                    interface: att.host_interface,
                }),
            )?;
            Ok(None)
        }
        (Command::Check, Role::Ipam) => {
            let status: IpamStatus = call(
                agent,
                &Call::IpamStatus(StatusParams {
                    command,
                    container_id: Some(env.container_id.clone()),
                    if_name: Some(env.if_name.clone()),
                }),
            )?;
            check_allocation(conf, env, status.allocation.as_ref())?;
            Ok(None)
        }
        (Command::Gc, role) => {
            let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
                CniError::new(
                    Code::InvalidConfig,
                    "invalid network configuration",
                    "GC needs \"cni.dev/valid-attachments\"",
                )
            })?;
            let params = GcParams {
                command,
                network: conf.name.clone(),
                valid: valid
                    .iter()
                    .map(|v| AttachmentKey::new(&v.container_id, &v.ifname))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            };
            if role == Role::Chained {
                let _: Value = call(agent, &Call::EndpointGc(params.clone()))?;
            }
            let _: Value = call(agent, &Call::IpamGc(params))?;
            Ok(None)
        }
        (Command::Status, _) => {
            let status_call = Call::IpamStatus(StatusParams {
                command,
                ..StatusParams::default()
            });
            let status: IpamStatus = agent
                .call(status_call.method(), status_call.params())
                .map_err(|e| match agent_error(e) {
                    e if e.code == Code::AgentUnreachable as u32 => CniError::new(
                        Code::NotAvailableDegraded,
                        "podnet is not available",
                        e.details,
                    ),
                    e => CniError::new(Code::NotAvailable, "podnet is not available", e.details),
                })
                .and_then(|v| {
                    serde_json::from_value(v).map_err(|e| {
                        CniError::new(Code::NotAvailable, "podnet is not available", e.to_string())
                    })
                })?;
            if conf.role == Role::Ipam || !status.pools.is_empty() {
                if let Some(why) = status.exhausted {
                    return Err(CniError::new(
                        Code::NotAvailable,
                        "podnet IPAM has no free address",
                        why,
                    ));
                }
            }
            Ok(None)
        }
    }
}

fn prev_result(conf: &NetConf) -> Result<(CniResult, &Value), CniError> {
    let raw = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "invalid network configuration",
            "podnet-cni as a chained plugin needs \"prevResult\": put it after ptp, bridge or another interface plugin",
        )
    })?;
    Ok((spec::parse_prev_result(raw)?, raw))
}

fn check_allocation(
    conf: &NetConf,
    env: &CniEnv,
    allocation: Option<&Allocation>,
) -> Result<(), CniError> {
    let Some(a) = allocation else {
        return Err(CniError::new(
            Code::UnknownContainer,
            "no allocation",
            format!(
                "podnet IPAM has no addresses for {}/{}",
                env.container_id, env.if_name
            ),
        ));
    };
    if let Some(prev) = conf.prev_result.as_ref() {
        let prev = spec::parse_prev_result(prev)?;
        let mut want: Vec<IpAddr> = a.ips.iter().map(|x| x.ip).collect();
        let mut have: Vec<IpAddr> = prev.ips.iter().filter_map(spec::IpConfig::ip).collect();
        want.sort_unstable();
        have.sort_unstable();
        if want != have {
            return Err(CniError::new(
                Code::CheckFailed,
                "addresses differ",
                format!("podnet IPAM allocated {want:?}, the runtime has {have:?}"),
            ));
        }
    }
    Ok(())
}

/// `result` with the routes the agent added in the pod (ENI mode's default
/// route via its link-local gateway) appended, each once.
fn with_routes(mut result: Value, added: &Value) -> Value {
    let Some(added) = added.as_array().filter(|a| !a.is_empty()) else {
        return result;
    };
    if !result["routes"].is_array() {
        result["routes"] = json!([]);
    }
    if let Some(routes) = result["routes"].as_array_mut() {
        for r in added {
            if !routes.contains(r) {
                routes.push(r.clone());
            }
        }
    }
    result
}

/// The IPAM result: one address per family with its gateway, and a default
/// route per family through that gateway, except through a link-local IPv4
/// gateway (ENI mode): the main plugin's IPAM helper adds result routes
/// before anything makes that gateway reachable, so the agent adds that one
/// in the pod when the chained podnet-cni registers it.
pub fn ipam_result(cni_version: &str, a: &Allocation) -> Value {
    let legacy = cni_version.starts_with("0.");
    let ips: Vec<Value> = a
        .ips
        .iter()
        .map(|x| {
            let mut ip = json!({
                "address": format!("{}/{}", x.ip, x.prefix.prefix_len()),
            });
            if let Some(gw) = x.gateway {
                ip["gateway"] = json!(gw);
            }
            if legacy {
                ip["version"] = json!(if x.ip.is_ipv4() { "4" } else { "6" });
            }
            ip
        })
        .collect();
    let routes: Vec<Value> = a
        .ips
        .iter()
        .filter_map(|x| {
            let gw = x.gateway?;
            if matches!(gw, IpAddr::V4(v4) if v4.is_link_local()) {
                return None;
            }
            let dst = if x.ip.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            Some(json!({"dst": dst, "gw": gw}))
        })
        .collect();
    json!({
        "cniVersion": cni_version,
        "ips": ips,
        "routes": routes,
    })
}

/// Decodes what a `VERSION` call sends (only `cniVersion` matters).
pub fn version_request(stdin: &[u8]) -> Result<String, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Ok(spec::SPEC_VERSION.to_owned());
    }
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            Code::Decode,
            "failed to decode network configuration",
            e.to_string(),
        )
    })?;
    Ok(v.get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or(spec::SPEC_VERSION)
        .to_owned())
}
