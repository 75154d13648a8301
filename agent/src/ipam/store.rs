//! The checkpoint in `--state-dir`: allocations, cooldowns and the endpoints
//! podnet-cni registered, as one versioned JSON document written atomically
//! (temp file, fsync, rename, directory fsync), a second copy of it to fall
//! back on when the first is damaged, and the lock file that keeps a second
//! agent away from them.

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
/// File name of the copy of the last checkpoint written, read only when
/// [`CHECKPOINT_FILE`] is damaged.
pub const PREVIOUS_FILE: &str = "ipam.json.prev";
/// Where a damaged checkpoint is moved once the state was recovered from
/// [`PREVIOUS_FILE`], kept for inspection (replaced by the next damaged one).
pub const CORRUPT_FILE: &str = "ipam.json.corrupt";
/// Test fault: milliseconds added to every fsync of the checkpoint (file
/// and directory), as a slow disk would. Read once at start; unset in
/// production.
pub const FSYNC_DELAY_ENV: &str = "PODNET_FAULTS_FSYNC_DELAY_MS";
/// File name of the lock inside the state directory.
pub const LOCK_FILE: &str = "agent.lock";

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
    #[error("checkpoint {path} is corrupt ({message}); the agent will not start over it. The file is kept as it is: inspect it, and move it away (with {PREVIOUS_FILE} beside it) only if every pod on this node is gone")]
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
    /// The checkpoint and its copy are both unusable.
    #[error("checkpoint {path} is unusable ({current}) and so is its copy {previous_path} ({previous}); the agent will not start over them. Both files are kept as they are: inspect them, and move both away only if every pod on this node is gone")]
    BothUnusable {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong with it.
        current: String,
        /// The copy.
        previous_path: PathBuf,
        /// What is wrong with the copy (or that it does not exist).
        previous: String,
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
    /// or the new content, and the new content is on disk when it returns.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
    /// Replaces the file with `bytes` so that a crash leaves either the old
    /// or the new content, without waiting for the disk: for a copy whose
    /// original [`StateFs::write_atomic`] already made durable.
    fn write_copy(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.write_atomic(path, bytes)
    }
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
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

    /// Writes `bytes` to a temp file beside `path` and renames it over
    /// `path`, with fsyncs of the file and the directory when `durable`.
    fn replace(&self, path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
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
            if durable {
                self.sync(&f)?;
            }
            drop(f);
            fs::rename(&tmp, path)?;
            if durable {
                self.sync(&File::open(dir)?)?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
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
        self.replace(path, bytes, true)
    }

    /// The copy is not fsynced: on ext4 (data=ordered) the next checkpoint's
    /// journal commit writes its data before its rename, and it matters only
    /// when the fsynced original is damaged, so it costs no disk wait.
    fn write_copy(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.replace(path, bytes, false)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
}

/// Reads and writes the checkpoint.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    previous: PathBuf,
    corrupt: PathBuf,
    fs: Box<dyn StateFs>,
}

impl Store {
    /// The checkpoint in `dir`.
    pub fn new(dir: &Path, fs: Box<dyn StateFs>) -> Self {
        Self {
            path: dir.join(CHECKPOINT_FILE),
            previous: dir.join(PREVIOUS_FILE),
            corrupt: dir.join(CORRUPT_FILE),
            fs,
        }
    }

    /// The checkpoint's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of the checkpoint's copy.
    pub fn previous_path(&self) -> &Path {
        &self.previous
    }

    /// The checkpoint, or `None` on a first start.
    pub fn load(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.load_file(&self.path)
    }

    /// The checkpoint's copy, or `None` when there is none.
    pub fn load_previous(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.load_file(&self.previous)
    }

    fn load_file(&self, path: &Path) -> Result<Option<Checkpoint>, StoreError> {
        let Some(bytes) = self.fs.read(path).map_err(|source| StoreError::Read {
            path: path.to_owned(),
            source,
        })?
        else {
            return Ok(None);
        };
        parse(path, &bytes).map(Some)
    }

    /// Writes `checkpoint` atomically and durably, then its copy. A copy
    /// that cannot be written is logged, not an error: the checkpoint is.
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
            .map_err(write_error)?;
        if let Err(error) = self.fs.write_copy(&self.previous, &bytes) {
            tracing::warn!(%error, path = %self.previous.display(), "cannot write the checkpoint's copy; the checkpoint itself is written");
        }
        Ok(())
    }

    /// Moves the damaged checkpoint to [`CORRUPT_FILE`] for inspection.
    pub fn set_aside_corrupt(&self) -> Result<PathBuf, StoreError> {
        self.fs
            .rename(&self.path, &self.corrupt)
            .map_err(|source| StoreError::Write {
                path: self.corrupt.clone(),
                source,
            })?;
        Ok(self.corrupt.clone())
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
