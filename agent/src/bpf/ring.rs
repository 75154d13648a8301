//! One reader for the kernel programs' ring buffers, on a dedicated thread.

use std::{os::fd::AsRawFd as _, time::Duration};

use aya::maps::{MapData, RingBuf};

/// A ring buffer and how long a read waits for the kernel's wake-up.
pub struct RingReader {
    ring: RingBuf<MapData>,
    wait: Duration,
}

impl RingReader {
    /// Reads `ring`, waiting at most `wait` per [`RingReader::read`] (the
    /// kernel wakes the reader earlier when enough data is pending).
    pub fn new(ring: RingBuf<MapData>, wait: Duration) -> Self {
        Self { ring, wait }
    }

    /// Waits until the kernel signals records or the wait passes, then hands
    /// every pending record to `on_record`; returns how many there were.
    pub fn read(&mut self, on_record: impl FnMut(&[u8])) -> usize {
        crate::sys::wait_readable(self.ring.as_raw_fd(), self.wait);
        self.drain(on_record)
    }

    /// Hands every pending record to `on_record` without waiting.
    pub fn drain(&mut self, mut on_record: impl FnMut(&[u8])) -> usize {
        let mut records = 0;
        while let Some(item) = self.ring.next() {
            records += 1;
            on_record(&item);
        }
        records
    }
}
