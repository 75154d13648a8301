//! Loading, attaching and pinning podnet's kernel programs.
//!
//! Everything podnet installs in the kernel lives under one bpffs directory
//! (`--bpffs`, one sub-directory per program group). Maps are pinned so their
//! counts survive agent restarts; links are pinned so programs keep running
//! while the agent is down. On start the agent adopts what is pinned when the
//! program is unchanged, and replaces it when the program changed.

pub mod btf;
pub mod endpoints;
pub mod fs;
pub mod inventory;
pub mod link;
pub mod ring;
pub mod tc;

/// The conntrack race tracer object, built by agent/build.rs.
pub static CONNTRACK_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podnet-conntrack"));

/// The DNS latency programs (TC), built by agent/build.rs.
pub static DNS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podnet-dns"));

/// The ENI fast path programs (TC), built by agent/build.rs.
pub static STEER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podnet-steer"));

/// Errors loading or attaching kernel programs.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// Kernel BTF could not be read or lacks a needed type.
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    /// The bpffs directory could not be prepared.
    #[error("bpffs {path}: {message}")]
    Fs {
        /// Path concerned.
        path: std::path::PathBuf,
        /// What failed.
        message: String,
    },
    /// The object could not be loaded.
    #[error("loading {object}: {source}")]
    Load {
        /// Object name.
        object: &'static str,
        /// aya's error.
        source: Box<aya::EbpfError>,
    },
    /// A program could not be loaded, attached or inspected.
    #[error("program {program}: {message}")]
    Program {
        /// Program name.
        program: String,
        /// What failed.
        message: String,
    },
    /// A map is missing or has an unexpected type.
    #[error("map {map}: {message}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What failed.
        message: String,
    },
}

impl BpfError {
    /// A program that could not be loaded, attached or inspected.
    pub fn program(program: &str, message: impl std::fmt::Display) -> Self {
        Self::Program {
            program: program.to_owned(),
            message: message.to_string(),
        }
    }

    /// A map that is missing or has an unexpected type.
    pub fn map(map: &'static str, message: impl std::fmt::Display) -> Self {
        Self::Map {
            map,
            message: message.to_string(),
        }
    }
}

/// Program `name` of a loaded object, as its program type `P`.
pub fn program_mut<'a, P>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| BpfError::program(name, "missing from object"))?
        .try_into()
        .map_err(|e| BpfError::program(name, e))
}

/// Takes map `name` out of a loaded object, as its map type `M`.
pub fn take_map<M>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<M, BpfError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    ebpf.take_map(name)
        .ok_or_else(|| BpfError::map(name, "missing from object"))?
        .try_into()
        .map_err(|e| BpfError::map(name, e))
}

/// Inode number of the calling thread's network namespace: the namespace the
/// agent observes (kernel programs filter on it).
pub fn current_netns_inode() -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    u32::try_from(ino).map_err(|_| std::io::Error::other("netns inode exceeds u32"))
}
