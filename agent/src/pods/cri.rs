//! A client of the container runtime's CRI `RuntimeService`, for the one call
//! podnet makes: `ListPodSandbox`, each pod sandbox on this node with its
//! labels.
//!
//! gRPC is HTTP/2 with each protobuf message prefixed by a compressed flag
//! (one byte) and its length (four bytes, big endian), and the call's outcome
//! in the `grpc-status` trailer (gRPC over HTTP/2, `PROTOCOL-HTTP2.md` of
//! grpc/grpc). The messages are declared here with the fields podnet reads,
//! with their numbers in CRI's `api.proto` (package `runtime.v1`,
//! k8s.io/cri-api v0.34.4, `pkg/apis/runtime/v1/api.proto`): protobuf
//! decoders skip the fields a declaration leaves out.
//!
//! The runtime's answer is untrusted input: its size is capped, and the
//! decoding fails with an error, never a panic.

use std::{collections::BTreeMap, path::Path, time::Duration};

use bytes::{Buf as _, Bytes};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;

/// The CRI service's method podnet calls.
pub const LIST_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/ListPodSandbox";
/// The largest answer accepted, as gRPC's default receive limit (4 MiB): a
/// node's few hundred sandboxes take a few hundred KiB.
pub const MAX_RESPONSE: usize = 4 << 20;
/// How long one call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// `ListPodSandboxRequest` (api.proto: `PodSandboxFilter filter = 1`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxRequest {
    /// Which sandboxes to list; all when absent.
    #[prost(message, optional, tag = "1")]
    pub filter: Option<PodSandboxFilter>,
}

/// `PodSandboxFilter` (api.proto: `string id = 1`; `state = 2` and
/// `label_selector = 3` are not used).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxFilter {
    /// One sandbox by id.
    #[prost(string, tag = "1")]
    pub id: String,
}

/// `ListPodSandboxResponse` (api.proto: `repeated PodSandbox items = 1`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxResponse {
    /// The sandboxes.
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

/// `PodSandbox` (api.proto: `string id = 1`, `PodSandboxMetadata metadata =
/// 2`, `PodSandboxState state = 3`, `int64 created_at = 4`, `map<string,
/// string> labels = 5`; `annotations = 6` and `runtime_handler = 7` are not
/// read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandbox {
    /// Sandbox id: the CNI container id of the pod's network.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The pod's name, uid and namespace.
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    /// `SANDBOX_READY` (0) or `SANDBOX_NOTREADY` (1).
    #[prost(int32, tag = "3")]
    pub state: i32,
    /// Creation time, Unix nanoseconds.
    #[prost(int64, tag = "4")]
    pub created_at: i64,
    /// The pod's labels, and the kubelet's `io.kubernetes.pod.*`.
    #[prost(btree_map = "string, string", tag = "5")]
    pub labels: BTreeMap<String, String>,
}

/// `PodSandboxMetadata` (api.proto: `name = 1`, `uid = 2`, `namespace = 3`,
/// `uint32 attempt = 4`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    /// Pod name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Pod uid.
    #[prost(string, tag = "2")]
    pub uid: String,
    /// Pod namespace.
    #[prost(string, tag = "3")]
    pub namespace: String,
    /// How many sandboxes the kubelet made for this pod before this one.
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

/// Errors of a CRI call.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The socket could not be reached.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// HTTP/2 failed.
    #[error("HTTP/2: {0}")]
    Http(String),
    /// The call took longer than [`CALL_TIMEOUT`].
    #[error("no answer within {CALL_TIMEOUT:?}")]
    Timeout,
    /// The runtime answered with a gRPC error.
    #[error("gRPC status {code}: {message}")]
    Status {
        /// `grpc-status`.
        code: u32,
        /// `grpc-message`.
        message: String,
    },
    /// The answer is not one well-formed gRPC message.
    #[error("malformed answer: {0}")]
    Malformed(String),
}

/// One gRPC message in its length-prefixed frame (uncompressed).
pub fn frame(message: &[u8]) -> Result<Bytes, CriError> {
    let len = u32::try_from(message.len())
        .map_err(|_| CriError::Malformed(format!("message of {} bytes", message.len())))?;
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Ok(out.into())
}

/// The one message of a unary call's answer body: exactly one frame,
/// uncompressed, at most [`MAX_RESPONSE`] bytes, nothing after it.
pub fn unframe(mut body: &[u8]) -> Result<&[u8], CriError> {
    if body.len() < 5 {
        return Err(CriError::Malformed(format!(
            "{} bytes, shorter than a frame header",
            body.len()
        )));
    }
    let compressed = body.get_u8();
    let len = usize::try_from(body.get_u32()).unwrap_or(usize::MAX);
    if compressed != 0 {
        return Err(CriError::Malformed(
            "compressed message (none was asked for)".into(),
        ));
    }
    if len > MAX_RESPONSE {
        return Err(CriError::Malformed(format!(
            "message of {len} bytes, over {MAX_RESPONSE}"
        )));
    }
    if body.len() != len {
        return Err(CriError::Malformed(format!(
            "frame says {len} bytes, body has {}",
            body.len()
        )));
    }
    Ok(body)
}

/// Decodes a `ListPodSandbox` answer body (frame and message).
pub fn decode_list_response(body: &[u8]) -> Result<ListPodSandboxResponse, CriError> {
    let message = unframe(body)?;
    ListPodSandboxResponse::decode(message).map_err(|e| CriError::Malformed(e.to_string()))
}

/// Lists the sandboxes on the runtime's socket `socket`: all of them, or the
/// one whose id is `id`. Runs on the caller's tokio runtime.
pub async fn list_pod_sandbox(
    socket: &Path,
    id: Option<&str>,
) -> Result<Vec<PodSandbox>, CriError> {
    let request = ListPodSandboxRequest {
        filter: id.map(|id| PodSandboxFilter { id: id.to_owned() }),
    };
    let body = tokio::time::timeout(
        CALL_TIMEOUT,
        unary(socket, LIST_POD_SANDBOX, &request.encode_to_vec()),
    )
    .await
    .map_err(|_| CriError::Timeout)??;
    Ok(decode_list_response(&body)?.items)
}

/// [`list_pod_sandbox`] for a caller outside any async runtime (a runtime of
/// its own for the call).
pub fn list_pod_sandbox_blocking(
    socket: &Path,
    id: Option<&str>,
) -> Result<Vec<PodSandbox>, CriError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CriError::Http(e.to_string()))?
        .block_on(list_pod_sandbox(socket, id))
}

/// One unary gRPC call over a new HTTP/2 connection to `socket`; the answer
/// body (frame included).
async fn unary(socket: &Path, path: &str, message: &[u8]) -> Result<Bytes, CriError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| CriError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| CriError::Http(e.to_string()))?;
    // The connection ends when `sender` is dropped at the end of the call.
    let driver = tokio::spawn(connection);
    let request = hyper::Request::post(format!("http://localhost{path}"))
        .header(hyper::header::CONTENT_TYPE, "application/grpc")
        .header(hyper::header::TE, "trailers")
        .body(Full::new(frame(message)?))
        .map_err(|e| CriError::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| CriError::Http(e.to_string()))?;
    let (head, body) = response.into_parts();
    if head.status != hyper::StatusCode::OK {
        return Err(CriError::Http(format!("HTTP status {}", head.status)));
    }
    // A frame header and its message at most.
    let collected = Limited::new(body, MAX_RESPONSE + 5)
        .collect()
        .await
        .map_err(|e| CriError::Http(e.to_string()))?;
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    drop(sender);
    driver.abort();
    // A call that failed at once answers with its status in the headers
    // ("Trailers-Only"); otherwise it is in the trailers.
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| head.headers.get("grpc-status"));
    let code = status
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| CriError::Malformed("no grpc-status".into()))?;
    if code != 0 {
        let message = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| head.headers.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        return Err(CriError::Status { code, message });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sandbox() -> PodSandbox {
        PodSandbox {
            id: "5f2c".into(),
            metadata: Some(PodSandboxMetadata {
                name: "cart-7d9f8b6c5d-x2k9p".into(),
                uid: "3b1e".into(),
                namespace: "shop".into(),
                attempt: 1,
            }),
            state: 0,
            created_at: 1_700_000_000_000_000_000,
            labels: [
                ("app".to_owned(), "cart".to_owned()),
                ("pod-template-hash".to_owned(), "7d9f8b6c5d".to_owned()),
            ]
            .into(),
        }
    }

    #[test]
    fn request_bytes_are_those_of_the_cri_schema() {
        // Field 1 (filter), length 6: field 1 (id), length 4, "5f2c".
        let request = ListPodSandboxRequest {
            filter: Some(PodSandboxFilter { id: "5f2c".into() }),
        };
        assert_eq!(
            frame(&request.encode_to_vec()).unwrap().as_ref(),
            [0, 0, 0, 0, 8, 0x0a, 6, 0x0a, 4, b'5', b'f', b'2', b'c']
        );
        assert!(ListPodSandboxRequest { filter: None }
            .encode_to_vec()
            .is_empty());
    }

    #[test]
    fn answers_decode_and_unknown_fields_are_skipped() {
        let answer = ListPodSandboxResponse {
            items: vec![sandbox()],
        };
        let mut message = answer.encode_to_vec();
        let decoded = decode_list_response(&frame(&message).unwrap()).unwrap();
        assert_eq!(decoded, answer);
        // An item with annotations (field 6) and runtime_handler (7) as a
        // runtime sends them: read the same.
        let mut item = sandbox().encode_to_vec();
        item.extend_from_slice(&[0x32, 6, 0x0a, 1, b'k', 0x12, 1, b'v']);
        item.extend_from_slice(&[0x3a, 4, b'r', b'u', b'n', b'c']);
        message.clear();
        message.push(0x0a);
        message.push(u8::try_from(item.len()).unwrap());
        message.extend_from_slice(&item);
        assert_eq!(
            decode_list_response(&frame(&message).unwrap()).unwrap(),
            answer
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        for (body, why) in [
            (&[0u8, 0, 0][..], "shorter than a frame header"),
            (&[1, 0, 0, 0, 0], "compressed"),
            (&[0, 0, 0, 0, 2, 0x0a], "frame says 2 bytes, body has 1"),
            (&[0, 0, 0, 0, 0, 0], "frame says 0 bytes, body has 1"),
            (&[0, 0xff, 0xff, 0xff, 0xff], "over"),
            (&[0, 0, 0, 0, 2, 0x0a, 0x05], "buffer underflow"),
        ] {
            let e = decode_list_response(body).unwrap_err().to_string();
            assert!(e.contains(why), "{body:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_answers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_list_response(&body);
            let _ = decode_list_response(&frame(&body).unwrap());
        }

        #[test]
        fn sandboxes_round_trip(
            id in "[a-f0-9]{0,64}",
            name in "\\PC{0,40}",
            labels in proptest::collection::btree_map("\\PC{0,20}", "\\PC{0,20}", 0..8),
            state in any::<i32>(),
        ) {
            let answer = ListPodSandboxResponse { items: vec![PodSandbox {
                id,
                metadata: Some(PodSandboxMetadata { name, ..PodSandboxMetadata::default() }),
                state,
                created_at: 0,
                labels,
            }]};
            let body = frame(&answer.encode_to_vec()).unwrap();
            prop_assert_eq!(decode_list_response(&body).unwrap(), answer);
        }
    }
}
