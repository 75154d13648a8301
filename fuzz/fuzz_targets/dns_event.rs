//! The agent's decoding of DNS events from the kernel: record layout, query
//! names from pods' packets (any bytes, any length), and the records built
//! from them never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podnet::{dns::decode, endpoint::Registry};

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = decode::decode(data) {
        let _ = decode::record_of(&event, &Registry::new(), 0);
    }
    if let Some((&len, name)) = data.split_first() {
        let _ = decode::name_from_wire(name, usize::from(len));
    }
});
