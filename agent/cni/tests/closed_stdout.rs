//! The built binary against a runtime that closed its end of stdout: the
//! call fails with exit code 1 and a log line, and nothing panics.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    path::Path,
    process::{Command, Output, Stdio},
};

use podnet_api::protocol::Response;
use serde_json::json;

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth1","mac":"aa:bb:cc:dd:ee:ff"},{"name":"eth0","sandbox":"/proc/self/ns/net"}],"ips":[{"address":"10.244.1.5/24","gateway":"10.244.1.1","interface":1}]}"#;

/// An agent on `socket` that accepts every request (a chained ADD makes one
/// `endpoint.add` call).
fn serve(socket: &Path) {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut request = String::new();
            BufReader::new(&stream).read_line(&mut request).unwrap();
            let mut answer = serde_json::to_vec(&Response::success(json!({}))).unwrap();
            answer.push(b'\n');
            stream.write_all(&answer).unwrap();
        }
    });
}

/// A chained ADD through the built binary; `read_stdout: false` closes the
/// read end of its stdout before the plugin writes its result.
fn chained_add(dir: &Path, read_stdout: bool) -> Output {
    let socket = dir.join("agent.sock");
    let log = dir.join("cni.log");
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"net","type":"podnet-cni","socket":"{}","logFile":"{}","prevResult":{PREV}}}"#,
        socket.display(),
        log.display()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_podnet-cni"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "abc")
        .env("CNI_NETNS", "/proc/self/ns/net")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if !read_stdout {
        // The plugin writes only after it has read stdin to the end, so the
        // pipe is closed by then.
        drop(child.stdout.take());
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(conf.as_bytes()).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_fails_the_call_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    serve(&dir.path().join("agent.sock"));
    let log = dir.path().join("cni.log");

    // Read: the result arrives, the call succeeds.
    let out = chained_add(dir.path(), true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::from_str::<serde_json::Value>(PREV).unwrap()
    );
    assert_eq!(stderr, "");

    // Closed: the same call, its result undeliverable.
    let out = chained_add(dir.path(), false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr,
        "podnet-cni: writing stdout: Broken pipe (os error 32)\n"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    let results: Vec<&str> = logged
        .lines()
        .map(|l| l.split_once(" result=").unwrap().1)
        .collect();
    assert_eq!(
        results,
        [
            "ok",
            "ok",
            r#"undelivered msg="writing the result to stdout: Broken pipe (os error 32)""#
        ]
    );
}
