//! Work inside another network namespace without moving the caller.

use std::{fs::File, io, os::fd::AsRawFd, path::Path};

/// Runs `work` on a new thread that first enters the network namespace at
/// `path` (an nsfs file such as `/run/netns/cni-...`); the calling thread
/// stays where it is. Sockets `work` opens belong to that namespace.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let file = File::open(path)?;
    std::thread::Builder::new()
        .name("podnet-netns".into())
        .spawn(move || {
            // SAFETY: `file` is an open descriptor for the whole call; setns
            // changes only this thread's network namespace, and the thread
            // ends once `work` returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(work())
        })?
        .join()
        .map_err(|_| io::Error::other("the thread in the namespace panicked"))?
}
