//! The `--endpoints` YAML file: parsed, validated, and re-read on change.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use super::{Endpoint, Registry, Source};

/// How often the endpoints file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Errors reading the endpoints file.
#[derive(Debug, thiserror::Error)]
pub enum EndpointsFileError {
    /// The file could not be read.
    #[error("reading endpoints file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid endpoint list.
    #[error("endpoints file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the YAML location where known.
        message: String,
    },
}

/// Parses an endpoint list. Empty namespace or pod names and entries without
/// addresses are rejected with the entry's index.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Endpoint>, EndpointsFileError> {
    let parse_err = |message: String| EndpointsFileError::Parse {
        path: path.to_owned(),
        message,
    };
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let endpoints: Vec<Endpoint> =
        serde_norway::from_str(text).map_err(|e| parse_err(e.to_string()))?;
    for (i, ep) in endpoints.iter().enumerate() {
        if ep.namespace.is_empty() || ep.pod.is_empty() {
            return Err(parse_err(format!(
                "entry {i}: `namespace` and `pod` must not be empty"
            )));
        }
        if ep.ips.is_empty() {
            return Err(parse_err(format!(
                "entry {i} ({}/{}): `ips` is empty",
                ep.namespace, ep.pod
            )));
        }
    }
    Ok(endpoints)
}

/// Reads and parses the file.
pub fn load(path: &Path) -> Result<Vec<Endpoint>, EndpointsFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| EndpointsFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Loads the file into the registry, then re-reads it whenever its
/// modification time or size changes. A broken edit is logged and the last
/// good content stays in place.
pub async fn watch(path: PathBuf, registry: Registry) {
    let mut last = stamp(&path);
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match load(&path) {
            Ok(endpoints) => {
                tracing::info!(path = %path.display(), count = endpoints.len(), "endpoints file reloaded");
                registry.replace_source(Source::File, endpoints);
            }
            Err(e) => tracing::warn!(error = %e, "keeping previous endpoints"),
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_format() {
        let text = "- namespace: shop\n  pod: cart-1\n  ips: [10.244.1.2]\n  interface: vpod1\n";
        let eps = parse(Path::new("e.yaml"), text).unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].interface.as_deref(), Some("vpod1"));
        assert_eq!(
            eps[0].ips,
            vec!["10.244.1.2".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let err = parse(
            Path::new("e.yaml"),
            "- namespace: shop\n  pod: x\n  ips: [not-an-ip]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("endpoints file e.yaml: "), "{err}");
        assert!(err.contains("invalid IP address syntax"), "{err}");
        let err = parse(
            Path::new("e.yaml"),
            "- namespace: shop\n  pod: x\n  ips: []\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "endpoints file e.yaml: entry 0 (shop/x): `ips` is empty"
        );
        let err = parse(
            Path::new("e.yaml"),
            "- namespace: a\n  pod: b\n  ips: [10.0.0.1]\n  colour: red\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
    }
}
