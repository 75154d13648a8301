//! The HTTP server of `--metrics-addr`: `GET /metrics`, `/healthz`, `/readyz`.
//!
//! Nothing else is served here; debugging data goes through the Unix socket
//! API only (`api`), since this port is reachable from the network.
//!
//! The port is on the host network, so any pod can reach it; it is bounded:
//! at most [`MAX_CONNECTIONS`] open connections, [`MAX_CONNECTIONS_PER_PEER`]
//! from one address (a connection over either cap is closed at once, and
//! counted), headers within [`HEADER_READ_TIMEOUT`], a connection for at most
//! [`CONNECTION_LIFETIME`]. One render runs at a time: scrapes that arrive
//! while one runs wait for the next, which they all share, so each answer is
//! rendered after its request arrived and 200 parallel scrapes cost two
//! renders, not 200 walks of the kernel maps.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
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

use super::{
    text::{self, Encoder, MetricType},
    MetricsSource,
};
use crate::heartbeat::Heartbeats;

/// A client must send its request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed (gracefully) after this long, however busy.
pub const CONNECTION_LIFETIME: Duration = Duration::from_mins(1);
/// Open connections at most; more are closed as soon as accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// Open connections from one peer address at most (Prometheus needs one or
/// two; kubelet's probes one each).
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;
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
    renders: Arc<Renders>,
    readiness: Readiness,
}

/// One render at a time, shared by the scrapes that waited for it.
struct Renders {
    source: Arc<dyn MetricsSource>,
    /// The last render: when it started, and its text.
    last: tokio::sync::Mutex<Option<(Instant, Bytes)>>,
}

impl Renders {
    /// An exposition rendered after `arrived`: the last one if it started
    /// since, else a new one (waiting for the render in progress first).
    async fn after(&self, arrived: Instant) -> Result<Bytes, tokio::task::JoinError> {
        let mut last = self.last.lock().await;
        if let Some((started, body)) = last.as_ref() {
            if *started >= arrived {
                STATS.shared_renders.fetch_add(1, Ordering::Relaxed);
                return Ok(body.clone());
            }
        }
        let started = Instant::now();
        let source = Arc::clone(&self.source);
        // Rendering reads kernel maps and /proc: keep it off the async workers.
        let body = Bytes::from(tokio::task::spawn_blocking(move || source.render()).await?);
        STATS.renders.fetch_add(1, Ordering::Relaxed);
        *last = Some((started, body.clone()));
        Ok(body)
    }
}

/// The server's own counters, process-wide.
#[derive(Debug, Default)]
struct Stats {
    renders: AtomicU64,
    shared_renders: AtomicU64,
    refused: AtomicU64,
}

static STATS: Stats = Stats {
    renders: AtomicU64::new(0),
    shared_renders: AtomicU64::new(0),
    refused: AtomicU64::new(0),
};

/// Writes the metrics server's own families: renders, scrapes answered from
/// a shared render, connections refused over the caps.
pub fn render_stats(enc: &mut Encoder) {
    enc.family(
        "podnet_metrics_renders_total",
        MetricType::Counter,
        "Expositions rendered for /metrics (one at a time).",
    )
    .sample(&[], STATS.renders.load(Ordering::Relaxed));
    enc.family(
        "podnet_metrics_shared_renders_total",
        MetricType::Counter,
        "Scrapes answered with a render that started after they arrived, rendered for another scrape.",
    )
    .sample(&[], STATS.shared_renders.load(Ordering::Relaxed));
    enc.family(
        "podnet_metrics_connections_refused_total",
        MetricType::Counter,
        "Connections to the metrics port closed at once: over the open-connection cap, in total or from one address.",
    )
    .sample(&[], STATS.refused.load(Ordering::Relaxed));
}

/// Writes `podnet_ready`: 1 while `/readyz` answers 200, else 0 (starting,
/// waiting for the node's pod CIDRs, a worker thread ended or hangs, the pin
/// directory gone, shutting down). The reason stays on `/readyz` and in the
/// log: as a label it would be free text.
pub fn render_ready(enc: &mut Encoder, readiness: &Readiness) {
    enc.family(
        "podnet_ready",
        MetricType::Gauge,
        "1 while the agent is ready (/readyz answers 200); 0 while it is not (/readyz says why).",
    )
    .sample(&[], u64::from(readiness.check().is_ok()));
}

/// Open connections, in total and per peer address.
#[derive(Debug, Default)]
struct Connections {
    per_peer: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it frees its place.
struct Admitted {
    connections: Arc<Connections>,
    peer: IpAddr,
}

impl Connections {
    /// Admits a connection from `peer` when both caps allow.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Admitted> {
        let mut per_peer = self.lock();
        let total: usize = per_peer.values().sum();
        let mine = per_peer.entry(peer).or_default();
        if total >= MAX_CONNECTIONS || *mine >= MAX_CONNECTIONS_PER_PEER {
            if *mine == 0 {
                per_peer.remove(&peer);
            }
            return None;
        }
        *mine += 1;
        Some(Admitted {
            connections: self.clone(),
            peer,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Plain counts: a panic elsewhere cannot leave them half-written.
        self.per_peer.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per_peer = self.connections.lock();
        if let Some(n) = per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
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
            state: State {
                renders: Arc::new(Renders {
                    source,
                    last: tokio::sync::Mutex::new(None),
                }),
                readiness,
            },
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
        let open = Arc::new(Connections::default());
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Some(admitted) = open.admit(peer.ip()) else {
                            STATS.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "metrics connection over the cap; closed");
                            drop(stream);
                            continue;
                        };
                        connections.spawn(serve_connection(stream, peer, self.state.clone(), stop_rx.clone(), admitted));
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
    admitted: Admitted,
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
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {
            // A last response may still be written; a client that does not
            // read it gets the header timeout's worth, then the socket closes.
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(HEADER_READ_TIMEOUT, connection)
                .await
                .unwrap_or(Ok(()))
        }
    };
    drop(admitted);
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
    let arrived = Instant::now();
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
        "/metrics" => match state.renders.after(arrived).await {
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
        },
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

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
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

    fn ready_sample(readiness: &Readiness) -> String {
        let mut enc = Encoder::new();
        render_ready(&mut enc, readiness);
        enc.finish()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn ready_gauge_follows_the_readiness_state() {
        let threads = Heartbeats::new();
        let readiness = Readiness::watching(threads.clone());
        let mut enc = Encoder::new();
        render_ready(&mut enc, &readiness);
        assert_eq!(
            enc.finish(),
            "# HELP podnet_ready 1 while the agent is ready (/readyz answers 200); 0 while it is not (/readyz says why).\n\
             # TYPE podnet_ready gauge\n\
             podnet_ready 0\n"
        );
        readiness.set_ready();
        assert_eq!(ready_sample(&readiness), "podnet_ready 1");
        let routing = threads.register("podnet-routing", Duration::from_secs(30));
        assert_eq!(ready_sample(&readiness), "podnet_ready 1");
        drop(routing);
        assert_eq!(ready_sample(&readiness), "podnet_ready 0");
        threads
            .register("podnet-routing", Duration::from_secs(30))
            .retire();
        assert_eq!(ready_sample(&readiness), "podnet_ready 1");
        readiness.set_not_ready("shutting down");
        assert_eq!(ready_sample(&readiness), "podnet_ready 0");
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

    async fn start(
        source: Arc<dyn MetricsSource>,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let readiness = Readiness::new();
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), source, readiness)
            .await
            .unwrap();
        let addr = server.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    /// Whether the server closed `stream` (EOF) within a second.
    async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn one_peer_gets_a_bounded_number_of_connections() {
        let (addr, _stop) = start(Arc::new(|| "podnet_up 1\n".to_owned())).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_PEER {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let refused_before = STATS.refused.load(Ordering::Relaxed);
        let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_by_server(&mut over).await,
            "a 17th connection stayed open"
        );
        assert!(STATS.refused.load(Ordering::Relaxed) > refused_before);
        // Another peer address is served meanwhile.
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut other = other.connect(addr).await.unwrap();
        other
            .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut raw = String::new();
        other.read_to_string(&mut raw).await.unwrap();
        assert!(raw.ends_with("\r\n\r\npodnet_up 1\n"), "{raw}");
        // Once the idle ones go, the first peer is served again.
        drop(idle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(get(addr, "GET", "/metrics").await.2, "podnet_up 1\n");
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_after_the_header_timeout() {
        let (addr, _stop) = start(Arc::new(String::new)).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t0 = Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(
            HEADER_READ_TIMEOUT + Duration::from_secs(2),
            silent.read_to_end(&mut buf),
        )
        .await;
        assert!(read.is_ok(), "still open after {:?}", t0.elapsed());
        assert!(t0.elapsed() >= HEADER_READ_TIMEOUT, "{:?}", t0.elapsed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapes_during_a_render_share_the_next_one() {
        // The first render waits for the test's go; count every render.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let wait = Mutex::new(Some(wait));
        let count = Arc::new(AtomicU64::new(0));
        let source: Arc<dyn MetricsSource> = Arc::new({
            let count = count.clone();
            move || {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                if let Some(wait) = wait.lock().unwrap().take() {
                    wait.recv().unwrap();
                }
                format!("render {n}\n")
            }
        });
        let (addr, _stop) = start(source).await;
        let first = tokio::spawn(get(addr, "GET", "/metrics"));
        while count.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Ten more (within one peer's cap) arrive while the first render is held.
        let later: Vec<_> = (0..10)
            .map(|_| tokio::spawn(get(addr, "GET", "/metrics")))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        go.send(()).unwrap();
        assert_eq!(first.await.unwrap().2, "render 1\n");
        for scrape in later {
            assert_eq!(scrape.await.unwrap().2, "render 2\n");
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // A scrape after that renders anew: never an answer older than its request.
        assert_eq!(get(addr, "GET", "/metrics").await.2, "render 3\n");
    }
}
