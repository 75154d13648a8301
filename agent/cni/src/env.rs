//! The `CNI_*` environment of a plugin call, validated before anything is
//! allocated.

use std::{collections::HashMap, path::Path};

use crate::spec::{CniError, Code};

/// A CNI command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Set up an attachment.
    Add,
    /// Tear it down.
    Del,
    /// Verify it.
    Check,
    /// Report supported versions.
    Version,
    /// Release everything not listed as valid.
    Gc,
    /// Whether ADD can be served.
    Status,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            _ => return None,
        })
    }

    /// The name on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Gc => "GC",
            Self::Status => "STATUS",
        }
    }
}

/// The pod identity from `CNI_ARGS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodArgs {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`.
    pub uid: String,
}

/// A validated environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniEnv {
    /// The command.
    pub command: Command,
    /// `CNI_CONTAINERID` (not required for VERSION, GC and STATUS).
    pub container_id: String,
    /// `CNI_NETNS` (required for ADD and CHECK).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub if_name: String,
    /// Pod identity.
    pub pod: PodArgs,
}

fn invalid(details: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidEnv, "invalid CNI environment", details)
}

/// Checks a container id (see [`podnet_api::endpoint::validate_container_id`]).
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    podnet_api::endpoint::validate_container_id(id).map_err(invalid)
}

/// Checks an interface name (see [`podnet_api::endpoint::validate_if_name`]).
pub fn validate_if_name(name: &str) -> Result<(), CniError> {
    podnet_api::endpoint::validate_if_name(name).map_err(invalid)
}

/// Checks `CNI_NETNS`: an absolute path to an existing network namespace
/// file (a relative path or any other file is refused, so a path trick cannot
/// point the plugin at something else).
pub fn validate_netns(netns: &str) -> Result<(), CniError> {
    let path = Path::new(netns);
    if !path.is_absolute() {
        return Err(invalid(format!(
            "CNI_NETNS {netns:?} must be an absolute path"
        )));
    }
    if !path.exists() {
        return Err(invalid(format!("CNI_NETNS {netns:?} does not exist")));
    }
    if podnet_api::sys::filesystem_magic(path) != Some(podnet_api::sys::NSFS_MAGIC) {
        return Err(invalid(format!(
            "CNI_NETNS {netns:?} is not a network namespace file"
        )));
    }
    Ok(())
}

/// Parses `CNI_ARGS` (`K=V;K=V`).
pub fn parse_args(args: &str) -> Result<PodArgs, CniError> {
    let mut pod = PodArgs::default();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| invalid(format!("CNI_ARGS entry {pair:?} is not KEY=VALUE")))?;
        match k {
            "K8S_POD_NAMESPACE" => v.clone_into(&mut pod.namespace),
            "K8S_POD_NAME" => v.clone_into(&mut pod.name),
            "K8S_POD_UID" => v.clone_into(&mut pod.uid),
            _ => {}
        }
    }
    Ok(pod)
}

/// Reads and validates the environment from `vars`.
pub fn from_vars<S: std::hash::BuildHasher>(
    vars: &HashMap<String, String, S>,
) -> Result<CniEnv, CniError> {
    let get = |k: &str| vars.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let command_name = get("CNI_COMMAND").ok_or_else(|| invalid("CNI_COMMAND is not set"))?;
    let command = Command::parse(command_name).ok_or_else(|| {
        invalid(format!(
            "CNI_COMMAND {command_name:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"
        ))
    })?;
    let mut env = CniEnv {
        command,
        container_id: String::new(),
        netns: String::new(),
        if_name: String::new(),
        pod: PodArgs::default(),
    };
    if matches!(command, Command::Version | Command::Gc | Command::Status) {
        return Ok(env);
    }
    get("CNI_CONTAINERID")
        .ok_or_else(|| invalid(format!("CNI_CONTAINERID is required for {command_name}")))?
        .clone_into(&mut env.container_id);
    validate_container_id(&env.container_id)?;
    get("CNI_IFNAME")
        .ok_or_else(|| invalid(format!("CNI_IFNAME is required for {command_name}")))?
        .clone_into(&mut env.if_name);
    validate_if_name(&env.if_name)?;
    env.pod = parse_args(get("CNI_ARGS").unwrap_or(""))?;
    match get("CNI_NETNS") {
        Some(netns) => {
            // DEL must succeed when the namespace is already gone.
            if command != Command::Del {
                validate_netns(netns)?;
            }
            netns.clone_into(&mut env.netns);
        }
        None if command == Command::Del => {}
        None => return Err(invalid(format!("CNI_NETNS is required for {command_name}"))),
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn validates() {
        let ok = vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1.2_3"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=u1",
            ),
        ]);
        let env = from_vars(&ok).unwrap();
        assert_eq!(env.pod.namespace, "shop");
        assert_eq!(env.pod.name, "cart-1");
        assert_eq!(env.pod.uid, "u1");
        for (k, v) in [
            ("CNI_CONTAINERID", "-abc"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", ".."),
            ("CNI_IFNAME", "eth 0"),
            ("CNI_IFNAME", "a23456789012345x"),
            ("CNI_NETNS", "/nonexistent/ns"),
            ("CNI_NETNS", "../../proc/self/ns/net"),
            ("CNI_NETNS", "/proc/self/status"),
            ("CNI_NETNS", "/proc/self/ns/../status"),
            ("CNI_NETNS", "/proc/self"),
            ("CNI_COMMAND", "FOO"),
            ("CNI_ARGS", "novalue"),
        ] {
            let mut bad = ok.clone();
            bad.insert(k.into(), v.into());
            assert_eq!(from_vars(&bad).unwrap_err().code, 4, "{k}={v}");
        }
        let long = "a".repeat(256);
        assert!(validate_container_id(&long).is_err());
        assert!(validate_container_id(&"a".repeat(255)).is_ok());
        for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_COMMAND"] {
            let mut bad = ok.clone();
            bad.remove(missing);
            let e = from_vars(&bad).unwrap_err();
            assert_eq!(e.code, 4);
            assert!(e.details.contains(missing), "{}", e.details);
        }
        let mut del = ok.clone();
        del.insert("CNI_COMMAND".into(), "DEL".into());
        del.remove("CNI_NETNS");
        assert!(from_vars(&del).is_ok(), "DEL works without a namespace");
    }
}
