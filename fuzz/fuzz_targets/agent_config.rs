//! The agent's `--config` file (a ConfigMap, YAML): any bytes give a
//! configuration or a clear error, never a panic. An error about a document
//! that is a mapping names the offending key, and an accepted file resolves
//! against the defaults to a configuration or a clear error.
#![no_main]

use std::path::Path;

use clap::Parser as _;
use libfuzzer_sys::fuzz_target;
use podnet::config::{parse_config_file, AgentArgs, AgentConfig, ConfigError};

const PATH: &str = "/etc/podnet/config.yaml";

/// The keys of the top-level mapping when they are all strings.
fn top_level_keys(text: &str) -> Option<Vec<String>> {
    let serde_norway::Value::Mapping(map) = serde_norway::from_str(text).ok()? else {
        return None;
    };
    map.keys()
        .map(|k| k.as_str().map(ToOwned::to_owned))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    // The agent reads the file with read_to_string: it is text or a read error.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_config_file(Path::new(PATH), text) {
        Ok(file) => {
            // clap derive with no flags: only `PODNET_*` variables could add
            // any, and the fuzzer's environment has none.
            let args = AgentArgs::try_parse_from(["podnet-agent"]).expect("no flags");
            if let Err(e) = AgentConfig::resolve_with(args, file) {
                assert!(matches!(e, ConfigError::Invalid(_)), "{e}");
                assert!(!e.to_string().is_empty());
            }
        }
        Err(e) => {
            assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
            let message = e.to_string();
            assert!(
                message.starts_with(&format!("config file {PATH}: ")),
                "{message}"
            );
            if let Some(keys) = top_level_keys(text) {
                assert!(
                    keys.iter().any(|k| message.contains(k.as_str())),
                    "error {message:?} names none of the keys {keys:?}"
                );
            }
        }
    }
});
