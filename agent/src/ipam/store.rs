//! The checkpoint in `--state-dir`: allocations, cooldowns and the endpoints
//! podnet-cni registered, as one versioned JSON document written atomically
//! (temp file, fsync, rename, directory fsync), and the lock file that keeps a
//! second agent away from it.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::io::AsRawFd as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::allocator::AllocatorState;
use podnet_api::endpoint::EndpointRecord;

/// The checkpoint format this build reads and writes.
pub const CHECKPOINT_VERSION: u32 = 1;
/// File name of the checkpoint inside the state directory.
pub const CHECKPOINT_FILE: &str = "ipam.json";
/// File name of the lock inside the state directory.
pub const LOCK_FILE: &str = "agent.lock";
/// Test fault: milliseconds added to every fsync of the checkpoint (file
/// and directory), as a slow disk would. Read once at start; unset in
/// production.
pub const FSYNC_DELAY_ENV: &str = "PODNET_FAULTS_FSYNC_DELAY_MS";

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The checkpoint could not be read.
    #[error("reading checkpoint {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The checkpoint is not valid JSON of the expected shape.
    #[error("checkpoint {path} is corrupt ({message}); the agent will not start over it. The file is kept as it is: inspect it, and move it away only if every pod on this node is gone")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The checkpoint was written by a build with another format.
    #[error("checkpoint {path} has version {found}, this agent reads version {CHECKPOINT_VERSION} only; run a podnet-agent that knows version {found}. The file is kept")]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u64,
    },
    /// Writing the checkpoint failed; memory was left as it was before the change.
    #[error("writing checkpoint {path}: {source}; the change was not applied, retry later")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why (e.g. no space left on device).
        source: io::Error,
    },
    /// The state directory could not be created or locked.
    #[error("state directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another agent holds the lock.
    #[error("another podnet-agent holds {path}; only one agent may use a state directory")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
}

/// What the checkpoint holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Always [`CHECKPOINT_VERSION`].
    pub version: u32,
    /// Allocations and cooldowns.
    #[serde(flatten)]
    pub ipam: AllocatorState,
    /// Endpoints registered by podnet-cni.
    #[serde(default)]
    pub endpoints: Vec<EndpointRecord>,
}

/// The file operations the store needs, so tests can make them fail.
pub trait StateFs: Send + Sync + std::fmt::Debug {
    /// The file's bytes, `None` when it does not exist.
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Replaces the file with `bytes` so that a crash leaves either the old
    /// or the new content.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs {
    /// Added to every fsync ([`FSYNC_DELAY_ENV`]); zero in production.
    pub fsync_delay: std::time::Duration,
}

impl RealFs {
    /// The real file system, slowed down as [`FSYNC_DELAY_ENV`] asks.
    pub fn from_env() -> Self {
        let ms = std::env::var(FSYNC_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if ms > 0 {
            tracing::warn!(
                ms,
                "{FSYNC_DELAY_ENV} is set: every checkpoint fsync is delayed (a test fault)"
            );
        }
        Self {
            fsync_delay: std::time::Duration::from_millis(ms),
        }
    }

    fn sync(&self, f: &File) -> io::Result<()> {
        f.sync_all()?;
        if !self.fsync_delay.is_zero() {
            std::thread::sleep(self.fsync_delay);
        }
        Ok(())
    }
}

impl StateFs for RealFs {
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp"));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(bytes)?;
            self.sync(&f)?;
            drop(f);
            fs::rename(&tmp, path)?;
            self.sync(&File::open(dir)?)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// Reads and writes the checkpoint.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    fs: Box<dyn StateFs>,
}

impl Store {
    /// The checkpoint in `dir`.
    pub fn new(dir: &Path, fs: Box<dyn StateFs>) -> Self {
        Self {
            path: dir.join(CHECKPOINT_FILE),
            fs,
        }
    }

    /// The checkpoint's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint, or `None` on a first start.
    pub fn load(&self) -> Result<Option<Checkpoint>, StoreError> {
        let Some(bytes) = self
            .fs
            .read(&self.path)
            .map_err(|source| StoreError::Read {
                path: self.path.clone(),
                source,
            })?
        else {
            return Ok(None);
        };
        parse(&self.path, &bytes).map(Some)
    }

    /// Writes `checkpoint` atomically.
    pub fn save(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        let write_error = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let mut bytes =
            serde_json::to_vec(checkpoint).map_err(|e| write_error(io::Error::other(e)))?;
        bytes.push(b'\n');
        self.fs
            .write_atomic(&self.path, &bytes)
            .map_err(write_error)
    }
}

/// Decodes a checkpoint: the version first, so a newer format is named as
/// such rather than as corrupt.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Checkpoint, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        path: path.to_owned(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let version = value
        .get("version")
        .ok_or_else(|| corrupt("no \"version\" field".into()))?
        .as_u64()
        .ok_or_else(|| corrupt("\"version\" is not a number".into()))?;
    if version != u64::from(CHECKPOINT_VERSION) {
        return Err(StoreError::Version {
            path: path.to_owned(),
            found: version,
        });
    }
    serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))
}

/// An exclusive `flock` on the state directory's lock file, held while the
/// value lives (the kernel drops it when the process dies, even by SIGKILL).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// Creates `dir` if needed and takes its lock, failing at once when
    /// another process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, StoreError> {
        let dir_error = |source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(dir_error)?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(dir_error)?;
        // SAFETY: flock on a file descriptor this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(StoreError::Locked { path });
            }
            return Err(dir_error(e));
        }
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), Box::new(RealFs::default()));
        assert_eq!(store.load().unwrap(), None);
        let cp = Checkpoint {
            version: CHECKPOINT_VERSION,
            ..Checkpoint::default()
        };
        store.save(&cp).unwrap();
        let text = fs::read_to_string(store.path()).unwrap();
        assert_eq!(
            text,
            "{\"version\":1,\"allocations\":[],\"cooldowns\":[],\"endpoints\":[]}\n"
        );
        assert_eq!(store.load().unwrap(), Some(cp));

        fs::write(store.path(), b"{\"version\":2}").unwrap();
        let e = store.load().unwrap_err();
        assert!(matches!(e, StoreError::Version { found: 2, .. }), "{e}");
        fs::write(store.path(), b"{\"version\":1,\"allocations\":[{").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("is corrupt"), "{e}");
        assert!(e.contains("The file is kept"), "{e}");
        // Kept as it was.
        assert_eq!(
            fs::read(store.path()).unwrap(),
            b"{\"version\":1,\"allocations\":[{"
        );
    }

    #[test]
    fn a_second_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StateLock::acquire(dir.path()).unwrap();
        let e = StateLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Locked { .. }), "{e}");
        drop(lock);
        StateLock::acquire(dir.path()).unwrap();
    }
}
