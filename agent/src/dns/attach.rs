//! Attaching the DNS programs to interfaces as pinned tcx links (or, before
//! Linux 6.6, classic tc filters), and keeping the attachments equal to the
//! desired set (pods' host-side interfaces and `--uplinks`).
//!
//! Each link is pinned as `<bpffs>/dns/links/<ifname>@<ifindex>@<role>@<direction>`.
//! On start the agent adopts the pins that still match an interface with the
//! same index, removes the others (which detaches them), and attaches what is
//! missing: never two links of podnet on one hook. An adopted link is always
//! switched to the program instance this agent loaded, atomically with
//! `bpf_link_update`, also when its instructions are unchanged: the previous
//! agent's instance loses its last reference and the kernel frees it with its
//! own maps, so restarts leave nothing behind. The agent holds every link it
//! owns open, so a link outlives its pin while the agent runs.
//!
//! In classic mode ([`crate::bpf::tc`]) the filters at
//! [`tc::DNS_PRIORITY`] that carry a DNS program's name are the record: the
//! same names describe them, they are found by listing the namespace's
//! interfaces, replaced in place with this agent's instance on start, and
//! deleted when their endpoint goes. Listing costs a netlink dump per
//! interface and hook, so a reconcile works from what the last listing found
//! plus this process's own changes, and lists again only every
//! [`FILTER_LISTING_EVERY`] (a filter removed by hand comes back then).
//!
//! Interface indexes are looked up through one socket the attacher keeps
//! ([`IfIndexes`]): with a thousand pods a reconcile checks two thousand.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::{
    links::{FdLink, PinnedLink},
    loaded_programs,
    tc::{SchedClassifierLink, TcAttachOptions},
    LinkOrder, TcAttachType,
};
use serde::Serialize;

use super::tracer::DnsTracer;
use crate::{
    bpf::{
        link::Attachment,
        tc::{self, TcMode},
        BpfError,
    },
    sys::ifindex::IfIndexes,
};
use podnet_common::dns::programs;

/// Sub-directory of the DNS pin directory holding the links.
pub const LINKS_SUBDIR: &str = "links";

/// What kind of interface a program watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A pod's host-side interface: queries on ingress, answers on egress.
    Pod,
    /// An uplink: queries on egress, answers on ingress.
    Uplink,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Uplink => "uplink",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "pod" => Some(Self::Pod),
            "uplink" => Some(Self::Uplink),
            _ => None,
        }
    }

    /// The role and hook a program name is attached as (inverse of
    /// [`Role::program`]).
    fn of_program(name: &str) -> Option<(Self, Direction)> {
        [Self::Pod, Self::Uplink]
            .into_iter()
            .flat_map(|r| Direction::BOTH.map(|d| (r, d)))
            .find(|(r, d)| r.program(*d) == name)
    }

    /// The program for each hook of this role.
    fn program(self, direction: Direction) -> &'static str {
        match (self, direction) {
            (Self::Pod, Direction::Ingress) => programs::POD_QUERIES,
            (Self::Pod, Direction::Egress) => programs::POD_ANSWERS,
            (Self::Uplink, Direction::Egress) => programs::UPLINK_QUERIES,
            (Self::Uplink, Direction::Ingress) => programs::UPLINK_ANSWERS,
        }
    }
}

/// A tc hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Packets arriving on the interface.
    Ingress,
    /// Packets leaving through it.
    Egress,
}

impl Direction {
    /// Both hooks.
    pub const BOTH: [Self; 2] = [Self::Ingress, Self::Egress];

    fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "ingress" => Some(Self::Ingress),
            "egress" => Some(Self::Egress),
            _ => None,
        }
    }

    /// The aya attach type of this hook.
    pub fn attach_type(self) -> TcAttachType {
        match self {
            Self::Ingress => TcAttachType::Ingress,
            Self::Egress => TcAttachType::Egress,
        }
    }
}

/// One pinned link, as its file name describes it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PinName {
    /// Interface name.
    pub ifname: String,
    /// Interface index when attached.
    pub ifindex: u32,
    /// Role of the interface.
    pub role: Role,
    /// Hook.
    pub direction: Direction,
}

impl PinName {
    /// The file name of this pin.
    pub fn file_name(&self) -> String {
        format!(
            "{}@{}@{}@{}",
            self.ifname,
            self.ifindex,
            self.role.as_str(),
            self.direction.as_str()
        )
    }

    /// Parses a file name written by [`PinName::file_name`].
    pub fn parse(name: &str) -> Option<Self> {
        let mut parts = name.rsplitn(4, '@');
        let direction = Direction::parse(parts.next()?)?;
        let role = Role::parse(parts.next()?)?;
        let ifindex = parts.next()?.parse().ok()?;
        let ifname = parts.next()?.to_owned();
        (!ifname.is_empty()).then_some(Self {
            ifname,
            ifindex,
            role,
            direction,
        })
    }
}

/// What one reconcile did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Links attached now.
    pub attached: Vec<String>,
    /// Pinned links kept as they were.
    pub adopted: Vec<String>,
    /// Pinned links whose program was replaced in place.
    pub replaced: Vec<String>,
    /// Links removed (interface gone, renumbered, or no longer wanted).
    pub removed: Vec<String>,
    /// Hooks that could not be attached (retried on the next round).
    pub failed: Vec<String>,
    /// How long the reconcile took, in microseconds: from reading the
    /// registry to the last hook (each tcx attach waits for the kernel's
    /// grace period).
    pub took_us: u64,
}

impl ReconcileReport {
    /// Whether the reconcile found every hook as it should be and touched none.
    pub fn is_empty(&self) -> bool {
        self.attached.is_empty()
            && self.adopted.is_empty()
            && self.replaced.is_empty()
            && self.removed.is_empty()
            && self.failed.is_empty()
    }
}

/// Keeps the tcx links under one pin directory (or podnet's classic filters)
/// equal to a desired set.
#[derive(Debug)]
pub struct Attacher {
    dir: PathBuf,
    /// Pins (or filters, by the same names) already checked (adopted or
    /// attached) by this process.
    known: BTreeSet<String>,
    /// tcx: an open handle on every link of `known`, by pin name.
    held: BTreeMap<String, FdLink>,
    mode: TcMode,
    /// Classic mode: podnet's DNS filters as last listed, with this
    /// process's attaches and detaches since.
    filters: Option<FilterCache>,
    indexes: IfIndexes,
}

/// How often classic mode lists every interface's filters again.
pub const FILTER_LISTING_EVERY: Duration = Duration::from_secs(30);

/// Classic mode's view of its filters between two listings.
#[derive(Debug)]
struct FilterCache {
    listed_at: Instant,
    filters: Vec<PinName>,
}

/// The DNS programs that run as classic filters.
const FILTER_PROGRAMS: [&str; 4] = [
    programs::POD_QUERIES,
    programs::POD_ANSWERS,
    programs::UPLINK_QUERIES,
    programs::UPLINK_ANSWERS,
];

/// The hooks of `desired` interfaces (those that exist) that `covered` does
/// not hold yet: what a reconcile still has to attach.
fn uncovered(
    desired: &BTreeMap<String, Role>,
    covered: &BTreeSet<(String, Direction)>,
    indexes: &HashMap<&str, u32>,
) -> Vec<PinName> {
    let mut missing = Vec::new();
    for (ifname, role) in desired {
        let Some(&index) = indexes.get(ifname.as_str()) else {
            continue;
        };
        for direction in Direction::BOTH {
            if !covered.contains(&(ifname.clone(), direction)) {
                missing.push(PinName {
                    ifname: ifname.clone(),
                    ifindex: index,
                    role: *role,
                    direction,
                });
            }
        }
    }
    missing
}

/// Index of an interface in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> Option<u32> {
    tc::ifindex(ifname)
}

fn fs_error(path: &Path, message: impl std::fmt::Display) -> BpfError {
    BpfError::Fs {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

impl Attacher {
    /// An attacher keeping its links under `<dns pin dir>/links`.
    /// `mode` says whether links are tcx (pinned) or classic filters; in
    /// classic mode, DNS links pinned by an earlier tcx run are removed.
    pub fn new(dns_pin_dir: &Path, mode: TcMode) -> Result<Self, BpfError> {
        let dir = dns_pin_dir.join(LINKS_SUBDIR);
        std::fs::create_dir_all(&dir).map_err(|e| fs_error(&dir, format!("create: {e}")))?;
        let attacher = Self {
            dir,
            known: BTreeSet::new(),
            held: BTreeMap::new(),
            mode,
            filters: None,
            indexes: IfIndexes::open()
                .map_err(|e| BpfError::program("interface lookups", format!("socket: {e}")))?,
        };
        if mode == TcMode::Tc {
            for pin in attacher.pinned()? {
                let path = attacher.dir.join(pin.file_name());
                std::fs::remove_file(&path).map_err(|e| fs_error(&path, format!("unpin: {e}")))?;
            }
        } else {
            Self::remove_filters();
        }
        Ok(attacher)
    }

    /// How the programs are attached.
    pub fn mode(&self) -> TcMode {
        self.mode
    }

    /// Removes podnet's DNS filters from every interface (left by an
    /// earlier classic-mode run); errors are logged, not fatal.
    fn remove_filters() {
        for (_, ifname) in tc::interfaces() {
            for direction in Direction::BOTH {
                if let Err(e) = tc::detach(
                    &ifname,
                    direction.attach_type(),
                    tc::DNS_PRIORITY,
                    &FILTER_PROGRAMS,
                ) {
                    tracing::warn!(interface = %ifname, error = %e, "removing a DNS tc filter failed");
                }
            }
        }
    }

    /// The attachments in place: pinned links, or in classic mode podnet's
    /// DNS filters on the namespace's interfaces, named the same way.
    pub fn links(&self) -> Result<Vec<PinName>, BpfError> {
        Ok(match self.mode {
            TcMode::Tcx => self.pinned()?,
            TcMode::Tc => Self::filters()?.into_iter().map(|(p, _)| p).collect(),
        })
    }

    /// Classic mode: podnet's DNS filters, with their program ids.
    fn filters() -> Result<Vec<(PinName, u32)>, BpfError> {
        let mut out = Vec::new();
        for (index, ifname) in tc::interfaces() {
            for direction in Direction::BOTH {
                let found = match tc::our_filters(
                    index,
                    direction.attach_type(),
                    tc::DNS_PRIORITY,
                    &FILTER_PROGRAMS,
                ) {
                    Ok(found) => found,
                    // The interface went away while listing.
                    Err(_) if ifindex(&ifname) != Some(index) => continue,
                    Err(e) => return Err(e),
                };
                for f in found {
                    if let Some((role, d)) = Role::of_program(&f.name) {
                        if d == direction {
                            out.push((
                                PinName {
                                    ifname: ifname.clone(),
                                    ifindex: index,
                                    role,
                                    direction,
                                },
                                f.program_id,
                            ));
                        }
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The pinned links found on disk.
    pub fn pinned(&self) -> Result<Vec<PinName>, BpfError> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| fs_error(&self.dir, format!("list: {e}")))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pin) = PinName::parse(&name) {
                out.push(pin);
            } else {
                tracing::warn!(pin = %name, "unknown file among DNS link pins; left alone");
            }
        }
        out.sort();
        Ok(out)
    }

    /// Kernel ids of the programs behind the pinned links (or filters).
    pub fn program_ids(&self) -> BTreeSet<u32> {
        if self.mode == TcMode::Tc {
            return Self::filters()
                .unwrap_or_default()
                .into_iter()
                .map(|(_, id)| id)
                .collect();
        }
        let mut ids = BTreeSet::new();
        for pin in self.pinned().unwrap_or_default() {
            if let Ok(link) = PinnedLink::from_pin(self.dir.join(pin.file_name())) {
                if let Ok(info) = FdLink::from(link).info() {
                    ids.insert(info.program_id());
                }
            }
        }
        ids
    }

    /// The index of every desired interface that exists, each looked up
    /// once per reconcile (a node's pins name each interface twice).
    fn desired_indexes<'a>(&self, desired: &'a BTreeMap<String, Role>) -> HashMap<&'a str, u32> {
        desired
            .keys()
            .filter_map(|ifname| Some((ifname.as_str(), self.indexes.get(ifname)?)))
            .collect()
    }

    /// Makes the links equal to `desired` (interface name → role): both hooks
    /// of every desired interface that exists, nothing else.
    pub fn reconcile(
        &mut self,
        tracer: &mut DnsTracer,
        desired: &BTreeMap<String, Role>,
    ) -> Result<ReconcileReport, BpfError> {
        let indexes = self.desired_indexes(desired);
        if self.mode == TcMode::Tc {
            return self.reconcile_filters(tracer, desired, &indexes);
        }
        let mut report = ReconcileReport::default();
        let mut covered: BTreeSet<(String, Direction)> = BTreeSet::new();
        // Tags of loaded programs, read once and only when a pin needs checking.
        let mut tags: Option<HashMap<u32, u64>> = None;
        let pins = self.pinned()?;
        let names: BTreeSet<String> = pins.iter().map(PinName::file_name).collect();
        // A link whose pin was removed under the agent is let go (which
        // detaches it) and attached afresh below, pinned again.
        self.known.retain(|f| names.contains(f));
        self.held.retain(|f, _| names.contains(f));
        for pin in pins {
            let file = pin.file_name();
            let path = self.dir.join(&file);
            let wanted = desired.get(&pin.ifname) == Some(&pin.role)
                && indexes.get(pin.ifname.as_str()) == Some(&pin.ifindex);
            if !wanted {
                // Removing the last reference detaches the link (or frees it
                // if its interface is gone).
                std::fs::remove_file(&path).map_err(|e| fs_error(&path, format!("unpin: {e}")))?;
                self.known.remove(&file);
                self.held.remove(&file);
                report.removed.push(file);
                continue;
            }
            if self.known.contains(&file) {
                covered.insert((pin.ifname.clone(), pin.direction));
                continue;
            }
            let tags = tags.get_or_insert_with(|| {
                loaded_programs()
                    .filter_map(Result::ok)
                    .map(|p| (p.id(), p.tag()))
                    .collect()
            });
            match Self::adopt(tracer, &pin, &path, tags) {
                Ok((same_code, link)) => {
                    self.held.insert(file.clone(), link);
                    if same_code {
                        report.adopted.push(file.clone());
                    } else {
                        report.replaced.push(file.clone());
                    }
                }
                Err(e) => {
                    // Unusable pin: remove it; the hook is attached afresh below.
                    tracing::warn!(pin = %file, error = %e, "cannot adopt pinned DNS link; replacing it");
                    std::fs::remove_file(&path)
                        .map_err(|e| fs_error(&path, format!("unpin: {e}")))?;
                    report.removed.push(file);
                    continue;
                }
            }
            covered.insert((pin.ifname.clone(), pin.direction));
            self.known.insert(file);
        }
        for pin in uncovered(desired, &covered, &indexes) {
            let file = pin.file_name();
            match self.attach(tracer, &pin) {
                Ok(link) => {
                    self.known.insert(file.clone());
                    self.held.insert(file.clone(), link);
                    report.attached.push(file);
                }
                Err(e) => {
                    tracing::warn!(pin = %file, error = %e, "attaching DNS program failed; retrying later");
                    report.failed.push(file);
                }
            }
        }
        Ok(report)
    }

    /// Attaches both hooks of interfaces just added to the desired set,
    /// without the pass over every hook of the node that
    /// [`Attacher::reconcile`] makes: what a new pod needs. Hooks this
    /// process already holds are left alone; an interface that does not
    /// exist yet is left to the next full reconcile. `None` when a tcx pin of
    /// an added interface is already on disk (left by an earlier run): only a
    /// full reconcile can adopt it.
    pub fn attach_added(
        &mut self,
        tracer: &mut DnsTracer,
        added: &BTreeMap<String, Role>,
    ) -> Option<ReconcileReport> {
        let indexes = self.desired_indexes(added);
        let missing: Vec<PinName> = uncovered(added, &BTreeSet::new(), &indexes)
            .into_iter()
            .filter(|pin| !self.known.contains(&pin.file_name()))
            .collect();
        if self.mode == TcMode::Tcx
            && missing
                .iter()
                .any(|pin| self.dir.join(pin.file_name()).exists())
        {
            return None;
        }
        let mut report = ReconcileReport::default();
        for pin in missing {
            let file = pin.file_name();
            let attached = match self.mode {
                TcMode::Tcx => self.attach(tracer, &pin).map(|link| {
                    self.held.insert(file.clone(), link);
                }),
                TcMode::Tc => Self::attach_filter(tracer, &pin).map(|_| {
                    if let Some(cache) = &mut self.filters {
                        cache.filters.push(pin.clone());
                    }
                }),
            };
            match attached {
                Ok(()) => {
                    self.known.insert(file.clone());
                    report.attached.push(file);
                }
                Err(e) => {
                    tracing::warn!(hook = %file, error = %e, "attaching DNS program failed; retrying later");
                    report.failed.push(file);
                }
            }
        }
        Some(report)
    }

    /// Classic mode's filters: listed when the last listing is older than
    /// [`FILTER_LISTING_EVERY`], else the cached ones whose interface still
    /// has the same index (a deleted interface took its filters with it).
    /// `indexes` holds the desired interfaces' indexes; others are looked up.
    fn observed_filters(
        &self,
        indexes: &HashMap<&str, u32>,
    ) -> Result<(Vec<PinName>, Instant), BpfError> {
        match &self.filters {
            Some(cache) if cache.listed_at.elapsed() < FILTER_LISTING_EVERY => Ok((
                cache
                    .filters
                    .iter()
                    .filter(|p| {
                        let index = match indexes.get(p.ifname.as_str()) {
                            Some(&index) => Some(index),
                            None => self.indexes.get(&p.ifname),
                        };
                        index == Some(p.ifindex)
                    })
                    .cloned()
                    .collect(),
                cache.listed_at,
            )),
            _ => Ok((
                Self::filters()?.into_iter().map(|(p, _)| p).collect(),
                Instant::now(),
            )),
        }
    }

    /// [`Attacher::reconcile`] in classic mode: what the kernel lists is the
    /// observed state (filters cannot be pinned).
    fn reconcile_filters(
        &mut self,
        tracer: &mut DnsTracer,
        desired: &BTreeMap<String, Role>,
        indexes: &HashMap<&str, u32>,
    ) -> Result<ReconcileReport, BpfError> {
        let mut report = ReconcileReport::default();
        let mut covered: BTreeSet<(String, Direction)> = BTreeSet::new();
        let (observed, listed_at) = self.observed_filters(indexes)?;
        // Drop the cache until this reconcile's outcome replaces it: an error
        // below must leave the next reconcile listing again.
        self.filters = None;
        let mut in_place = Vec::with_capacity(observed.len());
        let names: BTreeSet<String> = observed.iter().map(PinName::file_name).collect();
        // Interfaces that went away took their filters with them.
        self.known.retain(|f| names.contains(f));
        for pin in observed {
            let file = pin.file_name();
            if desired.get(&pin.ifname) != Some(&pin.role) {
                let name = pin.role.program(pin.direction);
                tc::detach(
                    &pin.ifname,
                    pin.direction.attach_type(),
                    tc::DNS_PRIORITY,
                    &[name],
                )?;
                self.known.remove(&file);
                report.removed.push(file);
                continue;
            }
            covered.insert((pin.ifname.clone(), pin.direction));
            if self.known.contains(&file) {
                in_place.push(pin);
                continue;
            }
            match Self::attach_filter(tracer, &pin) {
                Ok(Attachment::Replaced) => report.replaced.push(file.clone()),
                Ok(Attachment::Attached) => report.attached.push(file.clone()),
                Ok(Attachment::Adopted) => report.adopted.push(file.clone()),
                Err(e) => {
                    tracing::warn!(filter = %file, error = %e, "cannot adopt DNS tc filter; retrying later");
                    report.failed.push(file);
                    in_place.push(pin);
                    continue;
                }
            }
            self.known.insert(file);
            in_place.push(pin);
        }
        for pin in uncovered(desired, &covered, indexes) {
            let file = pin.file_name();
            match Self::attach_filter(tracer, &pin) {
                Ok(_) => {
                    self.known.insert(file.clone());
                    report.attached.push(file);
                    in_place.push(pin);
                }
                Err(e) => {
                    tracing::warn!(filter = %file, error = %e, "attaching DNS tc filter failed; retrying later");
                    report.failed.push(file);
                }
            }
        }
        self.filters = Some(FilterCache {
            listed_at,
            filters: in_place,
        });
        Ok(report)
    }

    fn attach_filter(tracer: &mut DnsTracer, pin: &PinName) -> Result<Attachment, BpfError> {
        let name = pin.role.program(pin.direction);
        tc::attach(
            tracer.program_mut(name)?,
            name,
            &pin.ifname,
            pin.direction.attach_type(),
            tc::DNS_PRIORITY,
        )
    }

    /// Adopts a pinned link: switches it to our program instance with
    /// `bpf_link_update` unless it runs that instance already, and returns
    /// whether its instructions were ours already (adopted rather than
    /// replaced) with an open handle on the link.
    fn adopt(
        tracer: &mut DnsTracer,
        pin: &PinName,
        path: &Path,
        tags: &HashMap<u32, u64>,
    ) -> Result<(bool, FdLink), BpfError> {
        let name = pin.role.program(pin.direction);
        let program = tracer.program_mut(name)?;
        let ours = program.info().map_err(|e| BpfError::program(name, e))?;
        let link: FdLink = PinnedLink::from_pin(path)
            .map_err(|e| BpfError::program(name, format!("open {}: {e}", path.display())))?
            .into();
        let their_program = link.info().ok().map(|i| i.program_id());
        if their_program == Some(ours.id()) {
            return Ok((true, link));
        }
        let same_code = their_program.and_then(|id| tags.get(&id).copied()) == Some(ours.tag());
        let link = SchedClassifierLink::try_from(link).map_err(|e| BpfError::program(name, e))?;
        let id = program
            .attach_to_link(link)
            .map_err(|e| BpfError::program(name, format!("update link: {e}")))?;
        let link = program
            .take_link(id)
            .map_err(|e| BpfError::program(name, e))?;
        let link = FdLink::try_from(link).map_err(|e| BpfError::program(name, e))?;
        Ok((same_code, link))
    }

    fn attach(&self, tracer: &mut DnsTracer, pin: &PinName) -> Result<FdLink, BpfError> {
        let name = pin.role.program(pin.direction);
        let program = tracer.program_mut(name)?;
        let id = program
            .attach_with_options(
                &pin.ifname,
                pin.direction.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| BpfError::program(name, format!("attach to {}: {e}", pin.ifname)))?;
        let link = program
            .take_link(id)
            .map_err(|e| BpfError::program(name, e))?;
        let link = FdLink::try_from(link).map_err(|e| BpfError::program(name, e))?;
        let path = self.dir.join(pin.file_name());
        let pinned = link
            .pin(&path)
            .map_err(|e| BpfError::program(name, format!("pin at {}: {e}", path.display())))?;
        Ok(pinned.into())
    }
}

/// Ids of every program attached (by anyone) to a hook of `ifname`: tcx
/// links in order (where the kernel has tcx), then classic `bpf` filters in
/// the kernel's listing order. The kernel's own view, for checks and
/// benchmarks.
pub fn hook_program_ids(ifname: &str, direction: Direction) -> Result<Vec<u32>, BpfError> {
    let mut ids = if tc::tcx_supported() {
        tcx_program_ids(ifname, direction)?
    } else {
        Vec::new()
    };
    if let Some(index) = ifindex(ifname) {
        ids.extend(
            tc::filters(index, direction.attach_type())?
                .iter()
                .map(|f| f.program_id),
        );
    }
    Ok(ids)
}

/// Ids of every program attached (by anyone) to a tcx hook of `ifname`, in
/// order: the kernel's own view, for checks and benchmarks.
pub fn tcx_program_ids(ifname: &str, direction: Direction) -> Result<Vec<u32>, BpfError> {
    let (_, programs) = aya::programs::SchedClassifier::query_tcx(ifname, direction.attach_type())
        .map_err(|e| BpfError::program("tcx query", format!("{ifname}: {e}")))?;
    Ok(programs
        .iter()
        .map(aya::programs::ProgramInfo::id)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        let pin = PinName {
            ifname: "veth@odd".into(),
            ifindex: 42,
            role: Role::Pod,
            direction: Direction::Egress,
        };
        assert_eq!(pin.file_name(), "veth@odd@42@pod@egress");
        assert_eq!(PinName::parse(&pin.file_name()), Some(pin));
        assert_eq!(PinName::parse("eth0@x@pod@egress"), None);
        assert_eq!(PinName::parse("@1@pod@egress"), None);
        assert_eq!(PinName::parse("eth0@1@node@egress"), None);
        assert_eq!(PinName::parse("eth0@1@uplink@sideways"), None);
        assert_eq!(PinName::parse("junk"), None);
    }

    #[test]
    fn roles_pick_programs() {
        assert_eq!(Role::Pod.program(Direction::Ingress), programs::POD_QUERIES);
        assert_eq!(
            Role::Uplink.program(Direction::Egress),
            programs::UPLINK_QUERIES
        );
        assert_eq!(
            Role::Uplink.program(Direction::Ingress),
            programs::UPLINK_ANSWERS
        );
        assert_eq!(Role::Pod.program(Direction::Egress), programs::POD_ANSWERS);
        for name in FILTER_PROGRAMS {
            let (role, direction) = Role::of_program(name).unwrap();
            assert_eq!(role.program(direction), name);
        }
        assert_eq!(Role::of_program(programs::BASELINE), None);
    }
}
