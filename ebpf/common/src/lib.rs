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
