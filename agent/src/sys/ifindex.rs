//! Interface indexes by name through one socket kept open: a reconcile over a
//! thousand pods looks up two thousand names, and `if_nametoindex` opens and
//! closes a socket for each (three system calls), while listing every
//! interface costs a netlink dump of all their attributes.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// Looks interface names up in the network namespace the socket was opened
/// in (the calling thread's at [`IfIndexes::open`]).
#[derive(Debug)]
pub struct IfIndexes {
    socket: OwnedFd,
}

impl IfIndexes {
    /// Opens the socket the lookups go through.
    pub fn open() -> std::io::Result<Self> {
        // SAFETY: socket takes no pointers; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor this function owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { socket })
    }

    /// The index of interface `name`, or `None` when there is no such
    /// interface (or the name cannot be one: empty, too long, or holding NUL).
    pub fn get(&self, name: &str) -> Option<u32> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return None;
        }
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in req.ifr_name.iter_mut().zip(bytes) {
            *slot = libc::c_char::from_ne_bytes([*byte]);
        }
        // SAFETY: `req` is a valid ifreq whose name is NUL-terminated (checked
        // shorter than IFNAMSIZ above); SIOCGIFINDEX writes only its union.
        let rc = unsafe { libc::ioctl(self.socket.as_raw_fd(), libc::SIOCGIFINDEX, &raw mut req) };
        if rc != 0 {
            return None;
        }
        // SAFETY: a successful SIOCGIFINDEX set the union's index member.
        let index = unsafe { req.ifr_ifru.ifru_ifindex };
        u32::try_from(index).ok().filter(|i| *i != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_and_odd_names_are_not() {
        let indexes = IfIndexes::open().unwrap();
        assert_eq!(indexes.get("lo"), Some(1));
        assert_eq!(indexes.get(""), None);
        assert_eq!(indexes.get("no-such-if0"), None);
        assert_eq!(indexes.get("a\0b"), None);
        assert_eq!(indexes.get("a-name-far-too-long-for-an-interface"), None);
    }
}
