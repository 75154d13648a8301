//! Helpers shared by podnet's kernel programs.
#![no_std]

pub mod read;

use aya_ebpf::maps::RingBuf;

/// `BPF_RB_NO_WAKEUP` / `BPF_RB_FORCE_WAKEUP` (uapi bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// `BPF_RB_AVAIL_DATA` for `bpf_ringbuf_query`.
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Pending bytes at which the consumer is woken; below it, it finds events
/// on its periodic poll (at least every 100 ms in user space). Waking the
/// consumer for every event costs microseconds per event in irq_work
/// (measured: 4.6 to 7.0 µs per race event against about 1 µs without).
pub const WAKEUP_BYTES: u64 = 64 * 1024;

/// The flags to submit a ring-buffer record with: wake the consumer only
/// once [`WAKEUP_BYTES`] are pending.
#[inline(always)]
pub fn submit_flags(ring: &RingBuf) -> u64 {
    if ring.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Whether `port` is in `ports`, a configured list padded with zeros.
#[inline(always)]
pub fn port_listed<const N: usize>(ports: &[u16; N], port: u16) -> bool {
    let mut i = 0;
    // A constant bound the verifier can follow.
    while i < N {
        if ports[i] != 0 && ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}
