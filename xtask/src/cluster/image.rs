//! Container images built without a registry or a daemon: a root filesystem put together
//! from the project's binaries and files of Debian's packages as installed on this machine
//! (each executable with the shared libraries `ldd` names), written as one uncompressed
//! layer in an OCI image layout archive that `ctr images import` takes.
//!
//! The archive is reproducible: entries sorted, owner root, modification time 0.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use sha2::{Digest as _, Sha256};

use crate::cmd;

/// What goes into an image's root filesystem.
#[derive(Debug, Default)]
pub struct RootFs {
    /// Path in the image (absolute) -> entry.
    entries: BTreeMap<PathBuf, Entry>,
}

#[derive(Debug, Clone)]
enum Entry {
    File { source: PathBuf, mode: u32 },
    Symlink { target: PathBuf },
    Dir { mode: u32 },
}

impl RootFs {
    /// Copies `source` to `dest` in the image with `mode`.
    pub fn file(&mut self, source: impl Into<PathBuf>, dest: impl Into<PathBuf>, mode: u32) {
        self.entries.insert(
            dest.into(),
            Entry::File {
                source: source.into(),
                mode,
            },
        );
    }

    /// A symbolic link `dest -> target`.
    pub fn symlink(&mut self, dest: impl Into<PathBuf>, target: impl Into<PathBuf>) {
        self.entries.insert(
            dest.into(),
            Entry::Symlink {
                target: target.into(),
            },
        );
    }

    /// An empty directory `dest` with `mode` (e.g. `/tmp`, 0o1777).
    pub fn dir(&mut self, dest: impl Into<PathBuf>, mode: u32) {
        self.entries.insert(dest.into(), Entry::Dir { mode });
    }

    /// Copies the executable `source` to `dest` together with every shared library it loads
    /// (at the paths where this machine has them) and the dynamic loader.
    pub fn executable(&mut self, source: &Path, dest: impl Into<PathBuf>) -> Result<()> {
        self.file(source, dest, 0o755);
        self.libraries_of(source)
    }

    /// Adds the shared libraries `binary` loads, as `ldd` resolves them here.
    pub fn libraries_of(&mut self, binary: &Path) -> Result<()> {
        for library in shared_libraries(binary)? {
            let real = fs::canonicalize(&library)
                .with_context(|| format!("resolving {}", library.display()))?;
            // At the name the loader asks for (e.g. /lib64/ld-linux-x86-64.so.2), with
            // the content of the file that name resolves to here.
            self.file(real, library, 0o755);
        }
        Ok(())
    }

    /// busybox (Debian's static build) at `/bin/busybox`, with a link per applet in `/bin`.
    pub fn busybox(&mut self) -> Result<()> {
        let busybox = Path::new("/bin/busybox");
        self.file(busybox, "/bin/busybox", 0o755);
        let applets = cmd::stdout(Command::new(busybox).arg("--list"))?;
        for applet in applets.split_whitespace() {
            if applet != "busybox" {
                self.symlink(Path::new("/bin").join(applet), "busybox");
            }
        }
        Ok(())
    }

    /// Writes the layer tar: parent directories first (mode 0755), then every entry.
    fn layer(&self) -> Result<Vec<u8>> {
        let mut dirs = BTreeSet::new();
        for path in self.entries.keys() {
            let mut parent = path.parent();
            while let Some(dir) = parent {
                if dir != Path::new("/") {
                    dirs.insert(dir.to_path_buf());
                }
                parent = dir.parent();
            }
        }
        dirs.retain(|dir| !self.entries.contains_key(dir));
        let mut tar = tar::Builder::new(Vec::new());
        for dir in &dirs {
            let mut header = header(tar::EntryType::Directory, 0o755, 0);
            tar.append_data(&mut header, relative(dir), std::io::empty())?;
        }
        for (path, entry) in &self.entries {
            match entry {
                Entry::File { source, mode } => {
                    let data = fs::read(source)
                        .with_context(|| format!("reading {}", source.display()))?;
                    let mut header = header(tar::EntryType::Regular, *mode, data.len() as u64);
                    tar.append_data(&mut header, relative(path), data.as_slice())?;
                }
                Entry::Symlink { target } => {
                    let mut header = header(tar::EntryType::Symlink, 0o777, 0);
                    tar.append_link(&mut header, relative(path), target)?;
                }
                Entry::Dir { mode } => {
                    let mut header = header(tar::EntryType::Directory, *mode, 0);
                    tar.append_data(&mut header, relative(path), std::io::empty())?;
                }
            }
        }
        Ok(tar.into_inner()?)
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

fn relative(path: &Path) -> &Path {
    path.strip_prefix("/").unwrap_or(path)
}

/// The shared libraries `ldd` resolves for `binary` (none for a static binary).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // ldd exits 1 with "not a dynamic executable" for static binaries.
        return Ok(Vec::new());
    }
    let libraries = parse_ldd(&text);
    if text.contains("not found") {
        bail!("ldd {}: a library is missing:\n{text}", binary.display());
    }
    Ok(libraries)
}

/// Absolute library paths in `ldd` output (`name => /path (addr)` and `/path (addr)` lines).
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// An image: a name, a root filesystem and how it starts.
#[derive(Debug)]
pub struct Image {
    /// Full reference, e.g. `localhost/podnet:e2e`.
    pub reference: String,
    /// The root filesystem.
    pub rootfs: RootFs,
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Env`.
    pub env: Vec<String>,
}

/// `PATH` in every image.
pub const IMAGE_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Image {
    /// Writes the image as an OCI image layout archive at `archive`.
    pub fn write_archive(&self, archive: &Path) -> Result<()> {
        let layer = self.rootfs.layer()?;
        let layer_digest = sha256(&layer);
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": self.entrypoint,
                "Env": self.env,
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created_by": "cargo xtask cluster (podnet)"}],
        });
        let config = serde_json::to_vec(&config)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(&config),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        });
        let manifest = serde_json::to_vec(&manifest)?;
        let tag = self
            .reference
            .rsplit_once(':')
            .map_or("latest", |(_, tag)| tag);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256(&manifest),
                "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": self.reference,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        });
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |name: String, data: &[u8]| -> Result<()> {
            let mut header = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            tar.append_data(&mut header, name, data)?;
            Ok(())
        };
        add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        for blob in [&layer, &config, &manifest] {
            add(blob_path(blob), blob)?;
        }
        add("index.json".into(), &serde_json::to_vec(&index)?)?;
        let bytes = tar.into_inner()?;
        let mut file =
            fs::File::create(archive).with_context(|| format!("creating {}", archive.display()))?;
        file.write_all(&bytes)?;
        Ok(())
    }
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn blob_path(data: &[u8]) -> String {
    format!("blobs/sha256/{:x}", Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn layers_are_reproducible_and_list_parents_first() {
        let dir = std::env::temp_dir().join(format!("podnet-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let source = dir.join("f");
        fs::write(&source, b"hello").unwrap();
        let mut rootfs = RootFs::default();
        rootfs.file(&source, "/usr/local/bin/f", 0o755);
        rootfs.symlink("/bin/g", "/usr/local/bin/f");
        let first = rootfs.layer().unwrap();
        assert_eq!(first, rootfs.layer().unwrap());
        let mut archive = tar::Archive::new(first.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "bin",
                "usr",
                "usr/local",
                "usr/local/bin",
                "bin/g",
                "usr/local/bin/f"
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
