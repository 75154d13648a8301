//! A small blocking HTTP client for the metadata service and the EC2 API
//! (TLS through the system's OpenSSL), with bounded timeouts.

use std::{sync::Arc, time::Duration};

/// An HTTP answer: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Body text.
    pub body: String,
}

/// A blocking client. Cloning shares connections.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("http::Client")
    }
}

impl Client {
    /// A client whose every request gives up after `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, String> {
        let tls = native_tls::TlsConnector::new().map_err(|e| format!("TLS setup: {e}"))?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout)
            .timeout(timeout)
            .tls_connector(Arc::new(tls))
            .build();
        Ok(Self { agent })
    }

    /// Sends `method url` with `headers` and `body`; any status is an answer,
    /// only transport failures are errors.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        body: Option<&str>,
    ) -> Result<Answer, String> {
        let mut req = self.agent.request(method, url);
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = match body {
            Some(b) => req.send_string(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(t.to_string()),
        };
        let status = resp.status();
        let body = resp
            .into_string()
            .map_err(|e| format!("reading the answer: {e}"))?;
        Ok(Answer { status, body })
    }
}
