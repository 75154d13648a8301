//! The container runtime's answer to `ListPodSandbox` (gRPC frame and
//! protobuf message, any bytes) and the workload read from the labels it
//! carries never panic; a decoded answer encodes and decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podnet::pods::{cri, metadata_of};
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = cri::decode_list_response(data) else {
        return;
    };
    for sandbox in &answer.items {
        let _ = metadata_of(sandbox).workload();
    }
    let again = cri::frame(&answer.encode_to_vec()).expect("an answer that decoded fits a frame");
    assert_eq!(
        cri::decode_list_response(&again).expect("re-encoded answer decodes"),
        answer
    );
});
