//! The one system fact both sides of the API check: which filesystem a path
//! is on (bpffs for the agent's pins, nsfs for a CNI call's network namespace).

use std::path::Path;

/// `NSFS_MAGIC` from include/uapi/linux/magic.h: the filesystem of
/// namespace files (`/proc/<pid>/ns/*` and their bind mounts).
pub const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The magic number (`statfs`'s `f_type`, as in include/uapi/linux/magic.h)
/// of the filesystem `path` is on, or `None` when `path` cannot be statted.
pub fn filesystem_magic(path: &Path) -> Option<i64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs only writes into `buf`, a properly sized local.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string; buf is writable.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &raw mut buf) };
    #[allow(clippy::useless_conversion)] // f_type's width differs per libc target.
    (rc == 0).then(|| i64::from(buf.f_type))
}
