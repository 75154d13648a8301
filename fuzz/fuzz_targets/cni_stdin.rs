//! podnet-cni's stdin parser: network configuration, prevResult, the
//! VERSION request and the environment parser never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podnet::cni::{env, plugin, spec};

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = spec::parse_netconf(data) {
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
        let _ = spec::parse_duration(text);
    }
});
