//! The HTTP server of `--metrics-addr`: `GET /metrics`, `/healthz`, `/readyz`.
//!
//! Nothing else is served here; debugging data goes through the Unix socket
//! API only (`api`), since this port is reachable from the network.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{HeaderValue, ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use super::{text, MetricsSource};
use crate::heartbeat::Heartbeats;

/// A client must send its request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, open connections get this long to finish their response.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Whether the agent is ready, shared between the agent and `/readyz`.
/// Cloning shares the same state. Starts not ready, with reason `starting`.
/// Once set ready, it is still not ready while a watched worker thread has
/// ended or hangs ([`Readiness::watching`]).
#[derive(Clone, Debug)]
pub struct Readiness {
    state: Arc<Mutex<Result<(), String>>>,
    threads: Option<Heartbeats>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            state: Arc::new(Mutex::new(Err("starting".to_owned()))),
            threads: None,
        }
    }
}

impl Readiness {
    /// Not ready yet, reason `starting`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Not ready yet; once ready, not ready while one of `threads` has ended
    /// or hangs.
    pub fn watching(threads: Heartbeats) -> Self {
        Self {
            threads: Some(threads),
            ..Self::default()
        }
    }

    /// Marks the agent ready: `/readyz` answers 200.
    pub fn set_ready(&self) {
        *self.lock() = Ok(());
    }

    /// Marks the agent not ready: `/readyz` answers 503 with `reason`.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.lock() = Err(reason.into());
    }

    /// `Ok` when ready, else why not (each dead thread named).
    pub fn check(&self) -> Result<(), String> {
        self.lock().clone()?;
        match self.threads.as_ref().map(Heartbeats::problems) {
            Some(problems) if !problems.is_empty() => Err(problems.join("; ")),
            _ => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Result<(), String>> {
        // The guarded value is a plain Result; a panic elsewhere cannot leave
        // it half-written, so a poisoned lock is still good to use.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Errors of the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be created.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct State {
    source: Arc<dyn MetricsSource>,
    readiness: Readiness,
}

/// A bound metrics server; [`MetricsServer::run`] serves it.
pub struct MetricsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: State,
}

impl MetricsServer {
    /// Binds `addr`. Binding before running lets the agent fail fast on a
    /// busy port, and lets tests bind port 0 and read [`Self::local_addr`].
    pub async fn bind(
        addr: SocketAddr,
        source: Arc<dyn MetricsSource>,
        readiness: Readiness,
    ) -> Result<Self, ServerError> {
        let bind_error = |source| ServerError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        Ok(Self {
            listener,
            local_addr,
            state: State { source, readiness },
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then stops accepting, lets open
    /// connections finish for up to [`DRAIN_TIMEOUT`], and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        tracing::info!(addr = %self.local_addr, "serving /metrics, /healthz, /readyz");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(serve_connection(stream, peer, self.state.clone(), stop_rx.clone()));
                    }
                    Err(error) => {
                        tracing::warn!(%error, addr = %self.local_addr, "metrics accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(self.listener);
        // Receivers only wait for `true`; a send error means none is left.
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::debug!(
                open = connections.len(),
                "metrics connections still open after drain; closing them"
            );
        }
        tracing::info!(addr = %self.local_addr, "metrics server stopped");
    }
}

/// Binds `addr` and serves until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    source: Arc<dyn MetricsSource>,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    MetricsServer::bind(addr, source, readiness)
        .await?
        .run(shutdown)
        .await;
    Ok(())
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: State,
    mut stop: watch::Receiver<bool>,
) {
    let service = service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(respond(&request, &state).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "metrics connection ended with an error");
    }
}

/// Completes when the server stops (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it right here.
    let _ = stop.wait_for(|stopped| *stopped).await.map(|_| ());
}

async fn respond(request: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return plain(StatusCode::NOT_FOUND, "not found\n".to_owned());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => {
            let source = Arc::clone(&state.source);
            // Rendering reads kernel maps and /proc: keep it off the async workers.
            match tokio::task::spawn_blocking(move || source.render()).await {
                Ok(body) => {
                    let mut response = plain(StatusCode::OK, body);
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(text::CONTENT_TYPE));
                    response
                }
                Err(error) => {
                    tracing::error!(%error, "rendering metrics failed");
                    plain(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "rendering metrics failed\n".to_owned(),
                    )
                }
            }
        }
        "/readyz" => match state.readiness.check() {
            Ok(()) => plain(StatusCode::OK, "ok\n".to_owned()),
            Err(reason) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        _ => plain(StatusCode::OK, "ok\n".to_owned()),
    }
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Sends one HTTP/1.0 request; returns (status line, Content-Type, body).
    async fn get(addr: SocketAddr, method: &str, path: &str) -> (String, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("{method} {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.lines().next().unwrap().to_owned();
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_owned();
        (status, content_type, body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let threads = Heartbeats::new();
        let readiness = Readiness::watching(threads.clone());
        let source: Arc<dyn MetricsSource> = Arc::new(|| "podnet_up 1\n".to_owned());
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), source, readiness.clone())
            .await
            .unwrap();
        let addr = server.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));

        assert_eq!(
            get(addr, "GET", "/metrics").await,
            (
                "HTTP/1.0 200 OK".to_owned(),
                "text/plain; version=0.0.4; charset=utf-8".to_owned(),
                "podnet_up 1\n".to_owned()
            )
        );
        assert_eq!(get(addr, "GET", "/healthz").await.2, "ok\n");
        let (status, _, body) = get(addr, "GET", "/readyz").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.0 503 Service Unavailable", "not ready: starting\n")
        );
        readiness.set_ready();
        let (status, _, body) = get(addr, "GET", "/readyz").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.0 200 OK", "ok\n")
        );
        readiness.set_not_ready("tracer detached");
        assert_eq!(
            get(addr, "GET", "/readyz").await.2,
            "not ready: tracer detached\n"
        );
        readiness.set_ready();
        let routing = threads.register("podnet-routing", Duration::from_secs(30));
        assert_eq!(get(addr, "GET", "/readyz").await.2, "ok\n");
        drop(routing);
        let (status, _, body) = get(addr, "GET", "/readyz").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            (
                "HTTP/1.0 503 Service Unavailable",
                "not ready: thread podnet-routing ended\n"
            )
        );

        assert_eq!(
            get(addr, "GET", "/debug/races").await.0,
            "HTTP/1.0 404 Not Found"
        );
        assert_eq!(get(addr, "GET", "/").await.0, "HTTP/1.0 404 Not Found");
        assert_eq!(
            get(addr, "POST", "/metrics").await.0,
            "HTTP/1.0 405 Method Not Allowed"
        );

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn bind_errors_name_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let source: Arc<dyn MetricsSource> = Arc::new(String::new);
        let Err(error) = MetricsServer::bind(addr, source, Readiness::new()).await else {
            panic!("bound a busy port")
        };
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot listen for metrics on {addr}: ")),
            "{error}"
        );
    }
}
