//! Helpers shared by podnet's kernel programs.
#![no_std]

pub mod read;

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
