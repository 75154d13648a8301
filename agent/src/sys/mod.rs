//! The system calls the agent makes from more than one subsystem, one
//! blocking netlink request loop ([`netlink`]), work in another network
//! namespace ([`netns`]), and interface indexes by name ([`ifindex`]).

pub mod ifindex;
pub mod netlink;
pub mod netns;

use std::{os::fd::RawFd, time::Duration};

/// Waits until `fd` is readable or `timeout` passes; true when readable.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    wait_readable_any(&[fd], timeout)
}

/// Waits until one of `fds` is readable or `timeout` passes; true when one is.
pub fn wait_readable_any(fds: &[RawFd], timeout: Duration) -> bool {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let count = libc::nfds_t::try_from(pfds.len()).unwrap_or(libc::nfds_t::MAX);
    // SAFETY: pfds is a valid pollfd array of `count` entries for the call's duration.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), count, ms) };
    rc > 0
}

/// The running kernel's release (`uname -r`), or `unknown`.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uts is a valid, writable utsname.
    if unsafe { libc::uname(&raw mut uts) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates release within the array.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
    release.to_string_lossy().into_owned()
}

/// Seconds since the Unix epoch by the wall clock (0 before it).
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_is_readable_once_written() {
        let mut fds = [0; 2];
        // SAFETY: fds is a writable array of two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert!(!wait_readable(fds[0], Duration::from_millis(1)));
        // SAFETY: fds[1] is the pipe's open write end; the buffer is one byte.
        assert_eq!(unsafe { libc::write(fds[1], [1u8].as_ptr().cast(), 1) }, 1);
        assert!(wait_readable(fds[0], Duration::from_millis(1)));
        for fd in fds {
            // SAFETY: fd is open and closed once.
            unsafe { libc::close(fd) };
        }
    }

    #[test]
    fn the_release_is_the_kernels() {
        let release = kernel_release();
        assert_eq!(
            release,
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap()
                .trim()
        );
    }
}
