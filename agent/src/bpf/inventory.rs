//! What podnet has in the kernel, read from its pin directory: the pinned
//! maps (with their fill) and the programs behind the pinned links (with the
//! kernel's run statistics). Feeds the self-metrics and `podnetctl status`.
//!
//! Everything is found through `--bpffs`, so a scrape sees exactly this
//! agent's objects even when several agents share a machine.
//!
//! Finding the objects (a pin and a link query per link, a netlink dump of
//! every interface's classic tc filters) costs per endpoint, while the
//! objects change only when podnet attaches or detaches; so scrapes
//! ([`read_cached`]) find them again only when a pin directory changed
//! (bpffs updates a directory's mtime on every pin and unpin), a classic
//! filter was attached or detached ([`super::tc::generation`]), or the last
//! look is [`LAYOUT_MAX_AGE`] old. Map fills and run statistics are read
//! fresh every time.
//!
//! Classic tc filters are looked for only when the agent attaches that way
//! ([`TcMode::Tc`]): finding them costs two netlink dumps per interface of
//! the namespace (2,200 on a node with 1,100 pod interfaces), and with tcx
//! links every podnet program sits behind a pin.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use aya::{
    maps::{MapInfo, MapType},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use serde::{Deserialize, Serialize};

use super::tc::TcMode;

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

/// Reads podnet's objects under `bpffs`, all of them afresh, with the
/// classic tc filters when `mode` attaches that way. Unreadable pins are
/// skipped: a scrape shows what it can.
pub fn read(bpffs: &Path, mode: TcMode) -> Inventory {
    fill(&Layout::read(bpffs, mode))
}

/// How long a scrape may reuse what it found of podnet's objects when
/// nothing says they changed.
pub const LAYOUT_MAX_AGE: Duration = Duration::from_mins(1);

/// The last [`Layout`] scrapes found, with what it was found under.
static CACHED: Mutex<Option<(Stamp, Layout)>> = Mutex::new(None);

/// Like [`read`], finding the objects again only when they may have
/// changed (see the module's documentation).
pub fn read_cached(bpffs: &Path, mode: TcMode) -> Inventory {
    let mut cached = CACHED.lock().unwrap_or_else(PoisonError::into_inner);
    let stamp = Stamp::now(bpffs, mode, cached.as_ref().map(|(old, _)| old));
    let fresh = cached.as_ref().is_some_and(|(old, _)| old.still(&stamp));
    if !fresh {
        *cached = Some((stamp, Layout::read(bpffs, mode)));
    }
    cached
        .as_ref()
        .map(|(_, layout)| fill(layout))
        .unwrap_or_default()
}

/// What says whether podnet's objects may have changed.
#[derive(Debug)]
struct Stamp {
    bpffs: PathBuf,
    /// Whether classic tc filters were looked for.
    mode: TcMode,
    /// Every directory under `bpffs` with its modification time.
    dirs: Vec<DirStamp>,
    tc_generation: u64,
    at: Instant,
    /// Whether every directory was last changed [`MTIME_SETTLE`] before:
    /// bpffs stamps with the kernel's coarse clock, so a change within the
    /// same tick as an earlier one could leave the time as it was.
    settled: bool,
}

/// How old a pin directory's modification time must be before it is
/// trusted to show the next change.
const MTIME_SETTLE: Duration = Duration::from_secs(1);

impl Stamp {
    /// The stamp now; directories that `previous` (if settled) saw with the
    /// same modification time are not listed again.
    fn now(bpffs: &Path, mode: TcMode, previous: Option<&Self>) -> Self {
        let mut dirs = Vec::new();
        let known = previous.filter(|p| p.settled).map_or(&[][..], |p| &p.dirs);
        walk_dirs(bpffs, known, &mut dirs);
        let wall = SystemTime::now();
        let settled = dirs.iter().all(|d| {
            d.mtime
                .is_some_and(|m| wall.duration_since(m).is_ok_and(|age| age >= MTIME_SETTLE))
        });
        Self {
            bpffs: bpffs.to_owned(),
            mode,
            dirs,
            tc_generation: super::tc::generation(),
            at: Instant::now(),
            settled,
        }
    }

    /// Whether what was found under `self` still holds at `now`.
    fn still(&self, now: &Self) -> bool {
        self.settled
            && self.bpffs == now.bpffs
            && self.mode == now.mode
            && self.dirs == now.dirs
            && self.tc_generation == now.tc_generation
            && now.at.saturating_duration_since(self.at) < LAYOUT_MAX_AGE
    }
}

/// A directory under `--bpffs`: its modification time and subdirectories.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DirStamp {
    path: PathBuf,
    mtime: Option<SystemTime>,
    subdirs: Vec<PathBuf>,
}

/// `dir` and every directory under it, with their modification times.
///
/// A directory whose time is the one in `known` (a settled earlier walk)
/// has the same entries, so its subdirectories are taken from there instead
/// of listing it again: the link directories hold a pin per attachment
/// (2,000 with 1,000 endpoints), and scrapes come every few seconds.
fn walk_dirs(dir: &Path, known: &[DirStamp], out: &mut Vec<DirStamp>) {
    let mtime = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
    let seen = known
        .iter()
        .find(|d| d.path == dir && d.mtime.is_some() && d.mtime == mtime);
    let subdirs = match seen {
        Some(d) => d.subdirs.clone(),
        None => std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default(),
    };
    out.push(DirStamp {
        path: dir.to_owned(),
        mtime,
        subdirs: subdirs.clone(),
    });
    for sub in &subdirs {
        walk_dirs(sub, known, out);
    }
}

/// podnet's objects: the pinned hash maps, and the programs behind its
/// links and classic filters (without their statistics).
#[derive(Clone, Debug, Default)]
struct Layout {
    /// Pin, subsystem.
    maps: Vec<(PathBuf, String)>,
    programs: BTreeMap<u32, PinnedProgram>,
}

impl Layout {
    fn read(bpffs: &Path, mode: TcMode) -> Self {
        let mut pins = Vec::new();
        walk(bpffs, &mut pins);
        pins.sort();
        let mut layout = Self::default();
        for path in pins {
            let subsystem = path
                .strip_prefix(bpffs)
                .ok()
                .and_then(|p| p.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_default();
            // Object info queries answer for any object type, so the pin's
            // kind is asked first.
            match pin_kind(&path) {
                Some(PinKind::Map) => layout.maps.push((path, subsystem)),
                Some(PinKind::Link) => {
                    let Some(id) = PinnedLink::from_pin(&path)
                        .ok()
                        .and_then(|link| FdLink::from(link).info().ok())
                        .map(|info| info.program_id())
                    else {
                        continue;
                    };
                    layout.program(id, subsystem, "").links.push(path);
                }
                Some(PinKind::Other) | None => {}
            }
        }
        // Classic tc filters (kernels without tcx) are not pinned; they carry
        // the program's full name.
        let classic = if mode == TcMode::Tc {
            super::tc::owned().0
        } else {
            Vec::new()
        };
        for f in classic {
            layout
                .program(f.filter.program_id, f.subsystem, &f.filter.name)
                .links
                .push(PathBuf::from(format!("tc:{}", f.place())));
        }
        layout
    }

    fn program(&mut self, id: u32, subsystem: impl Into<String>, name: &str) -> &mut PinnedProgram {
        self.programs.entry(id).or_insert_with(|| PinnedProgram {
            subsystem: subsystem.into(),
            name: name.to_owned(),
            id,
            links: Vec::new(),
            run_time_ns: 0,
            run_count: 0,
            recursion_misses: None,
        })
    }
}

/// The inventory of `layout` now: map fills and the programs' statistics.
/// A map or program gone since is left out.
fn fill(layout: &Layout) -> Inventory {
    let mut inv = Inventory {
        stats_enabled: stats_enabled(),
        ..Inventory::default()
    };
    for (path, subsystem) in &layout.maps {
        if let Some(fill) = MapInfo::from_pin(path)
            .ok()
            .and_then(|info| map_fill(&info, path, subsystem.clone()))
        {
            inv.maps.push(fill);
        }
    }
    let mut programs = layout.programs.clone();
    let mut loaded = Vec::new();
    for prog in loaded_programs().filter_map(Result::ok) {
        if let Some(p) = programs.get_mut(&prog.id()) {
            if p.name.is_empty() {
                p.name = full_name(prog.name_as_str().unwrap_or_default(), &p.links);
            }
            p.run_time_ns = u64::try_from(prog.run_time().as_nanos()).unwrap_or(u64::MAX);
            p.run_count = prog.run_count();
            p.recursion_misses = prog.fd().ok().and_then(|fd| recursion_misses(fd.as_fd()));
            loaded.push(prog.id());
        }
    }
    programs.retain(|id, _| loaded.contains(id));
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
    let raw = fd.as_fd().as_raw_fd();
    let per_cpu = matches!(
        info.map_type().ok()?,
        MapType::PerCpuHash | MapType::LruPerCpuHash
    );
    let shape = Shape {
        key_size: info.key_size(),
        value_size: info.value_size(),
        per_cpu,
        capacity: info.max_entries(),
    };
    let entries = count_batched(raw, &shape)
        .unwrap_or_else(|| count_keys(raw, shape.key_size, shape.capacity));
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

/// What counting a hash map's keys needs to know of it.
#[derive(Clone, Copy, Debug)]
struct Shape {
    key_size: u32,
    value_size: u32,
    per_cpu: bool,
    capacity: u32,
}

/// Entries one `BPF_MAP_LOOKUP_BATCH` call asks for. A hash bucket is read
/// whole, so a batch must hold the fullest bucket (the kernel answers
/// `ENOSPC` otherwise, and the count falls back to [`count_keys`]).
const BATCH: u32 = 256;

/// `bpf_attr` for `BPF_MAP_LOOKUP_BATCH` (the `batch` member,
/// include/uapi/linux/bpf.h).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Counts a hash map's entries with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+):
/// one system call per [`BATCH`] entries instead of one per key. `None`
/// when the kernel cannot do it for this map (then [`count_keys`] does).
fn count_batched(fd: std::os::fd::RawFd, shape: &Shape) -> Option<u64> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let key_size = usize::try_from(shape.key_size).ok()?.max(1);
    // Per-CPU values come as one 8-byte aligned slot per possible CPU
    // (`bpf_map_value_size`, kernel/bpf/syscall.c).
    let value_size = if shape.per_cpu {
        usize::try_from(shape.value_size).ok()?.next_multiple_of(8) * aya::util::nr_cpus().ok()?
    } else {
        usize::try_from(shape.value_size).ok()?
    }
    .max(1);
    let batch = BATCH.min(shape.capacity.max(1));
    let slots = usize::try_from(batch).ok()?;
    let mut keys = vec![0_u8; key_size.checked_mul(slots)?];
    let mut values = vec![0_u8; value_size.checked_mul(slots)?];
    // The hash map's cursor is a bucket index (`u32`); 8 bytes fit any.
    let (mut cursor, mut next) = ([0_u8; 8], [0_u8; 8]);
    let mut count = 0_u64;
    let mut first = true;
    // Each call moves on by at least one bucket; a map has at most
    // `capacity` buckets (`htab_map_alloc` rounds up to a power of two, at
    // most twice as many).
    for _ in 0..=u64::from(shape.capacity) * 2 {
        let mut attr = BatchAttr {
            // A null in_batch starts at the first bucket.
            in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch,
            map_fd: u32::try_from(fd).ok()?,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: attr is a valid bpf_attr prefix for this command; keys and
        // values hold `batch` entries of the map's key and value sizes,
        // cursor and next are 8 bytes (more than the hash map's 4-byte
        // cursor), and all of them outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        // The kernel writes back how many entries it copied, also with
        // ENOENT at the end of the map.
        let errno = (rc != 0).then(|| std::io::Error::last_os_error().raw_os_error());
        match errno {
            None => count += u64::from(attr.count),
            Some(Some(libc::ENOENT)) => return Some(count + u64::from(attr.count)),
            Some(_) => return None,
        }
        first = false;
        cursor = next;
    }
    None
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

    fn dir(path: &str, mtime: Option<SystemTime>) -> DirStamp {
        DirStamp {
            path: path.into(),
            mtime,
            subdirs: Vec::new(),
        }
    }

    #[test]
    fn a_settled_walk_lists_only_directories_that_changed() {
        let root = std::env::temp_dir().join(format!("podnet-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("dns/links")).unwrap();
        let mut first = Vec::new();
        walk_dirs(&root, &[], &mut first);
        assert_eq!(first.len(), 3);
        // A walk that trusts `first` takes the subdirectories it recorded
        // for directories whose time did not move.
        let mut planted = first.clone();
        planted[0].subdirs.clear();
        let mut again = Vec::new();
        walk_dirs(&root, &planted, &mut again);
        assert_eq!(again.len(), 1, "{again:?}");
        // With no record, or another time, the directory is listed.
        let mut moved = first.clone();
        moved[0].mtime = moved[0].mtime.map(|t| t - Duration::from_secs(5));
        moved[0].subdirs.clear();
        let mut listed = Vec::new();
        walk_dirs(&root, &moved, &mut listed);
        assert_eq!(listed, first);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_cached_layout_holds_until_a_directory_filter_or_minute_says_otherwise() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let base = Stamp {
            bpffs: "/sys/fs/bpf/podnet".into(),
            mode: TcMode::Tcx,
            dirs: vec![dir("/sys/fs/bpf/podnet/dns", Some(t0))],
            tc_generation: 3,
            at: Instant::now(),
            settled: true,
        };
        let later = |f: &dyn Fn(&mut Stamp)| {
            let mut s = Stamp {
                dirs: base.dirs.clone(),
                bpffs: base.bpffs.clone(),
                at: base.at + Duration::from_secs(10),
                ..base
            };
            f(&mut s);
            s
        };
        assert!(base.still(&later(&|_| {})));
        assert!(!base.still(&later(
            &|s| s.dirs[0].mtime = Some(t0 + Duration::from_millis(4))
        )));
        assert!(!base.still(&later(&|s| s
            .dirs
            .push(dir("/sys/fs/bpf/podnet/steer", Some(t0))))));
        assert!(!base.still(&later(&|s| s.tc_generation = 4)));
        assert!(!base.still(&later(&|s| s.at = base.at + LAYOUT_MAX_AGE)));
        assert!(!base.still(&later(&|s| s.bpffs = "/sys/fs/bpf/other".into())));
        assert!(!base.still(&later(&|s| s.mode = TcMode::Tc)));
        // A directory changed within the last second is not trusted.
        let unsettled = Stamp {
            settled: false,
            dirs: base.dirs.clone(),
            bpffs: base.bpffs.clone(),
            ..base
        };
        assert!(!unsettled.still(&later(&|_| {})));
    }

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
