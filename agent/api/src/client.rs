//! A small blocking client of the agent's socket API, for podnetctl and
//! podnet-cni (which has no async runtime).
//!
//! Every step (connect, write, read) shares one deadline, so a stuck agent
//! cannot hang a CNI call past its timeout. [`follow`] opens the one stream
//! (`follow`): its answer has the same deadline, its events none.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::protocol::{
    method, now_unix_ms, ApiError, FollowAccepted, Request, Response, MAX_RESPONSE_BYTES,
};

/// Longest event line a follower reads, newline included.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// How long a call waits for the agent when the caller has no better idea.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between connect attempts while the agent's accept queue is full.
const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// Errors of [`call`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: no file, or no process behind it.
    #[error("the podnet agent is not running: cannot connect to {path}: {source}")]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// `NotFound` or `ConnectionRefused`.
        #[source]
        source: io::Error,
    },
    /// The socket exists but this process may not use it.
    #[error(
        "permission denied connecting to the podnet agent at {path} (the API is for root only)"
    )]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// Connecting failed for another reason.
    #[error("cannot connect to the podnet agent at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The agent did not answer in time.
    #[error("the podnet agent at {path} did not answer within {timeout:?}")]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The call's timeout.
        timeout: Duration,
    },
    /// Reading or writing the connection failed.
    #[error("talking to the podnet agent at {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The agent's answer is not a valid response.
    #[error("invalid answer from the podnet agent at {path}: {message}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The agent answered with an error.
    #[error("the podnet agent failed {method}: {error}")]
    Remote {
        /// The method called.
        method: String,
        /// The agent's error.
        #[source]
        error: ApiError,
    },
}

/// Calls `method` with `params` on the agent listening on `socket` and
/// returns the result. The whole call (connect, write, read) takes at most
/// about `timeout`; the request carries the moment it gives up
/// ([`Request::deadline_unix_ms`]), so the agent does not start, or keep,
/// work nobody waits for.
pub fn call(
    socket: &Path,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value, ClientError> {
    let (call, mut stream) = Call::send(socket, method, params, timeout)?;
    let answer = call.read_line(&mut stream)?;
    let response: Response = serde_json::from_slice(&answer)
        .map_err(|e| call.protocol(format!("not a response: {e}")))?;
    response.into_result().map_err(|error| ClientError::Remote {
        method: method.to_owned(),
        error,
    })
}

/// Opens `follow` with `params` on the agent listening on `socket`: the
/// agent's answer must come within `timeout`, then events arrive as they
/// happen, without a deadline. Dropping the stream closes the connection,
/// which ends the follow in the agent.
pub fn follow(
    socket: &Path,
    params: Value,
    timeout: Duration,
) -> Result<FollowStream, ClientError> {
    let (call, stream) = Call::send(socket, method::FOLLOW, params, timeout)?;
    stream
        .set_read_timeout(Some(call.remaining()?))
        .map_err(|e| call.io(e))?;
    let mut follow = FollowStream {
        path: socket.to_owned(),
        reader: BufReader::new(stream),
        accepted: FollowAccepted {
            follower: 0,
            buffer: 0,
        },
    };
    let answer = follow
        .read_line()
        .map_err(|e| call.io(e))?
        .ok_or_else(|| call.protocol("the agent closed the connection without answering".into()))?;
    let response: Response = serde_json::from_slice(&answer)
        .map_err(|e| call.protocol(format!("not a response: {e}")))?;
    let result = response
        .into_result()
        .map_err(|error| ClientError::Remote {
            method: method::FOLLOW.to_owned(),
            error,
        })?;
    follow.accepted = serde_json::from_value(result)
        .map_err(|e| call.protocol(format!("not a follow answer: {e}")))?;
    follow
        .reader
        .get_ref()
        .set_read_timeout(None)
        .map_err(|e| call.io(e))?;
    Ok(follow)
}

/// An open `follow`: the agent's answer, then one event per line.
#[derive(Debug)]
pub struct FollowStream {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    accepted: FollowAccepted,
}

impl FollowStream {
    /// What the agent answered: the follower's number and its buffer.
    pub fn accepted(&self) -> FollowAccepted {
        self.accepted
    }

    /// Waits for the next event; `None` when the agent ended the stream
    /// (it stopped).
    pub fn next_event(&mut self) -> Result<Option<Value>, ClientError> {
        let read = self.read_line();
        let Some(line) = read.map_err(|source| ClientError::Io {
            path: self.path.clone(),
            source,
        })?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&line)
            .map(Some)
            .map_err(|e| ClientError::Protocol {
                path: self.path.clone(),
                message: format!("not an event: {e}"),
            })
    }

    /// One line without its newline, at most [`MAX_EVENT_BYTES`]; `None` at
    /// the end of the stream.
    fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let limit = u64::try_from(MAX_EVENT_BYTES).unwrap_or(u64::MAX);
        loop {
            match (&mut self.reader).take(limit).read_until(b'\n', &mut line) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
                Ok(_) => break,
            }
        }
        if line.is_empty() {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') && line.len() >= MAX_EVENT_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("event line longer than {MAX_EVENT_BYTES} bytes"),
            ));
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        Ok(Some(line))
    }
}

/// Connects to `socket` within `timeout`; used by the server to tell a live
/// agent from a stale socket file.
pub fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    Call {
        path: socket,
        timeout,
        deadline: Instant::now() + timeout,
    }
    .connect()
}

struct Call<'a> {
    path: &'a Path,
    timeout: Duration,
    deadline: Instant,
}

impl<'a> Call<'a> {
    /// Connects to the agent on `socket` and writes one request for `method`,
    /// carrying the moment the caller gives up; the call's deadline is
    /// `timeout` from now.
    fn send(
        socket: &'a Path,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<(Self, UnixStream), ClientError> {
        let call = Call {
            path: socket,
            timeout,
            deadline: Instant::now() + timeout,
        };
        let deadline_unix_ms =
            now_unix_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let mut stream = call.connect()?;
        let request = Request::new(method, params).with_deadline(deadline_unix_ms);
        // Serializing a struct of a number, a string and a JSON value cannot fail.
        let mut line = serde_json::to_vec(&request).map_err(|e| call.protocol(e.to_string()))?;
        line.push(b'\n');
        call.write(&mut stream, &line)?;
        Ok((call, stream))
    }

    fn remaining(&self) -> Result<Duration, ClientError> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| self.timed_out())
    }

    fn timed_out(&self) -> ClientError {
        ClientError::Timeout {
            path: self.path.to_owned(),
            timeout: self.timeout,
        }
    }

    fn io(&self, source: io::Error) -> ClientError {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            return self.timed_out();
        }
        ClientError::Io {
            path: self.path.to_owned(),
            source,
        }
    }

    fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol {
            path: self.path.to_owned(),
            message,
        }
    }

    /// `connect(2)` on a blocking Unix socket waits without limit while the
    /// listener's accept queue is full. A non-blocking socket returns `EAGAIN`
    /// instead (it never returns `EINPROGRESS` for Unix sockets), so retry
    /// until the deadline.
    fn connect(&self) -> Result<UnixStream, ClientError> {
        let connect_error = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                path: self.path.to_owned(),
                source,
            },
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                path: self.path.to_owned(),
            },
            _ => ClientError::Connect {
                path: self.path.to_owned(),
                source,
            },
        };
        let address = SockAddr::unix(self.path).map_err(connect_error)?;
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(connect_error)?;
        socket.set_nonblocking(true).map_err(connect_error)?;
        loop {
            match socket.connect(&address) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(self.remaining()?.min(CONNECT_RETRY));
                }
                Err(e) => return Err(connect_error(e)),
            }
        }
        socket.set_nonblocking(false).map_err(connect_error)?;
        Ok(UnixStream::from(socket))
    }

    fn write(&self, stream: &mut UnixStream, bytes: &[u8]) -> Result<(), ClientError> {
        stream
            .set_write_timeout(Some(self.remaining()?))
            .map_err(|e| self.io(e))?;
        match stream.write_all(bytes) {
            // The agent answers some errors (a rejected peer, an oversized
            // request) without reading everything and closes; the answer is
            // still queued for reading.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.io(e)),
            Ok(()) => Ok(()),
        }
    }

    /// Reads up to and without the first newline.
    fn read_line(&self, stream: &mut UnixStream) -> Result<Vec<u8>, ClientError> {
        let mut line = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            stream
                .set_read_timeout(Some(self.remaining()?))
                .map_err(|e| self.io(e))?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io(e)),
            };
            if n == 0 {
                if line.is_empty() {
                    return Err(self
                        .protocol("the agent closed the connection without answering".to_owned()));
                }
                // Not newline-terminated; let the JSON parser judge it.
                return Ok(line);
            }
            if let Some(end) = chunk[..n].iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&chunk[..end]);
                return Ok(line);
            }
            line.extend_from_slice(&chunk[..n]);
            if line.len() > MAX_RESPONSE_BYTES {
                return Err(self.protocol(format!("answer longer than {MAX_RESPONSE_BYTES} bytes")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_agent_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let error = call(&path, "status", Value::Null, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(error, ClientError::NotRunning { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            format!(
                "the podnet agent is not running: cannot connect to {}: No such file or directory (os error 2)",
                path.display()
            )
        );

        // A stale socket file with no process behind it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let error = call(&path, "status", Value::Null, Duration::from_secs(1)).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "the podnet agent is not running: cannot connect to {}: Connection refused (os error 111)",
                path.display()
            )
        );
    }

    #[test]
    fn a_stuck_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        // A listener that never accepts, with room for one queued connection.
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(0).unwrap();
        let timeout = Duration::from_millis(200);
        // The first call is queued by the kernel and waits for an answer...
        let error = call(&path, "status", Value::Null, timeout).unwrap_err();
        assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
        // ...the next one cannot even connect: the queue is full.
        let error = call(&path, "status", Value::Null, timeout).unwrap_err();
        assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            format!(
                "the podnet agent at {} did not answer within 200ms",
                path.display()
            )
        );
    }
}
