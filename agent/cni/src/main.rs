//! podnet-cni: the CNI plugin (spec 1.1.0). Chained after ptp/bridge it
//! registers the pod's endpoint with the agent; as an `ipam` plugin it hands
//! out addresses from the agent's IPAM. Synchronous: no async runtime.
//! Results and errors go to stdout, logs to the configured file.

use std::{
    io::{Read as _, Write as _},
    process::ExitCode,
};

use podnet_cni::{
    entry::{self, SocketAgent},
    spec::MAX_STDIN_BYTES,
};

fn main() -> ExitCode {
    let vars: std::collections::HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let mut stdin = Vec::new();
    // One byte more than allowed, so an oversized config is reported as such.
    let limit = u64::try_from(MAX_STDIN_BYTES + 1).unwrap_or(u64::MAX);
    if let Err(e) = std::io::stdin().take(limit).read_to_end(&mut stdin) {
        stdin.clear();
        // Not eprintln!: it panics when stderr is closed.
        let _ = writeln!(std::io::stderr(), "podnet-cni: reading stdin: {e}");
    }
    let outcome = entry::execute(&vars, &stdin, &|keys| {
        Box::new(SocketAgent {
            socket: keys.socket.clone().into(),
            timeout: keys.timeout,
        })
    });
    // Not println!: it panics when the runtime has closed stdout (EPIPE).
    if let Err(e) = entry::write_stdout(&mut std::io::stdout().lock(), &outcome) {
        // The runtime never sees the result: the call fails whatever it did.
        entry::log_undelivered(&vars, &outcome, &e);
        let _ = writeln!(std::io::stderr(), "podnet-cni: writing stdout: {e}");
        return ExitCode::FAILURE;
    }
    if outcome.exit_code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
