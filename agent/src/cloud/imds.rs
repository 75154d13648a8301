//! The instance metadata service, `IMDSv2` only: a session token from
//! `PUT /latest/api/token`, then `GET`s with it.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::{http::Client, CloudError, InstanceIdentity};

/// Default `--imds-endpoint`.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// Lifetime asked for a session token.
const TOKEN_TTL_SECONDS: u64 = 21_600;
/// A token is renewed this long before it runs out.
const TOKEN_MARGIN: Duration = Duration::from_mins(1);

/// A metadata client.
#[derive(Debug)]
pub struct Imds {
    endpoint: String,
    http: Client,
    token: Mutex<Option<(String, Instant)>>,
}

impl Imds {
    /// A client of `endpoint` (e.g. `http://169.254.169.254`).
    pub fn new(endpoint: &str, http: Client) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            http,
            token: Mutex::new(None),
        }
    }

    fn token(&self) -> Result<String, CloudError> {
        let mut cached = self.token.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((token, until)) = cached.as_ref() {
            if Instant::now() + TOKEN_MARGIN < *until {
                return Ok(token.clone());
            }
        }
        let action = "IMDS token";
        let answer = self
            .http
            .send(
                "PUT",
                &format!("{}/latest/api/token", self.endpoint),
                &[(
                    "X-aws-ec2-metadata-token-ttl-seconds".into(),
                    TOKEN_TTL_SECONDS.to_string(),
                )],
                Some(""),
            )
            .map_err(|message| CloudError::Transport {
                action: action.into(),
                message,
            })?;
        if answer.status != 200 || answer.body.trim().is_empty() {
            return Err(CloudError::Decode {
                action: action.into(),
                message: format!("status {}", answer.status),
            });
        }
        let token = answer.body.trim().to_owned();
        *cached = Some((
            token.clone(),
            Instant::now() + Duration::from_secs(TOKEN_TTL_SECONDS),
        ));
        Ok(token)
    }

    /// The value at `latest/meta-data/<path>`; `None` when it does not exist.
    pub fn get_optional(&self, path: &str) -> Result<Option<String>, CloudError> {
        let token = self.token()?;
        let action = format!("IMDS {path}");
        let answer = self
            .http
            .send(
                "GET",
                &format!("{}/latest/meta-data/{path}", self.endpoint),
                &[("X-aws-ec2-metadata-token".into(), token)],
                None,
            )
            .map_err(|message| CloudError::Transport {
                action: action.clone(),
                message,
            })?;
        match answer.status {
            200 => Ok(Some(answer.body.trim().to_owned())),
            404 => Ok(None),
            401 => {
                // The token ran out early (e.g. the service restarted): renew next time.
                *self.token.lock().unwrap_or_else(PoisonError::into_inner) = None;
                Err(CloudError::Decode {
                    action,
                    message: "token refused (401)".into(),
                })
            }
            s => Err(CloudError::Decode {
                action,
                message: format!("status {s}"),
            }),
        }
    }

    /// The value at `latest/meta-data/<path>`; missing is an error.
    pub fn get(&self, path: &str) -> Result<String, CloudError> {
        self.get_optional(path)?.ok_or_else(|| CloudError::Decode {
            action: format!("IMDS {path}"),
            message: "not found (404)".into(),
        })
    }

    /// This instance: id, type, region, primary MAC, its subnet (id and
    /// CIDR) and security groups.
    pub fn identity(&self) -> Result<InstanceIdentity, CloudError> {
        let bad = |path: &str, message: String| CloudError::Decode {
            action: format!("IMDS {path}"),
            message,
        };
        let mac_text = self.get("mac")?;
        let mac = mac_text.parse().map_err(|e| bad("mac", e))?;
        let iface = format!("network/interfaces/macs/{mac_text}");
        let cidr_path = format!("{iface}/subnet-ipv4-cidr-block");
        let subnet_cidr: crate::net::Cidr = self
            .get(&cidr_path)?
            .parse()
            .map_err(|e: crate::net::CidrError| bad(&cidr_path, e.to_string()))?;
        if subnet_cidr.network_v4().is_none() {
            return Err(bad(
                &cidr_path,
                format!("{subnet_cidr} is not an IPv4 prefix"),
            ));
        }
        let security_groups = self
            .get(&format!("{iface}/security-group-ids"))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(InstanceIdentity {
            instance_id: self.get("instance-id")?,
            instance_type: self.get("instance-type")?,
            region: self.get("placement/region")?,
            availability_zone: self.get("placement/availability-zone")?,
            mac,
            subnet_id: self.get(&format!("{iface}/subnet-id"))?,
            subnet_cidr,
            security_groups,
        })
    }
}
