//! How TC programs are attached: tcx links (Linux 6.6+) or, on older
//! kernels, classic tc filters (a `clsact` qdisc and a direct-action `bpf`
//! filter).
//!
//! The programs are the same in both modes and need no change: they return
//! `TCX_NEXT` (-1) to let a packet go on, which is `TC_ACT_UNSPEC` for a
//! classic filter: `cls_bpf_classify` then continues with the next filter and,
//! at the end of the chain, `sch_handle_ingress`/`sch_handle_egress` let the
//! packet through (`net/sched/cls_bpf.c`, `net/core/dev.c`, 6.1). `TCX_REDIRECT`
//! and `TC_ACT_REDIRECT` are both 7.
//!
//! Classic filters cannot be pinned. podnet owns one priority per subsystem
//! ([`DNS_PRIORITY`], [`STEER_PRIORITY`]) with the handle [`HANDLE`], and
//! recognises its filters by that priority, handle and the program name the
//! filter carries; filters and qdiscs of anyone else are never touched (the
//! `clsact` qdisc is added when missing and never removed: other tools may
//! share it). On restart a filter of ours is replaced in place with the
//! program instance this process loaded (`RTM_NEWTFILTER` with
//! `NLM_F_REPLACE`: no gap, no overlap), also when its instructions are the
//! same: the previous agent's instance then loses its last reference and
//! the kernel frees it, with the maps only it used.

use aya::programs::{
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    ProgramError, SchedClassifier, TcAttachType,
};
use netlink_packet_core::{NetlinkMessage, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::{
    tc::{TcAttribute, TcFilterBpfOption, TcMessage, TcOption},
    RouteNetlinkMessage,
};
use netlink_sys::protocols::NETLINK_ROUTE;

use super::{link::Attachment, BpfError};
use crate::sys::netlink::{NetlinkSocket, DEFAULT_RECV_TIMEOUT};
use std::sync::atomic::{AtomicU64, Ordering};

/// Priority (`tc filter ... pref`) of the DNS programs' classic filters.
pub const DNS_PRIORITY: u16 = 28_760;
/// Priority of the fast path's classic filters (after DNS: the DNS programs
/// see a packet before the fast path may redirect it).
pub const STEER_PRIORITY: u16 = 28_761;
/// Handle of every podnet classic filter at its priority (`0x706e`, "pn").
pub const HANDLE: u32 = 0x706e;

/// How TC programs are attached on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    /// tcx links (`BPF_LINK_CREATE` with `BPF_TCX_INGRESS`/`EGRESS`), pinned.
    #[default]
    Tcx,
    /// Classic tc: `clsact` qdisc and direct-action `bpf` filters.
    Tc,
}

impl TcMode {
    /// The label value (`tcx` or `tc`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Tc => "tc",
        }
    }
}

impl std::fmt::Display for TcMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `--tc-attach` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcModeChoice {
    /// tcx where the kernel has it (6.6+), classic tc otherwise.
    #[default]
    Auto,
    /// tcx; fail where the kernel lacks it.
    Tcx,
    /// Classic tc, even where tcx exists.
    Tc,
}

/// Whether the kernel has tcx: `BPF_PROG_QUERY` for `BPF_TCX_INGRESS` on the
/// loopback interface succeeds from 6.6 on and fails with `EINVAL` before.
/// It changes nothing.
pub fn tcx_supported() -> bool {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok()
}

/// The mode to use for `choice` on this kernel.
pub fn resolve(choice: TcModeChoice) -> Result<TcMode, BpfError> {
    let tcx = tcx_supported();
    match (choice, tcx) {
        (TcModeChoice::Auto | TcModeChoice::Tcx, true) => Ok(TcMode::Tcx),
        (TcModeChoice::Auto, false) | (TcModeChoice::Tc, _) => Ok(TcMode::Tc),
        (TcModeChoice::Tcx, false) => Err(BpfError::program(
            "tcx",
            "--tc-attach tcx: this kernel has no tcx (Linux 6.6+); use auto or tc",
        )),
    }
}

/// A classic `bpf` filter as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Priority (`pref`).
    pub priority: u16,
    /// Handle.
    pub handle: u32,
    /// The name the filter carries (the program's name as the loader gave it).
    pub name: String,
    /// Kernel id of the program.
    pub program_id: u32,
}

fn netlink_error(context: &str, e: impl std::fmt::Display) -> BpfError {
    BpfError::program("tc", format!("{context}: {e}"))
}

/// The `bpf` filters on a hook of interface `ifindex`, in the calling
/// thread's network namespace. A hook without a `clsact` qdisc has none.
pub fn filters(ifindex: u32, direction: TcAttachType) -> Result<Vec<Filter>, BpfError> {
    let mut socket = NetlinkSocket::open(NETLINK_ROUTE, DEFAULT_RECV_TIMEOUT)
        .map_err(|e| netlink_error("socket", e))?;
    let mut tc =
        TcMessage::with_index(i32::try_from(ifindex).map_err(|e| netlink_error("ifindex", e))?);
    tc.header.parent = direction_parent(direction).into();
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetTrafficFilter(tc));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut out = Vec::new();
    socket
        .request(
            request,
            |answer| {
                if let RouteNetlinkMessage::NewTrafficFilter(m) = answer {
                    out.extend(bpf_filter(&m));
                }
            },
            // No clsact qdisc on the hook: no filters.
            |e| e.raw_os_error() == Some(libc::EINVAL),
        )
        .map_err(|e| netlink_error("filter dump", e))?;
    Ok(out)
}

/// The parent handle of a clsact hook (`ffff:fff2` ingress, `ffff:fff3` egress).
fn direction_parent(direction: TcAttachType) -> u32 {
    match direction {
        TcAttachType::Egress => 0xffff_fff3,
        TcAttachType::Ingress | TcAttachType::Custom(_) => 0xffff_fff2,
    }
}

fn bpf_filter(m: &TcMessage) -> Option<Filter> {
    let kind = m.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.as_str()),
        _ => None,
    })?;
    if kind != "bpf" {
        return None;
    }
    let (mut name, mut program_id) = (String::new(), 0);
    for a in &m.attributes {
        if let TcAttribute::Options(options) = a {
            for o in options {
                match o {
                    TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name.clone_from(n),
                    TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => program_id = *id,
                    _ => {}
                }
            }
        }
    }
    // The chain's own entry (handle 0) has no program.
    let handle = u32::from(m.header.handle);
    (handle != 0 && program_id != 0).then(|| Filter {
        priority: u16::try_from(m.header.info >> 16).unwrap_or(0),
        handle,
        name,
        program_id,
    })
}

/// Whether `filter` is podnet's filter at `priority` running program `name`.
fn is_ours(filter: &Filter, priority: u16, name: &str) -> bool {
    filter.priority == priority && filter.handle == HANDLE && filter.name == name
}

/// Podnet's filters at `priority` on a hook (any program of `names`).
pub fn our_filters(
    ifindex: u32,
    direction: TcAttachType,
    priority: u16,
    names: &[&str],
) -> Result<Vec<Filter>, BpfError> {
    Ok(filters(ifindex, direction)?
        .into_iter()
        .filter(|f| names.iter().any(|n| is_ours(f, priority, n)))
        .collect())
}

/// Classic filters attached or detached by this process so far: whoever
/// caches what [`owned`] finds looks again when it changed.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many times this process attached or detached a classic filter (or
/// tried to); it changes after every change, never before.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Bumps [`GENERATION`] when dropped: at the end of an attach or detach,
/// whichever way it returns.
struct BumpGeneration;

impl Drop for BumpGeneration {
    fn drop(&mut self) {
        GENERATION.fetch_add(1, Ordering::Release);
    }
}

/// Puts `program` (named `name`) on the hook of `ifname` as podnet's
/// classic filter at `priority`: adds the `clsact` qdisc if missing, and
/// attaches, or replaces in place a filter of ours that runs any other
/// instance. The outcome is [`Attachment::Adopted`] when that instance had
/// the same name and instructions (tag), [`Attachment::Replaced`] when it
/// was another version. The filter stays after this process (it is not tied
/// to the program object's lifetime).
pub fn attach(
    program: &mut SchedClassifier,
    name: &str,
    ifname: &str,
    direction: TcAttachType,
    priority: u16,
) -> Result<Attachment, BpfError> {
    let _bump = BumpGeneration;
    let ifindex =
        ifindex(ifname).ok_or_else(|| BpfError::program(name, format!("no interface {ifname}")))?;
    // Fails when the interface has a clsact qdisc already (ours or anyone's,
    // shared) and when another root-ingress qdisc is there; in the second
    // case the filter below fails too, and says so with this error.
    let qdisc = tc::qdisc_add_clsact(ifname).err();
    let with_qdisc = |e: String| match &qdisc {
        Some(q) => format!("{e} (adding the clsact qdisc: {q})"),
        None => e,
    };
    let info = program.info().map_err(|e| BpfError::program(name, e))?;
    let (our_id, our_tag) = (info.id(), info.tag());
    let all = filters(ifindex, direction)?;
    let at_ours = all
        .iter()
        .find(|f| f.priority == priority && f.handle == HANDLE);
    let outcome = match at_ours {
        Some(f) if f.name != name && !f.name.starts_with("podnet_") => {
            return Err(BpfError::program(
                name,
                format!(
                    "{ifname}: a foreign filter {:?} holds podnet's priority {priority} handle {HANDLE:#x}; left alone",
                    f.name
                ),
            ));
        }
        Some(f) if f.program_id == our_id => return Ok(Attachment::Adopted),
        Some(f) => {
            // The same instructions are replaced too: settings may live in
            // the program's read-only data, and the filter must not keep a
            // previous agent's instance (and its maps) alive.
            let same_code = f.name == name && program_tag(f.program_id) == Some(our_tag);
            let link = SchedClassifierLink::attached(
                ifname,
                direction,
                priority,
                TcHandle::from(HANDLE),
                None,
            )
            .map_err(|e| BpfError::program(name, e))?;
            let id = program
                .attach_to_link(link)
                .map_err(|e| BpfError::program(name, format!("replace on {ifname}: {e}")))?;
            forget_link(program, id, name)?;
            if same_code {
                Attachment::Adopted
            } else {
                Attachment::Replaced
            }
        }
        None => {
            let id = program
                .attach_with_options(
                    ifname,
                    direction,
                    TcAttachOptions::Netlink(NlOptions {
                        priority,
                        handle: TcHandle::from(HANDLE),
                        classid: None,
                    }),
                )
                .map_err(|e| {
                    BpfError::program(name, with_qdisc(format!("attach to {ifname}: {e}")))
                })?;
            forget_link(program, id, name)?;
            Attachment::Attached
        }
    };
    Ok(outcome)
}

/// Takes the link out of the program so that neither dropping the program
/// nor the link removes the filter: a classic filter lives until it is
/// detached on purpose ([`detach`]) or its interface goes.
fn forget_link(
    program: &mut SchedClassifier,
    id: aya::programs::tc::SchedClassifierLinkId,
    name: &str,
) -> Result<(), BpfError> {
    let link = program
        .take_link(id)
        .map_err(|e| BpfError::program(name, e))?;
    // Dropping a netlink link would delete the filter; it holds no kernel
    // resource of this process (no fd), so forgetting it leaks nothing.
    std::mem::forget(link);
    Ok(())
}

fn program_tag(id: u32) -> Option<u64> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .map(|p| p.tag())
}

/// Removes podnet's filter at `priority` from a hook of `ifname` if it runs
/// one of `names`. Returns whether one was removed.
pub fn detach(
    ifname: &str,
    direction: TcAttachType,
    priority: u16,
    names: &[&str],
) -> Result<bool, BpfError> {
    let _bump = BumpGeneration;
    let Some(ifindex) = ifindex(ifname) else {
        return Ok(false);
    };
    if our_filters(ifindex, direction, priority, names)?.is_empty() {
        return Ok(false);
    }
    let link =
        SchedClassifierLink::attached(ifname, direction, priority, TcHandle::from(HANDLE), None)
            .map_err(|e| BpfError::program("tc", e))?;
    aya::programs::Link::detach(link)
        .map_err(|e: ProgramError| BpfError::program("tc", format!("detach from {ifname}: {e}")))?;
    Ok(true)
}

/// Index of an interface in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> Option<u32> {
    let c = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// A podnet classic filter found on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedFilter {
    /// `dns` or `steer`, from the priority.
    pub subsystem: &'static str,
    /// Interface name.
    pub ifname: String,
    /// Hook.
    pub direction: TcAttachType,
    /// The filter.
    pub filter: Filter,
}

impl OwnedFilter {
    /// `<ifname>@<ingress|egress>`, where the filter sits.
    pub fn place(&self) -> String {
        let hook = if self.direction == TcAttachType::Egress {
            "egress"
        } else {
            "ingress"
        };
        format!("{}@{hook}", self.ifname)
    }
}

/// Every podnet filter (at [`DNS_PRIORITY`] or [`STEER_PRIORITY`] with
/// [`HANDLE`] and a `podnet_` program name) on every interface of the
/// calling thread's network namespace, and the hooks that could not be read.
pub fn owned() -> (Vec<OwnedFilter>, Vec<String>) {
    let (mut found, mut errors) = (Vec::new(), Vec::new());
    for (index, ifname) in interfaces() {
        for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
            match filters(index, direction) {
                Ok(list) => {
                    for filter in list {
                        let subsystem = match filter.priority {
                            DNS_PRIORITY => "dns",
                            STEER_PRIORITY => "steer",
                            _ => continue,
                        };
                        if filter.handle == HANDLE && filter.name.starts_with("podnet_") {
                            found.push(OwnedFilter {
                                subsystem,
                                ifname: ifname.clone(),
                                direction,
                                filter,
                            });
                        }
                    }
                }
                Err(e) => errors.push(format!("{ifname}: {e}")),
            }
        }
    }
    (found, errors)
}

/// Removes every podnet filter ([`owned`]) for uninstall. Returns what was
/// removed (`tc filter <program> on <ifname>@<hook>`) and what failed;
/// qdiscs stay.
pub fn remove_all() -> (Vec<String>, Vec<String>) {
    let (found, mut errors) = owned();
    let mut removed = Vec::new();
    for f in found {
        match detach(
            &f.ifname,
            f.direction,
            f.filter.priority,
            &[f.filter.name.as_str()],
        ) {
            Ok(true) => removed.push(format!("tc filter {} on {}", f.filter.name, f.place())),
            Ok(false) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    (removed, errors)
}

/// Every interface of the calling thread's network namespace: (index, name).
pub fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry
    // (or null on failure); it is read up to that entry and freed once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_labels_are_fixed() {
        use clap::ValueEnum as _;
        assert_eq!(
            TcModeChoice::from_str("auto", false),
            Ok(TcModeChoice::Auto)
        );
        assert_eq!(TcModeChoice::from_str("tc", false), Ok(TcModeChoice::Tc));
        assert_eq!(TcModeChoice::from_str("tcx", false), Ok(TcModeChoice::Tcx));
        assert!(TcModeChoice::from_str("clsact", false).is_err());
        assert_eq!(TcMode::Tcx.as_str(), "tcx");
        assert_eq!(TcMode::Tc.as_str(), "tc");
        assert_eq!(direction_parent(TcAttachType::Ingress), 0xffff_fff2);
        assert_eq!(direction_parent(TcAttachType::Egress), 0xffff_fff3);
    }

    #[test]
    fn only_our_priority_handle_and_name_are_ours() {
        let f = Filter {
            priority: DNS_PRIORITY,
            handle: HANDLE,
            name: "podnet_dns_pod_ingress".into(),
            program_id: 7,
        };
        assert!(is_ours(&f, DNS_PRIORITY, "podnet_dns_pod_ingress"));
        assert!(!is_ours(&f, STEER_PRIORITY, "podnet_dns_pod_ingress"));
        assert!(!is_ours(&f, DNS_PRIORITY, "cilium"));
        let other = Filter { handle: 1, ..f };
        assert!(!is_ours(&other, DNS_PRIORITY, "podnet_dns_pod_ingress"));
    }
}
