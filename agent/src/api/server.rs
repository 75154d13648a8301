//! The agent side of the socket API: a Unix listener (mode 0600, root peers
//! only) that reads one request per connection and answers it through a
//! [`Handler`], or, for `follow`, streams events from an
//! [`EventHub`] until the client closes.

use std::{
    fs,
    future::Future,
    io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    task::JoinSet,
};

use super::follow::{self, EventHub};
use super::{
    client,
    protocol::{
        method, parse_params, ApiError, ErrorCode, FollowParams, Request, Response,
        MAX_REQUEST_BYTES, METHODS, VERSION,
    },
};

/// Mode of the socket file: only root may connect.
pub const SOCKET_MODE: u32 = 0o600;
/// Mode of the socket's directory when the server creates it.
pub const DIR_MODE: u32 = 0o755;
/// A client must send its whole request within this time; the answer must
/// be taken within the same time again.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// On shutdown, requests being served get this long to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The only peer uid served.
const ROOT_UID: u32 = 0;
/// How long to try a connection to an existing socket file before treating it as stale.
const LIVENESS_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause after a failed `accept` (e.g. out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the API methods. Called on a blocking thread, one call per request.
pub trait Handler: Send + Sync {
    /// Answers `method` (always one of [`METHODS`]) with `params` (`null`
    /// when the request had none).
    fn handle(&self, method: &str, params: Value) -> Result<Value, ApiError>;

    /// Like [`Handler::handle`] for a request whose client gives up at
    /// `deadline_unix_ms` (`None`: no deadline). A handler that can wait
    /// (e.g. for the disk) overrides it to refuse or undo work nobody waits
    /// for; the server has already refused requests whose deadline passed
    /// before they reached the handler.
    fn handle_by(
        &self,
        method: &str,
        params: Value,
        deadline_unix_ms: Option<u64>,
    ) -> Result<Value, ApiError> {
        let _ = deadline_unix_ms;
        self.handle(method, params)
    }
}

/// The error of a request whose deadline passed `late_ms` ago before the
/// agent started it: nothing was done, and the client is told to retry.
pub fn deadline_exceeded(method: &str, late_ms: u64) -> ApiError {
    ApiError::new(
        ErrorCode::DeadlineExceeded,
        format!(
            "{method} was not started: the caller's deadline passed {late_ms} ms ago (the agent is busy); nothing was changed, retry later"
        ),
    )
}

/// How far past its deadline a request is now (`None`: not yet, or no deadline).
fn past_deadline(deadline_unix_ms: Option<u64>) -> Option<u64> {
    let now = super::protocol::now_unix_ms();
    deadline_unix_ms.filter(|d| now >= *d).map(|d| now - d)
}

/// Errors setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket's directory could not be created.
    #[error("cannot create the directory of the API socket {path}: {source}")]
    CreateDir {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process answers on the socket.
    #[error("another process (an agent still running?) is listening on {path}")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket is in the way.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket path could not be inspected, removed, bound or chmod-ed.
    #[error("cannot {action} the API socket {path}: {source}")]
    Socket {
        /// What failed: `inspect`, `remove stale`, `bind`, `set the mode of`.
        action: &'static str,
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A bound API socket; [`ApiServer::run`] serves it.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created, so shutdown removes
    /// only our own file and never a successor's.
    identity: (u64, u64),
    handler: Arc<dyn Handler>,
    allowed_uid: u32,
    events: Option<EventHub>,
}

/// What every connection shares.
#[derive(Clone)]
struct Shared {
    handler: Arc<dyn Handler>,
    allowed_uid: u32,
    events: Option<EventHub>,
    /// Becomes true when the server stops: ends the follows.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl ApiServer {
    /// Prepares `path` and listens on it: creates the parent directory
    /// (mode 0755) if missing, removes a stale socket file left by a previous
    /// agent (but fails if a process still answers on it), binds, and sets
    /// the file's mode to 0600 right away.
    ///
    /// Must be called inside a tokio runtime.
    pub fn bind(path: &Path, handler: Arc<dyn Handler>) -> Result<Self, ApiServerError> {
        let error = |action: &'static str| {
            move |source| ApiServerError::Socket {
                action,
                path: path.to_owned(),
                source,
            }
        };
        if let Some(parent) = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty() && !p.exists())
        {
            let create_error = |source| ApiServerError::CreateDir {
                path: path.to_owned(),
                source,
            };
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(parent)
                .map_err(create_error)?;
            // The umask may have narrowed the mode; clients need to reach the socket.
            fs::set_permissions(parent, fs::Permissions::from_mode(DIR_MODE))
                .map_err(create_error)?;
        }
        remove_stale(path)?;
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(error("bind"))?;
        // Peers are also checked by uid; the mode keeps others from connecting at all.
        fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(error("set the mode of"))?;
        let meta = fs::symlink_metadata(path).map_err(error("inspect"))?;
        listener.set_nonblocking(true).map_err(error("bind"))?;
        let listener = UnixListener::from_std(listener).map_err(error("bind"))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            identity: (meta.dev(), meta.ino()),
            handler,
            allowed_uid: ROOT_UID,
            events: None,
        })
    }

    /// Serves `follow` from `hub`; without it `follow` is an unknown method.
    #[must_use]
    pub fn with_events(mut self, hub: EventHub) -> Self {
        self.events = Some(hub);
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` completes, then stops accepting, lets requests
    /// being served finish for up to [`DRAIN_TIMEOUT`], and removes the socket
    /// file if it is still the one this server created.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        tracing::info!(path = %self.path.display(), "serving the API socket");
        let mut connections = JoinSet::new();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let shared = Shared {
            handler: Arc::clone(&self.handler),
            allowed_uid: self.allowed_uid,
            events: self.events.clone(),
            stopping,
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(serve_connection(stream, shared.clone()));
                    }
                    Err(error) => {
                        tracing::warn!(%error, path = %self.path.display(), "API accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(self.listener);
        // Follows end now; requests being answered get the drain time.
        let _ = stop.send(true);
        if tokio::time::timeout(DRAIN_TIMEOUT, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::debug!(
                open = connections.len(),
                "API requests still running after drain; dropping them"
            );
        }
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.identity => {
                if let Err(error) = fs::remove_file(&self.path) {
                    tracing::warn!(%error, path = %self.path.display(), "cannot remove the API socket");
                }
            }
            _ => {}
        }
        tracing::info!(path = %self.path.display(), "API socket closed");
    }

    /// Serves only peers with this uid (tests run the rejection path with it).
    #[cfg(test)]
    fn allow_only_uid(mut self, uid: u32) -> Self {
        self.allowed_uid = uid;
        self
    }
}

/// Binds `path` (see [`ApiServer::bind`]) and serves until `shutdown` completes.
pub async fn serve(
    path: &Path,
    handler: Arc<dyn Handler>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiServerError> {
    ApiServer::bind(path, handler)?.run(shutdown).await;
    Ok(())
}

/// Removes a socket file that no process answers on.
fn remove_stale(path: &Path) -> Result<(), ApiServerError> {
    let socket_error = |action| {
        move |source| ApiServerError::Socket {
            action,
            path: path.to_owned(),
            source,
        }
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(socket_error("inspect")(e)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ApiServerError::NotASocket {
                path: path.to_owned(),
            })
        }
        Ok(_) => {}
    }
    match client::connect(path, LIVENESS_PROBE_TIMEOUT) {
        // Someone answers, or the accept queue is full: either way it is alive.
        Ok(_) | Err(client::ClientError::Timeout { .. }) => Err(ApiServerError::InUse {
            path: path.to_owned(),
        }),
        Err(_) => match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(socket_error("remove stale")(e)),
            _ => {
                tracing::debug!(path = %path.display(), "removed a stale API socket");
                Ok(())
            }
        },
    }
}

async fn serve_connection(mut stream: UnixStream, shared: Shared) {
    let response = match check_peer(&stream, shared.allowed_uid) {
        Err(error) => Response::failure(error),
        Ok(()) => match tokio::time::timeout(IO_TIMEOUT, read_request(&mut stream)).await {
            Err(_) => Response::failure(ApiError::new(
                ErrorCode::Timeout,
                format!("no complete request within {IO_TIMEOUT:?}"),
            )),
            Ok(Err(error)) => Response::failure(error),
            Ok(Ok(request)) => match (&shared.events, request.method.as_str()) {
                (Some(hub), method::FOLLOW) => {
                    match parse_params::<FollowParams>(method::FOLLOW, request.params) {
                        Ok(params) => {
                            let mut stopping = shared.stopping.clone();
                            let stopped = async move {
                                let _ = stopping.wait_for(|s| *s).await;
                            };
                            follow::serve(stream, hub, params, stopped).await;
                            return;
                        }
                        Err(error) => Response::failure(error),
                    }
                }
                _ => dispatch(shared.handler, request).await,
            },
        },
    };
    if let Some(error) = &response.error {
        tracing::debug!(code = %error.code, message = %error.message, "API request failed");
    }
    let mut line = match serde_json::to_vec(&response) {
        Ok(line) => line,
        Err(error) => {
            // A handler result that does not serialize (e.g. a map with
            // non-string keys) is the handler's bug; say so to the client.
            tracing::error!(%error, "cannot serialize an API response");
            let fallback = Response::failure(ApiError::internal(format!(
                "cannot serialize the result: {error}"
            )));
            serde_json::to_vec(&fallback).unwrap_or_default()
        }
    };
    line.push(b'\n');
    let written = tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(&line).await?;
        stream.shutdown().await
    })
    .await;
    match written {
        Err(_) => tracing::debug!("API client did not take its answer in time"),
        Ok(Err(error)) => tracing::debug!(%error, "cannot write an API answer"),
        Ok(Ok(())) => {}
    }
}

fn check_peer(stream: &UnixStream, allowed_uid: u32) -> Result<(), ApiError> {
    let denied = |message: String| ApiError::new(ErrorCode::PermissionDenied, message);
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == allowed_uid => Ok(()),
        Ok(cred) => {
            tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "rejected an API client that is not root");
            Err(denied(format!(
                "uid {} may not use the agent API; it is for root only",
                cred.uid()
            )))
        }
        Err(error) => {
            tracing::warn!(%error, "rejected an API client whose credentials cannot be read");
            Err(denied(format!(
                "cannot read the peer's credentials: {error}"
            )))
        }
    }
}

/// Reads one newline-terminated request (or one ended by the client closing
/// its side) of at most [`MAX_REQUEST_BYTES`], and checks its version.
async fn read_request(stream: &mut UnixStream) -> Result<Request, ApiError> {
    let limit = u64::try_from(MAX_REQUEST_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut reader = BufReader::new(stream.take(limit));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await.map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("cannot read the request: {e}"),
        )
    })?;
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ApiError::new(
            ErrorCode::RequestTooLarge,
            format!("request larger than {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(ErrorCode::BadRequest, "empty request"));
    }
    parse_request(&line)
}

fn parse_request(line: &[u8]) -> Result<Request, ApiError> {
    let bad = |message: String| ApiError::new(ErrorCode::BadRequest, message);
    let value: Value =
        serde_json::from_slice(line).map_err(|e| bad(format!("request is not valid JSON: {e}")))?;
    // Check the version before the shape: another version may shape requests differently.
    match value.get("version").map(Value::as_u64) {
        None => return Err(bad("request has no \"version\"".to_owned())),
        Some(Some(v)) if v == u64::from(VERSION) => {}
        Some(v) => {
            let got = v.map_or_else(|| value["version"].to_string(), |v| v.to_string());
            return Err(ApiError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {got} is not supported; this agent speaks version {VERSION}"
                ),
            ));
        }
    }
    serde_json::from_value(value).map_err(|e| bad(format!("invalid request: {e}")))
}

async fn dispatch(handler: Arc<dyn Handler>, request: Request) -> Response {
    if !METHODS.contains(&request.method.as_str()) {
        return Response::failure(ApiError::unknown_method(&request.method));
    }
    let method = request.method.clone();
    let deadline = request.deadline_unix_ms;
    if let Some(late_ms) = past_deadline(deadline) {
        return Response::failure(deadline_exceeded(&method, late_ms));
    }
    let served = tokio::task::spawn_blocking(move || {
        // The blocking pool may have queued the call behind others.
        if let Some(late_ms) = past_deadline(deadline) {
            return Err(deadline_exceeded(&request.method, late_ms));
        }
        handler.handle_by(&request.method, request.params, deadline)
    })
    .await;
    match served {
        Ok(Ok(result)) => Response::success(result),
        Ok(Err(error)) => Response::failure(error),
        Err(error) => {
            tracing::error!(%error, %method, "API handler failed");
            Response::failure(ApiError::internal(format!(
                "the agent failed while serving {method}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        client::{call, ClientError},
        protocol::method,
    };
    use serde_json::json;
    use std::io::{Read as _, Write as _};

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, method: &str, params: Value) -> Result<Value, ApiError> {
            match method {
                method::STATUS => Err(ApiError::new(ErrorCode::Unavailable, "still starting")),
                _ => Ok(json!({"method": method, "params": params})),
            }
        }
    }

    /// A server on a socket in a fresh temp dir, served on a background runtime.
    struct Running {
        _dir: tempfile::TempDir,
        path: PathBuf,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Running {
        fn start(configure: impl FnOnce(ApiServer) -> ApiServer + Send + 'static) -> Self {
            let dir = tempfile::tempdir().unwrap();
            // A missing parent directory is created.
            let path = dir.path().join("run/podnet/agent.sock");
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (bound_tx, bound_rx) = std::sync::mpsc::channel();
            let server_path = path.clone();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let server = configure(ApiServer::bind(&server_path, Arc::new(Echo)).unwrap());
                    bound_tx.send(()).unwrap();
                    server
                        .run(async {
                            let _ = stopped.await;
                        })
                        .await;
                });
            });
            bound_rx.recv().unwrap();
            Self {
                _dir: dir,
                path,
                stop: Some(stop),
                thread: Some(thread),
            }
        }

        /// Sends raw bytes; returns the raw answer line.
        fn raw(&self, bytes: &[u8]) -> String {
            let mut stream = std::os::unix::net::UnixStream::connect(&self.path).unwrap();
            // The server may answer and close before reading everything.
            let _ = stream.write_all(bytes);
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer
        }

        fn stop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop();
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn round_trip_and_socket_mode() {
        let mut server = Running::start(|s| s);
        let mode = fs::symlink_metadata(&server.path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o600);
        let parent = fs::metadata(server.path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(parent & 0o7777, 0o755);

        let result = call(
            &server.path,
            method::CONNTRACK_RACES,
            json!({"limit": 3}),
            T,
        )
        .unwrap();
        assert_eq!(
            result,
            json!({"method": "conntrack.races", "params": {"limit": 3}})
        );

        let error = call(&server.path, method::STATUS, Value::Null, T).unwrap_err();
        let ClientError::Remote { error, .. } = &error else {
            panic!("{error:?}")
        };
        assert_eq!(
            error,
            &ApiError::new(ErrorCode::Unavailable, "still starting")
        );

        // Shutdown removes the socket file.
        server.stop();
        assert!(!server.path.exists());
    }

    #[test]
    fn a_request_past_its_deadline_is_refused_before_the_handler() {
        let server = Running::start(|s| s);
        let now = crate::api::protocol::now_unix_ms();
        let late = format!(
            "{{\"version\":1,\"method\":\"dns.top\",\"deadline_unix_ms\":{}}}\n",
            now - 1000
        );
        let answer: Response = serde_json::from_str(&server.raw(late.as_bytes())).unwrap();
        let error = answer.error.unwrap();
        assert_eq!(error.code, ErrorCode::DeadlineExceeded);
        assert!(
            error
                .message
                .starts_with("dns.top was not started: the caller's deadline passed "),
            "{}",
            error.message
        );
        // In time, or without a deadline (an older client): served.
        for deadline in [
            format!(",\"deadline_unix_ms\":{}", now + 60_000),
            String::new(),
        ] {
            let request = format!("{{\"version\":1,\"method\":\"dns.top\"{deadline}}}\n");
            let answer: Response = serde_json::from_str(&server.raw(request.as_bytes())).unwrap();
            assert_eq!(
                answer.result,
                Some(json!({"method": "dns.top", "params": null})),
                "{request}"
            );
        }
    }

    #[test]
    fn unknown_method_and_version() {
        let server = Running::start(|s| s);
        let error = call(&server.path, "conntrack.flush", Value::Null, T).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "the podnet agent failed conntrack.flush: unknown method \"conntrack.flush\"; \
                 known methods: {} (unknown_method)",
                crate::api::protocol::METHODS.join(", ")
            )
        );
        assert_eq!(
            server.raw(b"{\"version\":2,\"method\":\"status\"}\n"),
            "{\"version\":1,\"ok\":false,\"error\":{\"code\":\"unsupported_version\",\
             \"message\":\"protocol version 2 is not supported; this agent speaks version 1\"}}\n"
        );
        assert!(server
            .raw(b"not json\n")
            .starts_with("{\"version\":1,\"ok\":false,\"error\":{\"code\":\"bad_request\",\"message\":\"request is not valid JSON: "));
        // A request ended by closing the write side instead of a newline is fine.
        let mut stream = std::os::unix::net::UnixStream::connect(&server.path).unwrap();
        stream
            .write_all(br#"{"version":1,"method":"conntrack.races"}"#)
            .unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert_eq!(
            answer,
            "{\"version\":1,\"ok\":true,\"result\":{\"method\":\"conntrack.races\",\"params\":null}}\n"
        );
    }

    #[test]
    fn oversized_request_is_rejected() {
        let server = Running::start(|s| s);
        let mut request = br#"{"version":1,"method":"status","params":""#.to_vec();
        request.resize(MAX_REQUEST_BYTES + 100, b'x');
        request.extend_from_slice(b"\"}\n");
        assert_eq!(
            server.raw(&request),
            "{\"version\":1,\"ok\":false,\"error\":{\"code\":\"request_too_large\",\
             \"message\":\"request larger than 1048576 bytes\"}}\n"
        );
        // A request of exactly the limit, newline included, is read.
        let mut request = br#"{"version":1,"method":"conntrack.races","params":""#.to_vec();
        request.resize(MAX_REQUEST_BYTES - 3, b'x');
        request.extend_from_slice(b"\"}\n");
        assert_eq!(request.len(), MAX_REQUEST_BYTES);
        assert!(server
            .raw(&request)
            .starts_with("{\"version\":1,\"ok\":true,"));
    }

    #[test]
    fn peers_other_than_root_are_rejected() {
        // The tests run as root, so allow only another uid to see the rejection.
        let server = Running::start(|s| s.allow_only_uid(4242));
        let error = call(&server.path, method::STATUS, Value::Null, T).unwrap_err();
        let ClientError::Remote { error, .. } = &error else {
            panic!("{error:?}")
        };
        assert_eq!(error.code, ErrorCode::PermissionDenied);
        assert_eq!(
            error.message,
            "uid 0 may not use the agent API; it is for root only"
        );
    }

    /// A published record of the follow tests.
    #[derive(Debug, serde::Serialize)]
    struct Rec {
        namespace: &'static str,
        n: u64,
    }

    impl follow::Followed for Rec {
        fn matches(&self, filter: &crate::api::protocol::EventFilter) -> bool {
            follow::matches_parts(filter, Some((self.namespace, "p")), None, "timeout")
        }
        fn to_line(&self) -> serde_json::Result<Vec<u8>> {
            follow::tagged_line("rec", self)
        }
    }

    /// Publishes until `done` says the followers saw enough (bounded).
    fn wait_for(hub: &EventHub, mut done: impl FnMut(&follow::HubStatus) -> bool) {
        for _ in 0..500 {
            if done(&hub.status()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("gave up waiting: {:?}", hub.status());
    }

    #[test]
    fn follow_streams_filtered_events_until_the_client_closes() {
        let hub = EventHub::new(16, 2);
        let server_hub = hub.clone();
        let server = Running::start(move |s| s.with_events(server_hub));
        let mut all = client::follow(&server.path, Value::Null, T).unwrap();
        let mut shop =
            client::follow(&server.path, json!({"filter": {"namespace": "shop"}}), T).unwrap();
        assert_eq!(all.accepted().buffer, 16);
        assert_ne!(all.accepted().follower, shop.accepted().follower);
        // A third follower is refused, by kind.
        let error = client::follow(&server.path, Value::Null, T).unwrap_err();
        let ClientError::Remote { error, .. } = &error else {
            panic!("{error:?}")
        };
        assert_eq!(error.code, ErrorCode::ResourceExhausted);
        for (n, namespace) in [(1, "shop"), (2, "web"), (3, "shop")] {
            hub.publish(|| Rec { namespace, n });
        }
        for n in 1..=3 {
            assert_eq!(all.next_event().unwrap().unwrap()["n"], n);
        }
        for n in [1, 3] {
            let event = shop.next_event().unwrap().unwrap();
            assert_eq!(event, json!({"type": "rec", "namespace": "shop", "n": n}));
        }
        let ids = [all.accepted().follower, shop.accepted().follower];
        wait_for(&hub, |s| {
            s.followers.iter().map(|f| f.sent).sum::<u64>() == 5
        });
        assert_eq!(
            hub.status().followers,
            [
                follow::FollowerStatus {
                    id: ids[0],
                    sent: 3,
                    lost: 0
                },
                follow::FollowerStatus {
                    id: ids[1],
                    sent: 2,
                    lost: 0
                },
            ]
        );
        // Closing ends the follow in the agent.
        drop(all);
        wait_for(&hub, |s| s.followers.len() == 1);
        // A bad filter is refused before anything streams.
        let error =
            client::follow(&server.path, json!({"filter": {"cause": ["sooner"]}}), T).unwrap_err();
        assert!(
            error.to_string().contains("unknown cause \"sooner\""),
            "{error}"
        );
    }

    #[test]
    fn a_follower_that_never_reads_loses_events_and_blocks_no_one() {
        let hub = EventHub::new(64, 4);
        let server_hub = hub.clone();
        let server = Running::start(move |s| s.with_events(server_hub));
        // The stuck follower: asks, then never reads.
        let mut stuck = std::os::unix::net::UnixStream::connect(&server.path).unwrap();
        stuck
            .write_all(b"{\"version\":1,\"method\":\"follow\"}\n")
            .unwrap();
        wait_for(&hub, |s| s.followers.len() == 1);
        let mut live = client::follow(&server.path, Value::Null, T).unwrap();
        // Enough to fill the stuck socket's buffers many times over.
        let total = 20_000;
        let mut received = 0;
        for n in 0..total {
            hub.publish(|| Rec {
                namespace: "shop",
                n,
            });
            // The live follower keeps up: read as we go.
            if n % 32 == 31 {
                while received < n + 1 {
                    let event = live.next_event().unwrap().unwrap();
                    assert_eq!(event["n"], received, "{event}");
                    received += 1;
                }
            }
        }
        while received < total {
            assert_eq!(live.next_event().unwrap().unwrap()["n"], received);
            received += 1;
        }
        // Other calls are served meanwhile.
        call(&server.path, method::DNS_TOP, Value::Null, T).unwrap();
        // Now the stuck follower reads everything: what it got and what it
        // was told it lost add up to every event.
        stuck.set_read_timeout(Some(T)).unwrap();
        let mut reader = std::io::BufReader::new(stuck);
        let mut text = String::new();
        std::io::BufRead::read_line(&mut reader, &mut text).unwrap();
        assert!(text.starts_with("{\"version\":1,\"ok\":true,"), "{text}");
        let (mut got, mut lost) = (0u64, 0u64);
        while got + lost < total {
            text.clear();
            std::io::BufRead::read_line(&mut reader, &mut text).unwrap();
            let event: Value = serde_json::from_str(&text).unwrap();
            match event["type"].as_str() {
                Some("lost") => lost += event["events"].as_u64().unwrap(),
                _ => got += 1,
            }
        }
        assert_eq!(got + lost, total);
        let status = hub.status();
        assert_eq!(status.published, total);
        let stuck_status = &status.followers[0];
        assert_eq!((stuck_status.lost, stuck_status.sent), (lost, got));
        assert!(lost > 0 && got > 0, "got {got}, lost {lost}");
        assert_eq!(status.followers[1].lost, 0);
    }

    #[test]
    fn stale_sockets_are_replaced_and_live_ones_kept() {
        let mut server = Running::start(|s| s);
        // A second agent on the same path must not steal the socket.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let Err(error) = ApiServer::bind(&server.path, Arc::new(Echo)) else {
            panic!("bound over a live agent")
        };
        assert!(matches!(error, ApiServerError::InUse { .. }), "{error:?}");

        // A socket file nobody listens on is replaced.
        server.stop();
        drop(std::os::unix::net::UnixListener::bind(&server.path).unwrap());
        let bound = ApiServer::bind(&server.path, Arc::new(Echo)).unwrap();
        assert_eq!(bound.path(), server.path);

        // A regular file is never removed.
        let file = server.path.with_file_name("not-a-socket");
        fs::write(&file, b"keep me").unwrap();
        let Err(error) = ApiServer::bind(&file, Arc::new(Echo)) else {
            panic!("replaced a file")
        };
        assert_eq!(
            error.to_string(),
            format!(
                "{} exists and is not a socket; refusing to replace it",
                file.display()
            )
        );
        assert_eq!(fs::read(&file).unwrap(), b"keep me");
    }
}
