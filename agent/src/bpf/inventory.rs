//! What podnet has in the kernel, read from its pin directory: the pinned
//! maps (with their fill) and the programs behind the pinned links (with the
//! kernel's run statistics). Feeds the self-metrics and `podnetctl status`.
//!
//! Everything is found through `--bpffs`, so a scrape sees exactly this
//! agent's objects even when several agents share a machine.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapInfo, MapType},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use serde::{Deserialize, Serialize};

/// `kernel.bpf_stats_enabled`: while 1, the kernel accumulates run time and
/// run count per program.
pub const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Full names of podnet's programs; the kernel keeps 15 bytes of a name.
const PROGRAM_NAMES: &[&str] = &[
    podnet_common::conntrack::PROGRAM_NAME,
    podnet_common::conntrack::CONFIRM_EXIT_PROGRAM,
    podnet_common::dns::programs::POD_QUERIES,
    podnet_common::dns::programs::POD_ANSWERS,
    podnet_common::dns::programs::UPLINK_QUERIES,
    podnet_common::dns::programs::UPLINK_ANSWERS,
    podnet_common::steer::POD_PROGRAM,
    podnet_common::steer::ENI_PROGRAM,
];

/// A pinned hash map and how full it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapFill {
    /// Subsystem (first directory under `--bpffs`).
    pub subsystem: String,
    /// Map name (its pin's file name).
    pub map: String,
    /// Keys in the map now.
    pub entries: u64,
    /// `max_entries`.
    pub capacity: u32,
}

/// A program behind one or more pinned links.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedProgram {
    /// Subsystem (first directory under `--bpffs`).
    pub subsystem: String,
    /// Program name (as in the object file).
    pub name: String,
    /// Kernel program id.
    pub id: u32,
    /// Pinned links that hold it.
    pub links: Vec<PathBuf>,
    /// Accumulated run time, nanoseconds (0 unless bpf stats are on).
    pub run_time_ns: u64,
    /// Accumulated runs (0 unless bpf stats are on).
    pub run_count: u64,
    /// Runs the kernel skipped because the program was already running on
    /// the CPU (`recursion_misses`, counted always): events it never saw.
    /// `None` when the kernel would not say (reading needs `CAP_SYS_ADMIN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recursion_misses: Option<u64>,
}

/// podnet's kernel objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Hash and LRU maps, by subsystem and name.
    pub maps: Vec<MapFill>,
    /// Programs, by subsystem and name.
    pub programs: Vec<PinnedProgram>,
    /// Whether `kernel.bpf_stats_enabled` is 1.
    pub stats_enabled: bool,
}

/// Whether the kernel is collecting program run statistics.
pub fn stats_enabled() -> bool {
    std::fs::read_to_string(BPF_STATS_SYSCTL).is_ok_and(|s| s.trim() == "1")
}

/// Reads podnet's objects under `bpffs`. Unreadable pins are skipped: a
/// scrape shows what it can.
pub fn read(bpffs: &Path) -> Inventory {
    let mut pins = Vec::new();
    walk(bpffs, &mut pins);
    pins.sort();
    let mut inv = Inventory {
        stats_enabled: stats_enabled(),
        ..Inventory::default()
    };
    let mut programs: BTreeMap<u32, PinnedProgram> = BTreeMap::new();
    for path in pins {
        let subsystem = path
            .strip_prefix(bpffs)
            .ok()
            .and_then(|p| p.components().next())
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default();
        // Object info queries answer for any object type, so the pin's kind
        // is asked first.
        match pin_kind(&path) {
            Some(PinKind::Map) => {
                if let Some(fill) = MapInfo::from_pin(&path)
                    .ok()
                    .and_then(|info| map_fill(&info, &path, subsystem))
                {
                    inv.maps.push(fill);
                }
            }
            Some(PinKind::Link) => {
                let Some(id) = PinnedLink::from_pin(&path)
                    .ok()
                    .and_then(|link| FdLink::from(link).info().ok())
                    .map(|info| info.program_id())
                else {
                    continue;
                };
                programs
                    .entry(id)
                    .or_insert_with(|| PinnedProgram {
                        subsystem,
                        name: String::new(),
                        id,
                        links: Vec::new(),
                        run_time_ns: 0,
                        run_count: 0,
                        recursion_misses: None,
                    })
                    .links
                    .push(path);
            }
            Some(PinKind::Other) | None => {}
        }
    }
    // Classic tc filters (kernels without tcx) are not pinned; they carry
    // the program's full name.
    for f in super::tc::owned().0 {
        programs
            .entry(f.filter.program_id)
            .or_insert_with(|| PinnedProgram {
                subsystem: f.subsystem.to_owned(),
                name: f.filter.name.clone(),
                id: f.filter.program_id,
                links: Vec::new(),
                run_time_ns: 0,
                run_count: 0,
                recursion_misses: None,
            })
            .links
            .push(PathBuf::from(format!("tc:{}", f.place())));
    }
    for prog in loaded_programs().filter_map(Result::ok) {
        if let Some(p) = programs.get_mut(&prog.id()) {
            if p.name.is_empty() {
                p.name = full_name(prog.name_as_str().unwrap_or_default(), &p.links);
            }
            p.run_time_ns = u64::try_from(prog.run_time().as_nanos()).unwrap_or(u64::MAX);
            p.run_count = prog.run_count();
            p.recursion_misses = prog.fd().ok().and_then(|fd| recursion_misses(fd.as_fd()));
        }
    }
    inv.programs = programs.into_values().collect();
    inv.programs
        .sort_by(|a, b| (&a.subsystem, &a.name, a.id).cmp(&(&b.subsystem, &b.name, b.id)));
    inv
}

/// The object file's name for a kernel (truncated) program name. Where
/// the truncation is ambiguous (the DNS programs differ only in their
/// direction), the hook named at the end of the link pins decides
/// (`<ifname>@<ifindex>@<role>@<direction>`).
fn full_name(kernel: &str, links: &[PathBuf]) -> String {
    let candidates: Vec<&str> = PROGRAM_NAMES
        .iter()
        .copied()
        .filter(|full| !kernel.is_empty() && full.starts_with(kernel))
        .collect();
    let hooks: Vec<&str> = links
        .iter()
        .filter_map(|l| l.file_name()?.to_str()?.rsplit('@').next())
        .collect();
    let chosen = match candidates.as_slice() {
        [one] => Some(*one),
        many => many
            .iter()
            .copied()
            .find(|full| full.rsplit('_').next().is_some_and(|h| hooks.contains(&h))),
    };
    chosen.unwrap_or(kernel).to_owned()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => walk(&path, out),
            Ok(_) => out.push(path),
            Err(_) => {}
        }
    }
}

fn map_fill(info: &MapInfo, path: &Path, subsystem: String) -> Option<MapFill> {
    let hashed = matches!(
        info.map_type().ok()?,
        MapType::Hash | MapType::LruHash | MapType::PerCpuHash | MapType::LruPerCpuHash
    );
    if !hashed {
        return None;
    }
    let fd = info.fd().ok()?;
    let entries = count_keys(fd.as_fd().as_raw_fd(), info.key_size(), info.max_entries());
    Some(MapFill {
        subsystem,
        map: path.file_name()?.to_string_lossy().into_owned(),
        entries,
        capacity: info.max_entries(),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PinKind {
    Map,
    Link,
    Other,
}

/// `bpf_attr` for `BPF_OBJ_GET` (include/uapi/linux/bpf.h).
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// What a pin holds: the anonymous inode name of an fd opened from it
/// (`bpf-map`, `bpf-link`, `bpf-prog`; kernel/bpf/syscall.c).
fn pin_kind(path: &Path) -> Option<PinKind> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_OBJ_GET; pathname
    // points to a NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel just returned this fd to us; we own it alone.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let target = target.to_string_lossy();
    Some(if target.contains("bpf-map") {
        PinKind::Map
    } else if target.contains("bpf-link") || target.contains("bpf_link") {
        PinKind::Link
    } else {
        PinKind::Other
    })
}

/// `bpf_attr` for `BPF_MAP_GET_NEXT_KEY` (include/uapi/linux/bpf.h).
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// Counts keys with `BPF_MAP_GET_NEXT_KEY`, whatever their size. The walk
/// ends at `ENOENT`; a key deleted under the walk restarts it from the first
/// key (kernel/bpf/hashtab.c), so it is bounded at twice the capacity.
fn count_keys(fd: std::os::fd::RawFd, key_size: u32, capacity: u32) -> u64 {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let size = usize::try_from(key_size).unwrap_or(0).max(1);
    let (mut key, mut next) = (vec![0_u8; size], vec![0_u8; size]);
    let mut count = 0_u64;
    let mut first = true;
    let bound = u64::from(capacity) * 2;
    while count <= bound {
        let attr = NextKeyAttr {
            map_fd: u32::try_from(fd).unwrap_or(u32::MAX),
            _pad: 0,
            // A null key asks for the first key.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: attr is a valid bpf_attr prefix for this command; key and
        // next point to buffers of the map's key size that outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw const attr,
                std::mem::size_of::<NextKeyAttr>(),
            )
        };
        if rc != 0 {
            return count;
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    u64::from(capacity)
}

/// The program's `recursion_misses` (Linux 5.12+), which aya's program info
/// does not expose: `BPF_OBJ_GET_INFO_BY_FD` into the UAPI struct.
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    /// The `info` member of `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: bpf_prog_info is a plain C struct of integers; all zeroes is valid.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: u32::try_from(fd.as_raw_fd()).ok()?,
        info_len: u32::try_from(std::mem::size_of_val(&info)).ok()?,
        info: (&raw mut info) as u64,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for this command
    // (the kernel zero-extends the rest), `info` outlives the call and its
    // length is given; `fd` is an open program descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            (&raw mut attr),
            std::mem::size_of::<InfoByFd>(),
        )
    };
    (rc == 0).then_some(info.recursion_misses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_kernel_names_map_to_object_names() {
        assert_eq!(full_name("podnet_kfree_sk", &[]), "podnet_kfree_skb");
        assert_eq!(full_name("other_prog", &[]), "other_prog");
        assert_eq!(full_name("", &[]), "");
        let pin = |name: &str| {
            vec![PathBuf::from(format!(
                "/sys/fs/bpf/podnet/dns/links/{name}"
            ))]
        };
        assert_eq!(
            full_name("podnet_dns_pod_", &pin("vp1@4@pod@egress")),
            "podnet_dns_pod_egress"
        );
        assert_eq!(
            full_name("podnet_dns_pod_", &pin("vp1@4@pod@ingress")),
            "podnet_dns_pod_ingress"
        );
        assert_eq!(
            full_name("podnet_dns_upli", &pin("eth0@2@uplink@ingress")),
            "podnet_dns_uplink_ingress"
        );
        assert_eq!(full_name("podnet_dns_pod_", &[]), "podnet_dns_pod_");
    }
}
