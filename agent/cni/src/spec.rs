//! The CNI wire format: network configuration on stdin, results and errors on
//! stdout. <https://github.com/containernetworking/cni/blob/main/SPEC.md>

use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The spec version this plugin implements.
pub const SPEC_VERSION: &str = "1.1.0";
/// Configuration versions accepted.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
/// The plugin's type name in configurations.
pub const PLUGIN_TYPE: &str = "podnet-cni";
/// Default agent socket.
pub const DEFAULT_SOCKET: &str = "/run/podnet/agent.sock";
/// Default log file.
pub const DEFAULT_LOG_FILE: &str = "/var/log/podnet/cni.log";
/// Size at which the log file is renamed to `<log file>.1` (replacing the
/// previous one) before the next line: the log keeps at most two files of
/// about this size.
pub const MAX_LOG_BYTES: u64 = 5 * 1024 * 1024;
/// Default timeout of one agent call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest stdin accepted.
pub const MAX_STDIN_BYTES: usize = 1024 * 1024;

/// CNI error codes: the spec's, then podnet's own from 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    /// Incompatible CNI version.
    IncompatibleVersion = 1,
    /// Unsupported field in network configuration.
    UnsupportedField = 2,
    /// Container unknown or does not exist.
    UnknownContainer = 3,
    /// Invalid necessary environment variables.
    InvalidEnv = 4,
    /// I/O failure.
    Io = 5,
    /// Failed to decode content.
    Decode = 6,
    /// Invalid network config.
    InvalidConfig = 7,
    /// Try again later.
    TryAgainLater = 11,
    /// The plugin cannot service ADD requests.
    NotAvailable = 50,
    /// The plugin cannot service ADD requests, and existing containers may
    /// have limited connectivity.
    NotAvailableDegraded = 51,
    /// podnet: the agent cannot be reached (not running, wrong socket, timeout).
    AgentUnreachable = 100,
    /// podnet: no free address in the node's pools.
    IpamExhausted = 101,
    /// podnet: the agent refused or failed the request.
    AgentFailed = 102,
    /// podnet: CHECK found the attachment differs from what was set up.
    CheckFailed = 103,
    /// podnet: an address of the attachment is registered to another pod.
    AddressConflict = 104,
}

/// A CNI error, printed as JSON on stdout.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    /// The code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    pub details: String,
}

impl CniError {
    /// An error with `code`.
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code: code as u32,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON printed on stdout for `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

/// podnet's keys, in the plugin entry (chained role) or the `ipam` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodnetKeys {
    /// Agent socket.
    pub socket: String,
    /// Log file.
    pub log_file: String,
    /// Timeout of one agent call.
    pub timeout: Duration,
}

impl Default for PodnetKeys {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            log_file: DEFAULT_LOG_FILE.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Which of its two jobs the plugin does for this configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A plugin entry of a chain after the interface plugin.
    Chained,
    /// The `ipam` plugin of ptp, bridge or another interface plugin.
    Ipam,
}

/// A decoded network configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: String,
    /// `name`.
    pub name: String,
    /// The plugin's role.
    pub role: Role,
    /// podnet's keys from the role's section.
    pub keys: PodnetKeys,
    /// `prevResult`, when present.
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidAttachment {
    /// Container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// The CNI specification's network names: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`
/// (the name keys allocations and state; no separators, control characters
/// or NUL).
fn is_network_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn bad_config(details: impl Into<String>) -> CniError {
    CniError::new(
        Code::InvalidConfig,
        "invalid network configuration",
        details,
    )
}

fn string_key(
    section: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<String>, CniError> {
    match section.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && !s.contains('\0') => Ok(Some(s.clone())),
        Some(other) => Err(bad_config(format!(
            "{key:?} must be a non-empty string, got {other}"
        ))),
    }
}

fn keys(section: &serde_json::Map<String, Value>) -> Result<PodnetKeys, CniError> {
    let mut keys = PodnetKeys::default();
    if let Some(s) = string_key(section, "socket")? {
        keys.socket = s;
    }
    if let Some(s) = string_key(section, "logFile")? {
        keys.log_file = s;
    }
    if let Some(s) = string_key(section, "timeout")? {
        keys.timeout = podnet_api::duration::parse(&s).ok_or_else(|| {
            bad_config(format!(
                "\"timeout\" {s:?} is not a duration like \"2s\" or \"500ms\" (between 1ms and 60s)"
            ))
        })?;
    }
    Ok(keys)
}

/// Decodes stdin into a [`NetConf`].
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.len() > MAX_STDIN_BYTES {
        return Err(CniError::new(
            Code::Decode,
            "failed to decode network configuration",
            format!("stdin is larger than {MAX_STDIN_BYTES} bytes"),
        ));
    }
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            Code::Decode,
            "failed to decode network configuration",
            format!("stdin is not JSON: {e}"),
        )
    })?;
    let Value::Object(top) = value else {
        return Err(CniError::new(
            Code::Decode,
            "failed to decode network configuration",
            "stdin is not a JSON object",
        ));
    };
    let cni_version = match top.get("cniVersion") {
        Some(Value::String(v)) => v.clone(),
        None => return Err(bad_config("\"cniVersion\" is missing")),
        Some(other) => {
            return Err(bad_config(format!(
                "\"cniVersion\" must be a string, got {other}"
            )))
        }
    };
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "incompatible CNI version",
            format!(
                "cniVersion {cni_version:?} is not supported; podnet-cni supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let name = string_key(&top, "name")?.unwrap_or_default();
    if !name.is_empty() && !is_network_name(&name) {
        return Err(bad_config(format!(
            "network name {name:?} must match [A-Za-z0-9][A-Za-z0-9_.-]*"
        )));
    }
    let plugin_type = string_key(&top, "type")?;
    let ipam = match top.get("ipam") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(other) => {
            return Err(bad_config(format!(
                "\"ipam\" must be an object, got {other}"
            )))
        }
    };
    let ipam_is_ours =
        ipam.is_some_and(|m| m.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE));
    let (role, section) = if plugin_type.as_deref() == Some(PLUGIN_TYPE) {
        (Role::Chained, &top)
    } else if let (true, Some(ipam)) = (ipam_is_ours, ipam) {
        (Role::Ipam, ipam)
    } else {
        return Err(bad_config(format!(
            "neither \"type\" nor \"ipam.type\" is {PLUGIN_TYPE:?} (type is {plugin_type:?})"
        )));
    };
    let keys = keys(section)?;
    let prev_result = match top.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(other) => {
            return Err(bad_config(format!(
                "\"prevResult\" must be an object, got {other}"
            )))
        }
    };
    let valid_attachments = match top.get("cni.dev/valid-attachments") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<Vec<ValidAttachment>>(v.clone())
                .map_err(|e| bad_config(format!("\"cni.dev/valid-attachments\": {e}")))?,
        ),
    };
    Ok(NetConf {
        cni_version,
        name,
        role,
        keys,
        prev_result,
        valid_attachments,
    })
}

/// An interface of a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Name.
    pub name: String,
    /// MAC address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// Network namespace path when inside a sandbox; empty on the host.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

/// An address of a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `address/prefix` (the address with its subnet's length).
    pub address: String,
    /// The gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

impl IpConfig {
    /// The address without its length.
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.split('/').next()?.parse().ok()
    }
}

/// A route of a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination.
    pub dst: String,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// The parts of a result podnet reads or writes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// Version.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// Interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS (kept as given).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub dns: Value,
}

/// Decodes a `prevResult`.
pub fn parse_prev_result(value: &Value) -> Result<CniResult, CniError> {
    serde_json::from_value(value.clone())
        .map_err(|e| CniError::new(Code::Decode, "failed to decode prevResult", e.to_string()))
}

/// What the chained role learns from a `prevResult`: the host-side
/// interface and the pod's addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Host-side interface, if the result names one.
    pub host_interface: Option<String>,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
}

/// Finds the host-side interface and the pod's addresses in `result`.
///
/// The host side is an interface without `sandbox`. ptp lists exactly one
/// (its host veth). bridge lists the bridge first, then the host veth, then
/// the container interface: the veth is the sandbox-less interface that is
/// not the bridge, i.e. not the one the addresses' gateway sits on, so the
/// last sandbox-less interface is chosen. Addresses are those whose
/// `interface` points into the sandbox (or that have no index).
pub fn attachment(result: &CniResult, if_name: &str) -> Attachment {
    let host_interface = result
        .interfaces
        .iter()
        .rev()
        .find(|i| i.sandbox.is_empty() && !i.name.is_empty())
        .map(|i| i.name.clone());
    let in_sandbox = |idx: Option<usize>| match idx.and_then(|i| result.interfaces.get(i)) {
        Some(i) => !i.sandbox.is_empty() || i.name == if_name,
        None => true,
    };
    let ips = result
        .ips
        .iter()
        .filter(|ip| in_sandbox(ip.interface))
        .filter_map(IpConfig::ip)
        .collect();
    Attachment {
        host_interface,
        ips,
    }
}

/// The `VERSION` answer.
pub fn version_json(cni_version: &str) -> String {
    serde_json::json!({
        "cniVersion": cni_version,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}
