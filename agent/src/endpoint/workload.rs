//! The workload a pod belongs to, read from its labels as the Kubernetes
//! controllers set them (the container runtime knows a pod's labels, not its
//! owner references), so metrics can be kept per workload.
//!
//! | labels | kind | name |
//! |---|---|---|
//! | `batch.kubernetes.io/job-name` or `job-name` | `Job`, or `CronJob` when the job's name is `<cronjob>-<scheduled minute>` | the job, or the cronjob |
//! | `statefulset.kubernetes.io/pod-name` and `controller-revision-hash` | `StatefulSet` | the pod's name without `-<ordinal>` |
//! | `pod-template-generation` and `controller-revision-hash` | `DaemonSet` | the pod's name without its generated suffix |
//! | `pod-template-hash` | `Deployment` | the ReplicaSet's name (the pod's without its suffix) without `-<hash>` |
//! | none of these | `Pod` | the pod |
//!
//! Controllers name pods `<generateName><5 random characters>` (`SimpleNameGenerator`
//! in k8s.io/apiserver `pkg/storage/names`, v0.34), the base cut to 58 characters;
//! the CronJob controller names a job `<cronjob>-<scheduled time in Unix minutes>`
//! (`getJobName` in `pkg/controller/cronjob/utils.go`, Kubernetes v1.34).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Kind of a [`Workload`] that owns pods.
pub const KIND_DEPLOYMENT: &str = "Deployment";
/// Kind of a StatefulSet.
pub const KIND_STATEFULSET: &str = "StatefulSet";
/// Kind of a DaemonSet.
pub const KIND_DAEMONSET: &str = "DaemonSet";
/// Kind of a Job.
pub const KIND_JOB: &str = "Job";
/// Kind of a CronJob.
pub const KIND_CRONJOB: &str = "CronJob";
/// Kind of a pod that no controller's labels name: the pod is its own workload.
pub const KIND_POD: &str = "Pod";

/// The random suffix `SimpleNameGenerator` appends to a `generateName`.
const GENERATED_SUFFIX: usize = 5;
/// The longest base `SimpleNameGenerator` keeps (63 - 5).
const MAX_GENERATED_BASE: usize = 58;
/// Digits of a CronJob's scheduled minute: 8 from 1973 until the year 2160.
const MIN_CRONJOB_DIGITS: usize = 8;

/// A workload: what metrics are kept per by default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Workload {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob` or `Pod`;
    /// empty for host traffic.
    pub kind: String,
    /// The workload's name; empty for host traffic.
    pub name: String,
}

impl Workload {
    /// A pod that is its own workload (no controller labels, or labels not
    /// known yet).
    pub fn pod(name: &str) -> Self {
        Self::new(KIND_POD, name)
    }

    fn new(kind: &str, name: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The workload of pod `pod` with `labels` (see the module's table).
    pub fn of(pod: &str, labels: &BTreeMap<String, String>) -> Self {
        let label = |key: &str| labels.get(key).map(String::as_str);
        if let Some(job) = label("batch.kubernetes.io/job-name").or_else(|| label("job-name")) {
            return match cronjob_of(job) {
                Some(cronjob) => Self::new(KIND_CRONJOB, cronjob),
                None => Self::new(KIND_JOB, job),
            };
        }
        let revision = label("controller-revision-hash").is_some();
        if revision && label("statefulset.kubernetes.io/pod-name").is_some() {
            if let Some((set, ordinal)) = pod.rsplit_once('-') {
                if !set.is_empty()
                    && !ordinal.is_empty()
                    && ordinal.bytes().all(|b| b.is_ascii_digit())
                {
                    return Self::new(KIND_STATEFULSET, set);
                }
            }
        }
        if revision && label("pod-template-generation").is_some() {
            if let Some(set) = generate_name_base(pod) {
                return Self::new(KIND_DAEMONSET, set);
            }
        }
        if let Some(hash) = label("pod-template-hash").filter(|h| !h.is_empty()) {
            if let Some(deployment) = generate_name_base(pod).and_then(|rs| strip_hash(rs, hash)) {
                return Self::new(KIND_DEPLOYMENT, deployment);
            }
        }
        Self::pod(pod)
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// The `generateName` a controller gave (its trailing `-` removed): the pod's
/// name without the 5 generated characters; `None` if the name is too short.
fn generate_name_base(pod: &str) -> Option<&str> {
    let cut = pod.len().checked_sub(GENERATED_SUFFIX)?;
    let base = pod.get(..cut)?;
    let base = base.strip_suffix('-').unwrap_or(base);
    (!base.is_empty()).then_some(base)
}

/// The Deployment's name from its ReplicaSet's `<deployment>-<hash>`, as far
/// as the pod's name kept it: when the base was cut at 58 characters, the
/// hash may be cut too (then any prefix of `-<hash>` at the end is removed),
/// or cut right after its dash (then the base is the Deployment's name), or
/// the Deployment's own name was cut (then the base is what is left of it).
fn strip_hash<'a>(replica_set: &'a str, hash: &str) -> Option<&'a str> {
    let suffix = format!("-{hash}");
    if let Some(deployment) = replica_set.strip_suffix(&suffix) {
        return (!deployment.is_empty()).then_some(deployment);
    }
    match replica_set.len() {
        // Not cut: a name without `-<hash>` is not a Deployment's pod.
        n if n + 1 < MAX_GENERATED_BASE => None,
        n if n + 1 == MAX_GENERATED_BASE => Some(replica_set),
        _ => Some(
            (2..suffix.len())
                .rev()
                .find_map(|n| suffix.get(..n).and_then(|p| replica_set.strip_suffix(p)))
                .filter(|d| !d.is_empty())
                .unwrap_or(replica_set),
        ),
    }
}

/// `<cronjob>` of a job named `<cronjob>-<scheduled minute>`.
fn cronjob_of(job: &str) -> Option<&str> {
    let (cronjob, minute) = job.rsplit_once('-')?;
    (!cronjob.is_empty()
        && minute.len() >= MIN_CRONJOB_DIGITS
        && minute.bytes().all(|b| b.is_ascii_digit()))
    .then_some(cronjob)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn of(pod: &str, pairs: &[(&str, &str)]) -> (String, String) {
        let w = Workload::of(pod, &labels(pairs));
        (w.kind, w.name)
    }

    fn w(kind: &str, name: &str) -> (String, String) {
        (kind.to_owned(), name.to_owned())
    }

    #[test]
    fn deployment_pods_name_the_replica_set_without_its_hash() {
        assert_eq!(
            of(
                "cart-7d9f8b6c5d-x2k9p",
                &[("app", "cart"), ("pod-template-hash", "7d9f8b6c5d")]
            ),
            w(KIND_DEPLOYMENT, "cart")
        );
        // Dashes in the Deployment's own name stay.
        assert_eq!(
            of(
                "shop-front-end-5f4d8c7b9-abcde",
                &[("pod-template-hash", "5f4d8c7b9")]
            ),
            w(KIND_DEPLOYMENT, "shop-front-end")
        );
        // A hash that the name does not carry: not a Deployment's pod.
        assert_eq!(
            of("cart-abcde", &[("pod-template-hash", "7d9f8b6c5d")]),
            w(KIND_POD, "cart-abcde")
        );
    }

    #[test]
    fn a_long_deployment_name_cut_with_its_hash_is_still_found() {
        // Deployment of 52 characters: `<d>-<hash 10>` is 63, cut to 58, then 5 random.
        let deployment = "a".repeat(52);
        let replica_set = format!("{deployment}-7d9f8b6c5d");
        let pod = format!("{}x2k9p", &replica_set[..58]);
        assert_eq!(
            of(&pod, &[("pod-template-hash", "7d9f8b6c5d")]),
            w(KIND_DEPLOYMENT, &deployment)
        );
    }

    #[test]
    fn statefulset_pods_name_the_set_without_their_ordinal() {
        let set = [
            ("controller-revision-hash", "db-6b8c9d7f4"),
            ("statefulset.kubernetes.io/pod-name", "db-12"),
            ("apps.kubernetes.io/pod-index", "12"),
        ];
        assert_eq!(of("db-12", &set), w(KIND_STATEFULSET, "db"));
        assert_eq!(of("pg-main-0", &set[..2]), w(KIND_STATEFULSET, "pg-main"));
        // Without the revision label a pod-name label alone is not enough.
        assert_eq!(of("db-0", &set[1..]), w(KIND_POD, "db-0"));
    }

    #[test]
    fn daemonset_pods_name_the_set_without_their_suffix() {
        assert_eq!(
            of(
                "podnet-agent-7xk2p",
                &[
                    ("controller-revision-hash", "5c6d7f8b9"),
                    ("pod-template-generation", "3"),
                    ("app", "podnet"),
                ]
            ),
            w(KIND_DAEMONSET, "podnet-agent")
        );
        // The generation without the revision hash: no DaemonSet.
        assert_eq!(
            of("x-7xk2p", &[("pod-template-generation", "3")]),
            w(KIND_POD, "x-7xk2p")
        );
    }

    #[test]
    fn job_and_cronjob_pods() {
        assert_eq!(
            of(
                "migrate-abcde",
                &[
                    ("batch.kubernetes.io/job-name", "migrate"),
                    ("job-name", "migrate")
                ]
            ),
            w(KIND_JOB, "migrate")
        );
        // Older clusters set only `job-name`.
        assert_eq!(
            of("migrate-abcde", &[("job-name", "migrate")]),
            w(KIND_JOB, "migrate")
        );
        assert_eq!(
            of(
                "backup-29401234-q7x2m",
                &[("batch.kubernetes.io/job-name", "backup-29401234")]
            ),
            w(KIND_CRONJOB, "backup")
        );
        // A hand-made job with a short number is a Job, not a CronJob's.
        assert_eq!(
            of("run-7-abcde", &[("job-name", "run-7")]),
            w(KIND_JOB, "run-7")
        );
    }

    #[test]
    fn pods_without_controller_labels_are_their_own_workload() {
        assert_eq!(of("debug", &[("app", "x")]), w(KIND_POD, "debug"));
        assert_eq!(of("", &[]), w(KIND_POD, ""));
        assert_eq!(of("abc", &[("pod-template-hash", "h")]), w(KIND_POD, "abc"));
        assert_eq!(
            of(
                "-1",
                &[
                    ("controller-revision-hash", "h"),
                    ("statefulset.kubernetes.io/pod-name", "x")
                ]
            ),
            w(KIND_POD, "-1")
        );
    }

    #[test]
    fn odd_names_never_panic() {
        for pod in ["", "-", "é-ééééé", "a-ééé", "ééééé", "-----", "x-12345678-"] {
            for set in [
                &[("pod-template-hash", "é")][..],
                &[
                    ("controller-revision-hash", "h"),
                    ("pod-template-generation", "1"),
                ],
                &[("job-name", "é-12345678")],
            ] {
                let _ = Workload::of(pod, &labels(set));
            }
        }
    }
}
