//! Types shared by podnet's kernel programs and its user-space agent.
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of fixed-width integers and
//! byte arrays, with explicit `_pad` fields so that the layout has no implicit
//! padding. Each type carries a `const` size assertion: a change of layout on one
//! side without the other fails to compile instead of misreading memory.
#![cfg_attr(not(test), no_std)]

pub mod conntrack;
pub mod dns;
pub mod steer;

/// Address family numbers as the kernel uses them (`AF_INET`, `AF_INET6`).
pub mod family {
    /// IPv4.
    pub const INET: u8 = 2;
    /// IPv6.
    pub const INET6: u8 = 10;
}

/// Implements `aya::Pod` for shared types when the `user` feature is on.
#[macro_export]
#[doc(hidden)]
macro_rules! impl_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, `Copy`, made only of integers and
            // byte arrays, and has no implicit padding (see its size assertion),
            // so every bit pattern is a valid value.
            unsafe impl aya::Pod for $t {}
        )*
    };
}

/// A pod address, as the agent lists the node's endpoints for the programs
/// (`CT_ENDPOINTS`, `DNS_ENDPOINTS`): a packet's source counts per pod only
/// when it is one of them; any other source (the host, a spoofed address)
/// counts under the one [`AddrKey::UNKNOWN`] key, so what a pod sends cannot
/// grow a map. IPv4 uses the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    /// The address.
    pub addr: [u8; 16],
    /// [`family`].
    pub family: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}

impl AddrKey {
    /// The key every address that is not an endpoint's folds into (all zero:
    /// user space labels it like host traffic).
    pub const UNKNOWN: [u8; 16] = [0; 16];
}

const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);

/// Capacity of each endpoint address map: addresses of the pods on one node.
pub const ENDPOINTS_CAPACITY: u32 = 4_096;

impl_pod!(AddrKey);
