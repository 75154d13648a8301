//! The credential chain, in the order of AWS's SDKs, as EKS gives
//! credentials to a node agent:
//! 1. static keys in the environment (`AWS_ACCESS_KEY_ID`,
//!    `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`);
//! 2. IRSA: a web-identity token file and a role (`AWS_WEB_IDENTITY_TOKEN_FILE`,
//!    `AWS_ROLE_ARN`, `AWS_ROLE_SESSION_NAME`) exchanged through STS
//!    `AssumeRoleWithWebIdentity` (the token file is read again each time:
//!    kubelet rotates it);
//! 3. EKS Pod Identity and other container credential endpoints
//!    (`AWS_CONTAINER_CREDENTIALS_FULL_URI` or `..._RELATIVE_URI`, with the
//!    token of `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` or
//!    `AWS_CONTAINER_AUTHORIZATION_TOKEN`);
//! 4. the instance profile from the metadata service.
//!
//! Temporary credentials are reused until [`REFRESH_BEFORE`] their expiry;
//! when a refresh fails, credentials that have not expired yet are kept.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::{http::Client, imds::Imds, partition, sigv4::Credentials, xml, ApiCalls, CloudError};

/// How long instance-profile credentials without an expiry are reused.
const PROFILE_REFRESH: Duration = Duration::from_mins(10);
/// Temporary credentials are renewed this long before they expire.
pub const REFRESH_BEFORE: Duration = Duration::from_mins(5);
/// Host of `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`.
const CONTAINER_HOST: &str = "http://169.254.170.2";
/// STS API version.
const STS_VERSION: &str = "2011-06-15";

/// Where temporary credentials came from (for logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// IRSA: STS `AssumeRoleWithWebIdentity`.
    WebIdentity,
    /// A container credential endpoint (EKS Pod Identity).
    Container,
    /// The instance profile.
    InstanceProfile,
}

/// Credentials with their expiry.
#[derive(Clone, Debug)]
struct Fetched {
    credentials: Credentials,
    /// Seconds since the epoch; `None`: unknown.
    expires_unix_s: Option<u64>,
    /// When they were fetched.
    at: Instant,
    source: Source,
}

impl Fetched {
    /// Whether to fetch again at `now_unix_s`.
    fn stale(&self, now_unix_s: u64) -> bool {
        match self.expires_unix_s {
            Some(e) => now_unix_s.saturating_add(REFRESH_BEFORE.as_secs()) >= e,
            None => self.at.elapsed() >= PROFILE_REFRESH,
        }
    }

    fn expired(&self, now_unix_s: u64) -> bool {
        self.expires_unix_s.is_some_and(|e| now_unix_s >= e)
    }
}

/// Finds credentials, caching temporary ones until shortly before expiry.
pub struct CredentialChain {
    imds: Arc<Imds>,
    http: Client,
    calls: ApiCalls,
    cached: Mutex<Option<Fetched>>,
}

impl std::fmt::Debug for CredentialChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialChain").finish_non_exhaustive()
    }
}

/// A set, non-empty environment variable.
fn var(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

fn no_credentials(message: impl Into<String>) -> CloudError {
    CloudError::NoCredentials(message.into())
}

impl CredentialChain {
    /// A chain reading the process environment, then `imds`; STS calls are
    /// counted in `calls`.
    pub fn new(imds: Arc<Imds>, http: Client, calls: ApiCalls) -> Self {
        Self {
            imds,
            http,
            calls,
            cached: Mutex::new(None),
        }
    }

    /// Credentials for calls in `region`.
    pub fn get(&self, region: &str) -> Result<Credentials, CloudError> {
        if let Some(c) = from_env(var) {
            return Ok(c);
        }
        let now = crate::sys::unix_now_s();
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = cached.as_ref().filter(|f| !f.stale(now)) {
            return Ok(f.credentials.clone());
        }
        match self.fetch(region) {
            Ok(f) => {
                let out = f.credentials.clone();
                *cached = Some(f);
                Ok(out)
            }
            Err(e) => match cached.as_ref().filter(|f| !f.expired(now)) {
                Some(f) => {
                    tracing::warn!(error = %e, source = ?f.source, "renewing AWS credentials failed; the current ones have not expired yet");
                    Ok(f.credentials.clone())
                }
                None => Err(e),
            },
        }
    }

    fn fetch(&self, region: &str) -> Result<Fetched, CloudError> {
        if let (Some(token_file), Some(role)) =
            (var("AWS_WEB_IDENTITY_TOKEN_FILE"), var("AWS_ROLE_ARN"))
        {
            return self.web_identity(region, &token_file, &role);
        }
        let uri = var("AWS_CONTAINER_CREDENTIALS_FULL_URI").or_else(|| {
            var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                .map(|rel| format!("{CONTAINER_HOST}{rel}"))
        });
        if let Some(uri) = uri {
            return self.container(&uri);
        }
        self.instance_profile()
    }

    /// IRSA: the token file's token exchanged for the role's credentials.
    fn web_identity(
        &self,
        region: &str,
        token_file: &str,
        role: &str,
    ) -> Result<Fetched, CloudError> {
        let action = "AssumeRoleWithWebIdentity";
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| no_credentials(format!("web identity token {token_file}: {e}")))?;
        let session = var("AWS_ROLE_SESSION_NAME")
            .unwrap_or_else(|| format!("podnet-{}", crate::sys::unix_now_s()));
        let endpoint =
            var("AWS_ENDPOINT_URL_STS").unwrap_or_else(|| partition::endpoint("sts", region));
        let body = form(&[
            ("Action", action),
            ("Version", STS_VERSION),
            ("RoleArn", role),
            ("RoleSessionName", &session),
            ("WebIdentityToken", token.trim()),
        ]);
        let headers = [(
            "content-type".to_owned(),
            "application/x-www-form-urlencoded; charset=utf-8".to_owned(),
        )];
        let answer = self.http.send(
            "POST",
            &format!("{}/", endpoint.trim_end_matches('/')),
            &headers,
            Some(&body),
        );
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                self.calls.record(action, "unreachable");
                return Err(no_credentials(format!("{action} at {endpoint}: {e}")));
            }
        };
        let root = xml::parse(&answer.body);
        let failed = |message: String| {
            self.calls.record(action, "error");
            no_credentials(format!("{action} for {role}: {message}"))
        };
        if answer.status != 200 {
            let code = root
                .as_ref()
                .ok()
                .and_then(|r| r.text_at("Error/Code").map(str::to_owned))
                .unwrap_or_default();
            return Err(failed(format!("HTTP {} {code}", answer.status)));
        }
        let root = root.map_err(failed)?;
        let field = |name: &str| {
            root.text_at(&format!(
                "AssumeRoleWithWebIdentityResult/Credentials/{name}"
            ))
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("no Credentials/{name} in the answer"))
        };
        let parsed = (|| -> Result<Fetched, String> {
            Ok(Fetched {
                credentials: Credentials {
                    access_key_id: field("AccessKeyId")?,
                    secret_access_key: field("SecretAccessKey")?,
                    session_token: Some(field("SessionToken")?),
                },
                expires_unix_s: Some(parse_utc(&field("Expiration")?)?),
                at: Instant::now(),
                source: Source::WebIdentity,
            })
        })();
        let fetched = parsed.map_err(|m| {
            self.calls.record(action, "bad_answer");
            no_credentials(format!("{action} for {role}: {m}"))
        })?;
        self.calls.record(action, "success");
        tracing::info!(role, expires_unix_s = ?fetched.expires_unix_s, "AWS credentials from the web identity token (IRSA)");
        Ok(fetched)
    }

    /// EKS Pod Identity (and any container credential endpoint).
    fn container(&self, uri: &str) -> Result<Fetched, CloudError> {
        let token = match var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
            Some(file) => Some(
                std::fs::read_to_string(&file)
                    .map_err(|e| {
                        no_credentials(format!("container credentials token {file}: {e}"))
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => var("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
        };
        let headers: Vec<(String, String)> = token
            .map(|t| ("authorization".to_owned(), t))
            .into_iter()
            .collect();
        let answer = self
            .http
            .send("GET", uri, &headers, None)
            .map_err(|e| no_credentials(format!("container credentials at {uri}: {e}")))?;
        if answer.status != 200 {
            return Err(no_credentials(format!(
                "container credentials at {uri}: HTTP {}",
                answer.status
            )));
        }
        let mut fetched = from_credentials_json(&answer.body)
            .map_err(|m| no_credentials(format!("container credentials at {uri}: {m}")))?;
        fetched.source = Source::Container;
        tracing::info!(uri, expires_unix_s = ?fetched.expires_unix_s, "AWS credentials from the container credentials endpoint");
        Ok(fetched)
    }

    fn instance_profile(&self) -> Result<Fetched, CloudError> {
        let role = self
            .imds
            .get_optional("iam/security-credentials/")
            .map_err(|e| no_credentials(e.to_string()))?
            .and_then(|r| r.lines().next().map(str::to_owned))
            .ok_or_else(|| no_credentials("no instance profile"))?;
        let doc = self
            .imds
            .get(&format!("iam/security-credentials/{role}"))
            .map_err(|e| no_credentials(e.to_string()))?;
        from_credentials_json(&doc).map_err(|m| no_credentials(format!("instance profile: {m}")))
    }
}

/// `k=v&...`, form-encoded.
fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                super::sigv4::uri_encode(k),
                super::sigv4::uri_encode(v)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
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

/// Credentials from the JSON document the metadata service and container
/// endpoints give (`AccessKeyId`, `SecretAccessKey`, `Token`, `Expiration`).
fn from_credentials_json(doc: &str) -> Result<Fetched, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Doc {
        access_key_id: String,
        secret_access_key: String,
        token: Option<String>,
        expiration: Option<String>,
    }
    let d: Doc = serde_json::from_str(doc).map_err(|e| e.to_string())?;
    Ok(Fetched {
        credentials: Credentials {
            access_key_id: d.access_key_id,
            secret_access_key: d.secret_access_key,
            session_token: d.token,
        },
        expires_unix_s: d.expiration.as_deref().map(parse_utc).transpose()?,
        at: Instant::now(),
        source: Source::InstanceProfile,
    })
}

/// Seconds since the epoch of an ISO 8601 UTC time such as
/// `2026-12-06T17:46:20Z` (fractional seconds ignored).
pub fn parse_utc(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a UTC time like 2026-12-06T17:46:20Z");
    let whole = text.strip_suffix('Z').ok_or_else(bad)?;
    let whole = whole.split('.').next().unwrap_or(whole);
    let (date, time) = whole.split_once('T').ok_or_else(bad)?;
    let fields = |part: &str, sep: char| -> Result<[i64; 3], String> {
        let values: Vec<i64> = part
            .split(sep)
            .map(|f| f.parse::<i64>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        values.try_into().map_err(|_| bad())
    };
    let [year, month, day] = fields(date, '-')?;
    let [hour, minute, second] = fields(time, ':')?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || !(0..=23).contains(&hour)
        || !(0..=59).contains(&minute)
        || !(0..=60).contains(&second)
    {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_then_credential_documents() {
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AK".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("SK".to_owned()),
            _ => None,
        };
        let c = from_env(env).unwrap();
        assert_eq!((c.access_key_id.as_str(), c.session_token), ("AK", None));
        assert!(from_env(|_| None).is_none());
        let f = from_credentials_json(
            r#"{"Code":"Success","AccessKeyId":"ASIA1","SecretAccessKey":"s","Token":"t","Expiration":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(f.credentials.session_token.as_deref(), Some("t"));
        assert_eq!(f.expires_unix_s, Some(1_767_225_600));
        assert!(from_credentials_json("{}").is_err());
    }

    #[test]
    fn utc_times_parse_and_bad_ones_are_named() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_utc("2000-03-01T00:00:00Z"), Ok(951_868_800));
        assert_eq!(parse_utc("2026-12-06T17:46:20.123Z"), Ok(1_796_579_180));
        for bad in [
            "",
            "2026-12-06 17:46:20Z",
            "2026-12-06T17:46:20",
            "2026-13-01T00:00:00Z",
            "x",
        ] {
            assert!(parse_utc(bad).unwrap_err().contains("UTC time"), "{bad}");
        }
    }

    #[test]
    fn temporary_credentials_renew_five_minutes_before_expiry() {
        let f = Fetched {
            credentials: Credentials {
                access_key_id: "A".into(),
                secret_access_key: "S".into(),
                session_token: None,
            },
            expires_unix_s: Some(10_000),
            at: Instant::now(),
            source: Source::WebIdentity,
        };
        assert!(!f.stale(10_000 - 301));
        assert!(f.stale(10_000 - 300));
        assert!(!f.expired(9_999));
        assert!(f.expired(10_000));
        let no_expiry = Fetched {
            expires_unix_s: None,
            ..f
        };
        assert!(!no_expiry.stale(u64::MAX));
    }
}
