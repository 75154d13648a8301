//! `follow`: insert races, failed, slow and unanswered DNS queries, and
//! other netfilter drops, streamed to clients as they happen.
//!
//! The threads that fill the recent-race and slow-query logs also publish
//! each record to the [`EventHub`], a bounded broadcast: publishing never
//! blocks and never allocates per follower, since every follower reads the
//! same ring of [`BUFFER`] events. One that falls [`BUFFER`] events behind
//! loses the oldest and learns how many on its next read
//! (`tokio::sync::broadcast`'s lag), in a `{"type":"lost","events":N}` line.
//! At most [`MAX_FOLLOWERS`] follow at once. [`serve`] is the server's side
//! of one follow.
//!
//! A record is published as a [`Followed`] trait object, so the hub knows no
//! subsystem: each record says how it is filtered and written.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
    sync::broadcast::{self, error::RecvError},
};

use super::protocol::{
    method, ApiError, ErrorCode, EventFilter, FollowAccepted, FollowParams, Response,
};

/// A record followers receive.
pub trait Followed: Debug + Send + Sync {
    /// Whether `filter` selects it.
    fn matches(&self, filter: &EventFilter) -> bool;

    /// The record as one JSON object with its `type`, without a newline.
    fn to_line(&self) -> serde_json::Result<Vec<u8>>;
}

/// One published record, shared by every follower.
pub type Shared = Arc<dyn Followed>;

/// A record as a JSON object with a `type` field first.
pub fn tagged_line<T: Serialize>(kind: &str, record: &T) -> serde_json::Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Tagged<'a, T> {
        r#type: &'a str,
        #[serde(flatten)]
        record: &'a T,
    }
    serde_json::to_vec(&Tagged {
        r#type: kind,
        record,
    })
}

/// The `lost` line: the follower fell behind and lost `events` records
/// (counted before its filter).
pub fn lost_line(events: u64) -> Vec<u8> {
    format!("{{\"type\":\"lost\",\"events\":{events}}}").into_bytes()
}

/// Whether a record of pod `pod` (namespace, name), about `server` (a DNS
/// server or a race's destination), with `cause`, passes `filter`: every
/// field the filter sets must match.
pub fn matches_parts(
    filter: &EventFilter,
    pod: Option<(&str, &str)>,
    server: Option<SocketAddr>,
    cause: &str,
) -> bool {
    if let Some(namespace) = &filter.namespace {
        if pod.is_none_or(|(ns, _)| ns != namespace) {
            return false;
        }
    }
    if let Some(name) = &filter.pod {
        if pod.is_none_or(|(_, p)| p != name) {
            return false;
        }
    }
    if let Some(wanted) = &filter.server {
        let Some(server) = server else {
            return false;
        };
        let hit = match wanted.parse::<SocketAddr>() {
            Ok(exact) => exact == server,
            Err(_) => wanted.parse::<IpAddr>().is_ok_and(|ip| ip == server.ip()),
        };
        if !hit {
            return false;
        }
    }
    filter.cause.is_empty() || filter.cause.iter().any(|c| c == cause)
}

/// Events held for followers; a follower further behind loses the oldest.
pub const BUFFER: usize = 4096;
/// Followers served at once; one more is refused.
pub const MAX_FOLLOWERS: usize = 8;

/// What one follower was sent and lost.
#[derive(Debug, Default)]
struct Counts {
    sent: AtomicU64,
    lost: AtomicU64,
}

/// One follower as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FollowerStatus {
    /// The follower's number.
    pub id: u64,
    /// Events written to it (after its filter).
    pub sent: u64,
    /// Events it lost because it fell behind.
    pub lost: u64,
}

/// The hub as `status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HubStatus {
    /// Events published while at least one follower followed.
    pub published: u64,
    /// Events held for a follower that falls behind.
    pub buffer: usize,
    /// Followers served at once.
    pub max_followers: usize,
    /// The followers now.
    pub followers: Vec<FollowerStatus>,
}

#[derive(Debug)]
struct Inner {
    sender: broadcast::Sender<Shared>,
    published: AtomicU64,
    next_id: AtomicU64,
    followers: Mutex<BTreeMap<u64, Arc<Counts>>>,
    max_followers: usize,
    buffer: usize,
}

/// The broadcast of followed events. Cloning shares it.
#[derive(Clone, Debug)]
pub struct EventHub {
    inner: Arc<Inner>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new(BUFFER, MAX_FOLLOWERS)
    }
}

/// A follower was refused: [`MAX_FOLLOWERS`] already follow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} followers already follow; close one and retry")]
pub struct TooManyFollowers(pub usize);

impl EventHub {
    /// A hub holding `buffer` events for at most `max_followers` followers.
    pub fn new(buffer: usize, max_followers: usize) -> Self {
        let buffer = buffer.max(1);
        let (sender, _) = broadcast::channel(buffer);
        Self {
            inner: Arc::new(Inner {
                sender,
                published: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                followers: Mutex::new(BTreeMap::new()),
                max_followers,
                buffer,
            }),
        }
    }

    /// True while someone follows.
    pub fn has_followers(&self) -> bool {
        self.inner.sender.receiver_count() > 0
    }

    /// Publishes the record `make` builds, if anyone follows (so nothing is
    /// built or copied otherwise). Never blocks.
    pub fn publish<T: Followed + 'static>(&self, make: impl FnOnce() -> T) {
        if !self.has_followers() {
            return;
        }
        // An error means the last follower left meanwhile: nobody to tell.
        let record: Shared = Arc::new(make());
        if self.inner.sender.send(record).is_ok() {
            self.inner.published.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts following: events published from now on.
    pub fn subscribe(&self) -> Result<Follower, TooManyFollowers> {
        let mut followers = self
            .inner
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if followers.len() >= self.inner.max_followers {
            return Err(TooManyFollowers(followers.len()));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let counts = Arc::new(Counts::default());
        followers.insert(id, Arc::clone(&counts));
        Ok(Follower {
            id,
            untold: 0,
            receiver: self.inner.sender.subscribe(),
            counts,
            hub: Arc::clone(&self.inner),
        })
    }

    /// Events held for a follower that falls behind.
    pub fn buffer(&self) -> usize {
        self.inner.buffer
    }

    /// Published events and each follower's counts.
    pub fn status(&self) -> HubStatus {
        let followers = self
            .inner
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, c)| FollowerStatus {
                id: *id,
                sent: c.sent.load(Ordering::Relaxed),
                lost: c.lost.load(Ordering::Relaxed),
            })
            .collect();
        HubStatus {
            published: self.inner.published.load(Ordering::Relaxed),
            buffer: self.buffer(),
            max_followers: self.inner.max_followers,
            followers,
        }
    }
}

/// What a follower receives next.
#[derive(Debug)]
pub enum Next {
    /// A record.
    Event(Shared),
    /// The follower fell behind and lost this many events.
    Lost(u64),
    /// The hub is gone (the agent stops).
    Closed,
}

/// One follower; dropping it ends the follow.
#[derive(Debug)]
pub struct Follower {
    id: u64,
    /// Lost and not told yet.
    untold: u64,
    receiver: broadcast::Receiver<Shared>,
    counts: Arc<Counts>,
    hub: Arc<Inner>,
}

impl Follower {
    /// The follower's number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the next event, or the news that some were lost.
    pub async fn next(&mut self) -> Next {
        match self.receiver.recv().await {
            Ok(event) => Next::Event(event),
            Err(RecvError::Lagged(n)) => {
                self.counts.lost.fetch_add(n, Ordering::Relaxed);
                self.untold += n;
                Next::Lost(n)
            }
            Err(RecvError::Closed) => Next::Closed,
        }
    }

    /// The events lost since the follower was last told, and tells it.
    pub fn take_lost(&mut self) -> u64 {
        std::mem::take(&mut self.untold)
    }

    /// Counts one event written to the follower.
    pub fn sent(&self) {
        self.counts.sent.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.hub
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// Why a follow ended, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client closed the connection.
    ClientClosed,
    /// The agent stops.
    Shutdown,
    /// Writing to the client failed.
    WriteFailed,
}

/// Checks `params`, subscribes, answers, and streams until the client
/// closes or `shutdown` completes.
pub async fn serve(
    mut stream: UnixStream,
    hub: &EventHub,
    params: FollowParams,
    shutdown: impl Future<Output = ()>,
) -> Option<Ended> {
    if let Err(message) = params.filter.validate() {
        let error = ApiError::invalid_params(method::FOLLOW, message);
        write_line(&mut stream, &Response::failure(error)).await;
        return None;
    }
    let mut follower = match hub.subscribe() {
        Ok(follower) => follower,
        Err(e) => {
            let error = ApiError::new(ErrorCode::ResourceExhausted, e.to_string());
            write_line(&mut stream, &Response::failure(error)).await;
            return None;
        }
    };
    let accepted = FollowAccepted {
        follower: follower.id(),
        buffer: hub.buffer(),
    };
    let answer = serde_json::to_value(accepted).map_or_else(
        |e| Response::failure(ApiError::internal(e.to_string())),
        Response::success,
    );
    if !write_line(&mut stream, &answer).await {
        return Some(Ended::WriteFailed);
    }
    tracing::debug!(follower = follower.id(), filter = ?params.filter, "follow started");
    let (mut reader, mut writer) = stream.into_split();
    let mut ignored = [0u8; 256];
    tokio::pin!(shutdown);
    let ended = loop {
        let event = tokio::select! {
            () = &mut shutdown => break Ended::Shutdown,
            read = reader.read(&mut ignored) => match read {
                Ok(0) | Err(_) => break Ended::ClientClosed,
                Ok(_) => continue,
            },
            next = follower.next() => match next {
                Next::Event(event) if event.matches(&params.filter) => Some(event),
                Next::Event(_) => continue,
                Next::Lost(_) => None,
                Next::Closed => break Ended::Shutdown,
            },
        };
        let (mut line, record) = match event {
            Some(event) => match event.to_line() {
                Ok(line) => (line, true),
                Err(_) => continue,
            },
            None => (lost_line(follower.take_lost()), false),
        };
        line.push(b'\n');
        // While this write waits for a reader that does not read, the hub
        // goes on without this follower; the agent stopping still ends it,
        // and so does the client closing (the write fails).
        tokio::select! {
            () = &mut shutdown => break Ended::Shutdown,
            written = writer.write_all(&line) => if written.is_err() {
                break Ended::WriteFailed;
            },
        }
        if record {
            follower.sent();
        }
    };
    tracing::debug!(follower = follower.id(), ?ended, "follow ended");
    Some(ended)
}

/// Writes one JSON line; false when the client is gone.
async fn write_line(stream: &mut UnixStream, response: &Response) -> bool {
    let Ok(mut line) = serde_json::to_vec(response) else {
        return false;
    };
    line.push(b'\n');
    tokio::time::timeout(super::server::IO_TIMEOUT, stream.write_all(&line))
        .await
        .is_ok_and(|r| r.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize)]
    struct Rec {
        namespace: &'static str,
        n: u64,
    }

    impl Followed for Rec {
        fn matches(&self, filter: &EventFilter) -> bool {
            matches_parts(filter, Some((self.namespace, "p")), None, "slow")
        }
        fn to_line(&self) -> serde_json::Result<Vec<u8>> {
            tagged_line("rec", self)
        }
    }

    fn lost(n: u64) -> Rec {
        Rec { namespace: "a", n }
    }

    fn line(e: &Shared) -> String {
        String::from_utf8(e.to_line().unwrap()).unwrap()
    }

    #[test]
    fn nothing_is_built_without_followers() {
        let hub = EventHub::new(4, 2);
        hub.publish(|| -> Rec { unreachable!("built without a follower") });
        assert_eq!(hub.status().published, 0);
    }

    #[tokio::test]
    async fn a_follower_behind_loses_the_oldest_and_is_told_how_many() {
        let hub = EventHub::new(4, 2);
        let mut slow = hub.subscribe().unwrap();
        let mut fast = hub.subscribe().unwrap();
        for n in 0..10 {
            hub.publish(|| lost(n));
            // The fast follower reads each event as it comes.
            let Next::Event(e) = fast.next().await else {
                panic!("fast follower lagged")
            };
            assert_eq!(
                line(&e),
                format!("{{\"type\":\"rec\",\"namespace\":\"a\",\"n\":{n}}}")
            );
            fast.sent();
        }
        // The slow one gets the news first, then the newest four.
        assert!(matches!(slow.next().await, Next::Lost(6)));
        for n in 6..10 {
            let Next::Event(e) = slow.next().await else {
                panic!()
            };
            assert_eq!(line(&e), line(&(Arc::new(lost(n)) as Shared)));
        }
        let status = hub.status();
        assert_eq!(status.published, 10);
        assert_eq!(
            status.followers,
            [
                FollowerStatus {
                    id: slow.id(),
                    sent: 0,
                    lost: 6
                },
                FollowerStatus {
                    id: fast.id(),
                    sent: 10,
                    lost: 0
                },
            ]
        );
    }

    #[test]
    fn followers_are_bounded_and_leaving_frees_a_place() {
        let hub = EventHub::new(4, 2);
        let a = hub.subscribe().unwrap();
        let _b = hub.subscribe().unwrap();
        assert_eq!(hub.subscribe().unwrap_err(), TooManyFollowers(2));
        drop(a);
        assert_eq!(hub.status().followers.len(), 1);
        assert!(hub.subscribe().is_ok());
    }
}
