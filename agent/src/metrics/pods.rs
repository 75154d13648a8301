//! Which per-pod series keep the pod: by default a pod's counts are kept per
//! workload (`namespace`, `workload_kind`, `workload`), so a rollout does not
//! make new series; the namespaces listed in `--pod-metrics-namespaces` (`*`
//! for all) keep `namespace` and `pod` instead. The encoder applies it to
//! every family ([`super::text::PodLabels`]).

use std::collections::BTreeSet;

use crate::endpoint::{PodRef, Registry};

use super::text::PodLabels;

/// The namespaces whose series keep the `pod` label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PodLevel {
    /// None: every pod's series are kept per workload.
    #[default]
    None,
    /// These namespaces.
    Namespaces(BTreeSet<String>),
    /// Every namespace (`*`).
    All,
}

impl PodLevel {
    /// From the list of `--pod-metrics-namespaces`: `*` anywhere means all;
    /// empty entries are ignored.
    pub fn from_list(list: &[String]) -> Self {
        if list.iter().any(|n| n.trim() == "*") {
            return Self::All;
        }
        let names: BTreeSet<String> = list
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            Self::None
        } else {
            Self::Namespaces(names)
        }
    }

    /// Whether the series of pods in `namespace` keep the pod.
    pub fn keeps_pod(&self, namespace: &str) -> bool {
        match self {
            Self::None => false,
            Self::All => true,
            Self::Namespaces(names) => names.contains(namespace),
        }
    }
}

/// [`PodLabels`] from a [`PodLevel`] and the workloads the endpoint registry
/// knows (host traffic keeps empty labels, in either form).
#[derive(Debug)]
pub struct RegistryPodLabels {
    level: PodLevel,
    registry: Registry,
}

impl RegistryPodLabels {
    /// Labels per `level`, workloads from `registry`.
    pub fn new(level: PodLevel, registry: Registry) -> Self {
        Self { level, registry }
    }
}

impl PodLabels for RegistryPodLabels {
    fn workload(&self, namespace: &str, pod: &str) -> Option<(String, String)> {
        if self.level.keeps_pod(namespace) {
            return None;
        }
        let workload = self.registry.workload_of(&PodRef::new(namespace, pod));
        Some((workload.kind, workload.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_of_namespaces() {
        let list = |items: &[&str]| {
            PodLevel::from_list(&items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        };
        assert_eq!(list(&[]), PodLevel::None);
        assert_eq!(list(&[""]), PodLevel::None);
        assert_eq!(list(&["shop", "*"]), PodLevel::All);
        let some = list(&["shop", " debug "]);
        assert!(some.keeps_pod("shop") && some.keeps_pod("debug"));
        assert!(!some.keeps_pod("kube-system") && !some.keeps_pod(""));
        assert!(PodLevel::All.keeps_pod(""));
    }

    #[test]
    fn unknown_pods_are_their_own_workload_and_host_traffic_stays_empty() {
        let labels = RegistryPodLabels::new(
            PodLevel::Namespaces(["debug".to_owned()].into()),
            Registry::new(),
        );
        assert_eq!(labels.workload("debug", "tool"), None);
        assert_eq!(
            labels.workload("shop", "cart-1"),
            Some(("Pod".to_owned(), "cart-1".to_owned()))
        );
        assert_eq!(
            labels.workload("", ""),
            Some((String::new(), String::new()))
        );
    }
}
