//! The first links of the standard credential chain: the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), then
//! the instance profile from the metadata service.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::{imds::Imds, sigv4::Credentials, CloudError};

/// How long instance-profile credentials are reused before they are read
/// again (they are rotated hours before they expire).
const PROFILE_REFRESH: Duration = Duration::from_mins(10);

/// Finds credentials, caching instance-profile ones.
#[derive(Debug)]
pub struct CredentialChain {
    imds: Arc<Imds>,
    cached: Mutex<Option<(Credentials, Instant)>>,
}

impl CredentialChain {
    /// A chain that falls back to `imds`.
    pub fn new(imds: Arc<Imds>) -> Self {
        Self {
            imds,
            cached: Mutex::new(None),
        }
    }

    /// Credentials from the environment, else the instance profile.
    pub fn get(&self) -> Result<Credentials, CloudError> {
        if let Some(c) = from_env(|k| std::env::var(k).ok()) {
            return Ok(c);
        }
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((c, at)) = cached.as_ref() {
            if at.elapsed() < PROFILE_REFRESH {
                return Ok(c.clone());
            }
        }
        let role = self
            .imds
            .get_optional("iam/security-credentials/")
            .map_err(|e| CloudError::NoCredentials(e.to_string()))?
            .and_then(|r| r.lines().next().map(str::to_owned))
            .ok_or_else(|| CloudError::NoCredentials("no instance profile".into()))?;
        let doc = self
            .imds
            .get(&format!("iam/security-credentials/{role}"))
            .map_err(|e| CloudError::NoCredentials(e.to_string()))?;
        let c = from_profile_json(&doc).map_err(CloudError::NoCredentials)?;
        *cached = Some((c.clone(), Instant::now()));
        Ok(c)
    }
}

/// Credentials from environment variables read through `var`.
pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Option<Credentials> {
    let access_key_id = var("AWS_ACCESS_KEY_ID").filter(|v| !v.is_empty())?;
    let secret_access_key = var("AWS_SECRET_ACCESS_KEY").filter(|v| !v.is_empty())?;
    Some(Credentials {
        access_key_id,
        secret_access_key,
        session_token: var("AWS_SESSION_TOKEN").filter(|v| !v.is_empty()),
    })
}

/// Credentials from the metadata service's JSON document.
pub fn from_profile_json(doc: &str) -> Result<Credentials, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Doc {
        access_key_id: String,
        secret_access_key: String,
        token: Option<String>,
    }
    let d: Doc = serde_json::from_str(doc).map_err(|e| format!("instance profile: {e}"))?;
    Ok(Credentials {
        access_key_id: d.access_key_id,
        secret_access_key: d.secret_access_key,
        session_token: d.token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_then_profile_document() {
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AK".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("SK".to_owned()),
            _ => None,
        };
        let c = from_env(env).unwrap();
        assert_eq!((c.access_key_id.as_str(), c.session_token), ("AK", None));
        assert!(from_env(|_| None).is_none());
        let c = from_profile_json(
            r#"{"Code":"Success","AccessKeyId":"ASIA1","SecretAccessKey":"s","Token":"t","Expiration":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(c.session_token.as_deref(), Some("t"));
        assert!(from_profile_json("{}").is_err());
    }
}
