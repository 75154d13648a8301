//! The bpffs mount and podnet's pin directories.

use std::path::{Path, PathBuf};

use super::BpfError;

/// Where the kernel's BPF filesystem is conventionally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn fs_error(path: &Path, message: impl Into<String>) -> BpfError {
    BpfError::Fs {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// True when `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    filesystem_magic(path) == Some(BPF_FS_MAGIC)
}

pub use podnet_api::sys::filesystem_magic;

/// Makes sure `dir` exists on a bpf filesystem: mounts bpffs at
/// [`BPFFS_ROOT`] when nothing is mounted there and `dir` lies below it.
pub fn prepare_pin_dir(dir: &Path) -> Result<PathBuf, BpfError> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && !is_bpffs(root) {
        mount_bpffs(root)?;
        tracing::info!(path = BPFFS_ROOT, "mounted bpffs");
    }
    std::fs::create_dir_all(dir).map_err(|e| fs_error(dir, format!("create: {e}")))?;
    if !is_bpffs(dir) {
        return Err(fs_error(
            dir,
            "is not on a bpf filesystem (mount -t bpf bpf <dir>)",
        ));
    }
    Ok(dir.to_owned())
}

fn mount_bpffs(root: &Path) -> Result<(), BpfError> {
    std::fs::create_dir_all(root).map_err(|e| fs_error(root, format!("create: {e}")))?;
    let target = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|_| fs_error(root, "path contains NUL"))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration
    // of the call; data is null, which bpffs accepts.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fs_error(
            root,
            format!("mount bpffs: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(())
}

/// Why `dir` cannot hold pins any more (bpffs unmounted or the directory
/// removed under the agent), or `None` while it is on a bpf filesystem.
///
/// Links the agent holds open keep running in that state, but nothing is
/// pinned: a restart would start over without them.
pub fn pin_dir_problem(dir: &Path) -> Option<String> {
    (!is_bpffs(dir)).then(|| {
        format!(
            "pin directory {} is no longer on a bpf filesystem (bpffs unmounted?); programs keep running while this agent runs, remount bpffs and restart the agent to pin them again",
            dir.display()
        )
    })
}

/// Removes a pin directory and everything pinned in it (uninstall).
pub fn remove_pins(dir: &Path) -> Result<(), BpfError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(fs_error(dir, format!("remove: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_a_pin_dir_problem() {
        let dir = tempfile::tempdir().unwrap();
        let problem = pin_dir_problem(dir.path()).unwrap();
        assert!(
            problem.contains(&dir.path().display().to_string()),
            "{problem}"
        );
        assert!(problem.contains("bpffs unmounted"), "{problem}");
        assert!(pin_dir_problem(Path::new("/nonexistent/podnet")).is_some());
    }
}
