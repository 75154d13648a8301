//! podnet-cni's stdin parser: network configuration (netconf: both roles and
//! podnet's keys), prevResult, the VERSION request and the environment parser
//! never panic.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use podnet_cni::{env, plugin, spec};

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = spec::parse_netconf(data) {
        // podnet's keys (socket, logFile, timeout) from the role's section are
        // usable whenever the configuration is accepted.
        let timeout = conf.keys.timeout;
        assert!(
            (Duration::from_millis(1)..=Duration::from_secs(60)).contains(&timeout),
            "{timeout:?}"
        );
        assert!(!conf.keys.socket.is_empty() && !conf.keys.socket.contains('\0'));
        assert!(!conf.keys.log_file.is_empty() && !conf.keys.log_file.contains('\0'));
        if let Some(prev) = &conf.prev_result {
            if let Ok(result) = spec::parse_prev_result(prev) {
                let _ = spec::attachment(&result, "eth0");
            }
        }
    }
    let _ = plugin::version_request(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = env::parse_args(text);
        let _ = env::validate_container_id(text);
        let _ = env::validate_if_name(text);
        let _ = podnet_api::duration::parse(text);
    }
});
