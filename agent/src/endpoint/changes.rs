//! Telling the subsystems' threads that the registry changed, without
//! polling: each subscriber holds an eventfd the registry signals on every
//! change, so a thread blocked in `poll` on its own descriptors (a netlink
//! socket, a ring buffer) wakes for registry changes too.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{Arc, Weak},
    time::Duration,
};

/// One subscriber's view of registry changes. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Changes {
    event: Arc<OwnedFd>,
}

impl Changes {
    pub(super) fn new() -> std::io::Result<(Self, Weak<OwnedFd>)> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor this function owns.
        let event = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let weak = Arc::downgrade(&event);
        Ok((Self { event }, weak))
    }

    /// The descriptor that is readable while a change is pending, for a
    /// `poll` over several sources.
    pub fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Whether the registry changed since the last call (resets it).
    pub fn take(&self) -> bool {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into `count`, a local u64; the descriptor is
        // a non-blocking eventfd this subscription owns.
        let n = unsafe {
            libc::read(
                self.fd(),
                (&raw mut count).cast::<libc::c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
        n == 8 && count > 0
    }

    /// Waits up to `timeout` for a change; true (and reset) if there was one.
    pub fn wait(&self, timeout: Duration) -> bool {
        crate::sys::wait_readable(self.fd(), timeout) && self.take()
    }
}

/// Signals every live subscriber; forgets the dropped ones.
pub(super) fn notify(subscribers: &mut Vec<Weak<OwnedFd>>) {
    subscribers.retain(|weak| {
        let Some(event) = weak.upgrade() else {
            return false;
        };
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one`, a local u64, to a live eventfd.
        // A full counter (EAGAIN) still leaves it readable, which is all a
        // subscriber needs.
        unsafe {
            libc::write(
                event.as_raw_fd(),
                (&raw const one).cast::<libc::c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
        true
    });
}
