//! The ENI fast path in the kernel (`podnet-steer`, IPv4 and IPv6): load the
//! programs with their pinned maps, attach them through pinned tcx links
//! (adopting the pinned links on restart and switching each atomically to
//! the programs this agent loaded, so the previous agent's instances are
//! freed; the agent holds every link open), and keep the maps in line with
//! the routing subsystem's desired state.
//!
//! Pins live under `--bpffs/steer/`: the maps, and one link per interface
//! (`ingress_<ifname>`, with `.` written `:` since bpffs reserves dots and
//! interface names cannot hold colons). While the agent is down, the pinned links keep
//! steering with the last map contents.
//!
//! On kernels without tcx (before 6.6) the same programs run as classic tc
//! filters at [`tc::STEER_PRIORITY`] ([`crate::bpf::tc`]): not pinned, found
//! again on restart by priority, handle and program name.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use podnet_common::steer::{
    action, counter_index, counter_index6, direction, fib, maps as m, result, DestAddr, DestAddr6,
    PodAddr6, PodRoute, SteerConfig, CONFIG_GLOBAL, COUNTERS, ENI_PROGRAM, POD_PROGRAM,
};
use serde::Serialize;

use crate::{
    bpf::{
        self,
        link::Attachment,
        tc::{self, TcMode},
        BpfError,
    },
    net::Cidr,
    routing::desired::Desired,
};

/// Sub-directory of `--bpffs` holding the fast path's maps and links.
pub const PIN_SUBDIR: &str = "steer";
/// Prefix of link pins: `ingress_<ifname>`.
const LINK_PREFIX: &str = "ingress_";

/// The pin file name of the link on `ifname`, in [`PIN_SUBDIR`].
pub fn link_pin_name(ifname: &str) -> String {
    format!("{LINK_PREFIX}{}", ifname.replace('.', ":"))
}

/// The interface of a link pin file name, if it is one.
fn pin_ifname(pin: &str) -> Option<String> {
    pin.strip_prefix(LINK_PREFIX).map(|n| n.replace(':', "."))
}

/// Packet counts of the fast path, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SteerCounts {
    /// IPv4: `[direction][result]` as in `podnet_common::steer`.
    pub packets: [[u64; result::COUNT as usize]; direction::COUNT as usize],
    /// IPv6: `[direction][result]`, with IPv6's extra result.
    pub packets6: [[u64; result::COUNT_IPV6 as usize]; direction::COUNT as usize],
}

/// Label values of the counters.
pub const DIRECTION_LABELS: [&str; direction::COUNT as usize] = ["egress", "ingress"];
/// Label values of the results, indexed by `podnet_common::steer::result`
/// (IPv4 has the first [`result::COUNT`], IPv6 all of them).
pub const RESULT_LABELS: [&str; result::COUNT_IPV6 as usize] = [
    "redirected",
    "no_neighbour",
    "fib_miss",
    "passed",
    "redirect_failed",
    "extension_headers",
];

/// One count of the fast path with its labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteerSample {
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    /// `egress` or `ingress`.
    pub direction: &'static str,
    /// One of [`RESULT_LABELS`].
    pub result: &'static str,
    /// Packets.
    pub packets: u64,
}

impl SteerCounts {
    /// Every count with its labels: IPv4's, then IPv6's, direction by
    /// direction in the order of the indices.
    pub fn samples(&self) -> impl Iterator<Item = SteerSample> + '_ {
        let v4 = self.packets.iter().map(|row| &row[..]);
        let v6 = self.packets6.iter().map(|row| &row[..]);
        [("ipv4", v4.collect::<Vec<_>>()), ("ipv6", v6.collect())]
            .into_iter()
            .flat_map(|(family, rows)| {
                DIRECTION_LABELS
                    .iter()
                    .zip(rows)
                    .flat_map(move |(direction, row)| {
                        RESULT_LABELS
                            .iter()
                            .zip(row)
                            .map(move |(result, packets)| SteerSample {
                                family,
                                direction,
                                result,
                                packets: *packets,
                            })
                    })
            })
    }
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Links put in place (interface, how).
    pub attached: Vec<(String, Attachment)>,
    /// Link pins removed because their interface no longer needs steering.
    pub detached: Vec<String>,
    /// What failed.
    pub errors: Vec<String>,
}

/// The loaded fast path.
pub struct Steer {
    ebpf: Ebpf,
    pods: BpfHashMap<MapData, u32, PodRoute>,
    dests: LpmTrie<MapData, DestAddr, u32>,
    pods6: BpfHashMap<MapData, PodAddr6, PodRoute>,
    dests6: LpmTrie<MapData, DestAddr6, u32>,
    counters: PerCpuArray<MapData, u64>,
    pin_dir: PathBuf,
    /// Interfaces known to have our link: name → ifindex.
    in_place: HashMap<String, u32>,
    /// tcx: an open handle on our link of each interface of `in_place`.
    links: HashMap<String, FdLink>,
    /// tcx links or classic filters.
    mode: TcMode,
    /// Classic mode: every interface is scanned for stale filters on the
    /// next sync (set at start and by [`Steer::recheck`]).
    scan: bool,
}

impl Steer {
    /// Loads both programs with their pinned maps (kept across restarts).
    /// Traffic to or from `dns_ports` (at most
    /// [`podnet_common::steer::MAX_DNS_PORTS`]; more are ignored) is never
    /// steered.
    pub fn load(bpffs: &Path, dns_ports: &[u16], mode: TcMode) -> Result<Self, BpfError> {
        let pin_dir = bpf::fs::prepare_pin_dir(&bpffs.join(PIN_SUBDIR))?;
        unpin_resized_counters(&pin_dir)?;
        let mut config = SteerConfig::default();
        for (slot, port) in config.dns_ports.iter_mut().zip(dns_ports) {
            *slot = *port;
        }
        config.fib_flags = fib_flags();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .override_global(CONFIG_GLOBAL, &config, true)
            .load(bpf::STEER_OBJECT)
            .map_err(|e| BpfError::Load {
                object: "podnet-steer",
                source: Box::new(e),
            })?;
        for name in [POD_PROGRAM, ENI_PROGRAM] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|e| BpfError::program(name, format!("load (verifier): {e}")))?;
        }
        let pods = bpf::take_map(&mut ebpf, m::PODS)?;
        let dests = bpf::take_map(&mut ebpf, m::DESTS)?;
        let pods6 = bpf::take_map(&mut ebpf, m::PODS6)?;
        let dests6 = bpf::take_map(&mut ebpf, m::DESTS6)?;
        let counters = bpf::take_map(&mut ebpf, m::COUNTERS)?;
        Ok(Self {
            ebpf,
            pods,
            dests,
            pods6,
            dests6,
            counters,
            pin_dir,
            in_place: HashMap::new(),
            links: HashMap::new(),
            mode,
            scan: true,
        })
    }

    /// Removes every pin of the fast path (detaching its links): the kernel
    /// path carries all traffic again. Returns whether anything was pinned.
    pub fn remove(bpffs: &Path) -> Result<bool, BpfError> {
        let dir = bpffs.join(PIN_SUBDIR);
        let mut existed = dir.exists();
        bpf::fs::remove_pins(&dir)?;
        for (_, ifname) in tc::interfaces() {
            existed |= tc::detach(
                &ifname,
                TcAttachType::Ingress,
                tc::STEER_PRIORITY,
                &[POD_PROGRAM, ENI_PROGRAM],
            )?;
        }
        Ok(existed)
    }

    /// How the programs are attached.
    pub fn mode(&self) -> TcMode {
        self.mode
    }

    /// Forgets which links are known to be in place, so the next sync checks
    /// every one with the kernel again.
    pub fn recheck(&mut self) {
        self.in_place.clear();
        self.scan = true;
    }

    /// Brings maps and links in line with `desired`. `steer_dests` are the
    /// destination prefixes the fast path may steer to; `kernel_dests` are
    /// exceptions inside them (service CIDRs). Both families: IPv4 entries
    /// go to the IPv4 maps, IPv6 ones to `STEER_PODS6` and `STEER_DESTS6`.
    pub fn sync(
        &mut self,
        desired: &Desired,
        steer_dests: &[Cidr],
        kernel_dests: &[Cidr],
    ) -> SyncReport {
        let mut report = SyncReport::default();
        if let Err(e) = self.sync_maps(desired, steer_dests, kernel_dests) {
            report.errors.push(e.to_string());
        }
        let wanted: BTreeMap<&str, (u32, &'static str)> = desired
            .pod_links
            .iter()
            .map(|(n, i)| (n.as_str(), (*i, POD_PROGRAM)))
            .chain(
                desired
                    .eni_links
                    .iter()
                    .map(|(n, i)| (n.as_str(), (*i, ENI_PROGRAM))),
            )
            .collect();
        for (ifname, (ifindex, program)) in &wanted {
            if self.in_place.get(*ifname) == Some(ifindex) {
                continue;
            }
            let pin = self.pin_dir.join(link_pin_name(ifname));
            let mode = self.mode;
            let links = &mut self.links;
            match classifier(&mut self.ebpf, program).and_then(|p| match mode {
                TcMode::Tcx => {
                    attach_tcx_pinned(p, program, ifname, *ifindex, &pin).map(|(how, link)| {
                        links.insert((*ifname).to_owned(), link);
                        how
                    })
                }
                TcMode::Tc => tc::attach(
                    p,
                    program,
                    ifname,
                    TcAttachType::Ingress,
                    tc::STEER_PRIORITY,
                ),
            }) {
                Ok(how) => {
                    self.in_place.insert((*ifname).to_owned(), *ifindex);
                    if how != Attachment::Adopted {
                        tracing::info!(interface = ifname, program, %how, "fast path attached");
                    }
                    report.attached.push(((*ifname).to_owned(), how));
                }
                Err(e) => report.errors.push(format!("{ifname}: {e}")),
            }
        }
        if self.mode == TcMode::Tc {
            self.detach_stale_filters(&wanted, &mut report);
            return report;
        }
        // Links whose interface needs no steering any more, their pins
        // removed under the agent, go with their handle.
        self.links
            .retain(|ifname, _| wanted.contains_key(ifname.as_str()));
        for stale in self.stale_pins(&wanted) {
            self.in_place.remove(&stale);
            self.links.remove(&stale);
            let pin = self.pin_dir.join(link_pin_name(&stale));
            match std::fs::remove_file(&pin) {
                Ok(()) => {
                    tracing::info!(interface = %stale, "fast path detached");
                    report.detached.push(stale);
                }
                Err(e) => report.errors.push(format!("unpin {}: {e}", pin.display())),
            }
        }
        report
    }

    /// Classic mode: removes our filters from interfaces that no longer
    /// need steering (those attached by this process, and after a start or
    /// recheck those found on any interface).
    fn detach_stale_filters(
        &mut self,
        wanted: &BTreeMap<&str, (u32, &'static str)>,
        report: &mut SyncReport,
    ) {
        let mut candidates: BTreeSet<String> = self
            .in_place
            .keys()
            .filter(|n| !wanted.contains_key(n.as_str()))
            .cloned()
            .collect();
        if std::mem::take(&mut self.scan) {
            candidates.extend(
                tc::interfaces()
                    .into_iter()
                    .map(|(_, n)| n)
                    .filter(|n| !wanted.contains_key(n.as_str())),
            );
        }
        for ifname in candidates {
            self.in_place.remove(&ifname);
            match tc::detach(
                &ifname,
                TcAttachType::Ingress,
                tc::STEER_PRIORITY,
                &[POD_PROGRAM, ENI_PROGRAM],
            ) {
                Ok(true) => {
                    tracing::info!(interface = %ifname, "fast path detached (tc filter)");
                    report.detached.push(ifname);
                }
                Ok(false) => {}
                Err(e) => report.errors.push(format!("{ifname}: {e}")),
            }
        }
    }

    fn stale_pins(&self, wanted: &BTreeMap<&str, (u32, &'static str)>) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.pin_dir) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let ifname = pin_ifname(&name)?;
                (!wanted.contains_key(ifname.as_str())).then_some(ifname)
            })
            .collect()
    }

    fn sync_maps(
        &mut self,
        desired: &Desired,
        steer_dests: &[Cidr],
        kernel_dests: &[Cidr],
    ) -> Result<(), BpfError> {
        let route = |e: &crate::routing::desired::SteerEntry| PodRoute {
            eni_ifindex: e.eni_ifindex,
            eni_table: e.eni_table,
            host_ifindex: e.host_ifindex,
            _pad: 0,
        };
        let (mut pods, mut pods6) = (BTreeMap::new(), BTreeMap::new());
        for e in &desired.steer {
            match e.pod {
                IpAddr::V4(ip) => pods.insert(pod_key(ip), route(e)),
                IpAddr::V6(ip) => pods6.insert(pod_key6(ip), route(e)),
            };
        }
        sync_hash(&mut self.pods, m::PODS, &pods)?;
        sync_hash(&mut self.pods6, m::PODS6, &pods6)?;
        let actions = || {
            steer_dests
                .iter()
                .map(|c| (c, action::STEER))
                .chain(kernel_dests.iter().map(|c| (c, action::KERNEL)))
        };
        let dests: BTreeMap<(u32, [u8; 4]), u32> = actions()
            .filter_map(|(c, a)| match c.network() {
                IpAddr::V4(ip) => Some(((u32::from(c.prefix_len()), ip.octets()), a)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let dests6: BTreeMap<(u32, [u8; 16]), u32> = actions()
            .filter_map(|(c, a)| match c.network() {
                IpAddr::V6(ip) => Some(((u32::from(c.prefix_len()), ip.octets()), a)),
                IpAddr::V4(_) => None,
            })
            .collect();
        sync_trie(
            &mut self.dests,
            m::DESTS,
            &dests,
            |addr| DestAddr { addr },
            |d| d.addr,
        )?;
        sync_trie(
            &mut self.dests6,
            m::DESTS6,
            &dests6,
            |addr| DestAddr6 { addr },
            |d| d.addr,
        )?;
        Ok(())
    }

    /// Reads the packet counters.
    pub fn counts(&self) -> Result<SteerCounts, BpfError> {
        let read = |index: u32| -> Result<u64, BpfError> {
            let values = self
                .counters
                .get(&index, 0)
                .map_err(|e| BpfError::map(m::COUNTERS, e))?;
            Ok(values.iter().sum())
        };
        let mut counts = SteerCounts::default();
        for dir in 0..direction::COUNT {
            for res in 0..result::COUNT_IPV6 {
                if res < result::COUNT {
                    counts.packets[dir as usize][res as usize] = read(counter_index(dir, res))?;
                }
                counts.packets6[dir as usize][res as usize] = read(counter_index6(dir, res))?;
            }
        }
        Ok(counts)
    }

    /// Pod addresses in the kernel maps.
    pub fn pods(&self) -> BTreeSet<IpAddr> {
        let v4 = self
            .pods
            .keys()
            .filter_map(Result::ok)
            .map(|k| IpAddr::V4(Ipv4Addr::from(k.to_ne_bytes())));
        let v6 = self
            .pods6
            .keys()
            .filter_map(Result::ok)
            .map(|k| IpAddr::V6(Ipv6Addr::from(k.addr)));
        v4.chain(v6).collect()
    }
}

/// Makes the hash map `map` (named `name`) hold exactly `want`.
fn sync_hash<K: aya::Pod + Ord>(
    map: &mut BpfHashMap<MapData, K, PodRoute>,
    name: &'static str,
    want: &BTreeMap<K, PodRoute>,
) -> Result<(), BpfError> {
    for (key, value) in want {
        if map.get(key, 0).ok() != Some(*value) {
            map.insert(key, value, 0)
                .map_err(|e| BpfError::map(name, e))?;
        }
    }
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains_key(k))
        .collect();
    for key in stale {
        map.remove(&key).map_err(|e| BpfError::map(name, e))?;
    }
    Ok(())
}

/// Makes the LPM trie `trie` (named `name`) hold exactly `want`, keyed by
/// (prefix length, address bytes); `key` and `bytes` convert between the
/// bytes and the trie's key type.
fn sync_trie<A: aya::Pod, const N: usize>(
    trie: &mut LpmTrie<MapData, A, u32>,
    name: &'static str,
    want: &BTreeMap<(u32, [u8; N]), u32>,
    key: impl Fn([u8; N]) -> A,
    bytes: impl Fn(&A) -> [u8; N],
) -> Result<(), BpfError> {
    for ((prefix, addr), value) in want {
        trie.insert(&Key::new(*prefix, key(*addr)), value, 0)
            .map_err(|e| BpfError::map(name, e))?;
    }
    let stale: Vec<Key<A>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains_key(&(k.prefix_len(), bytes(&k.data()))))
        .collect();
    for k in stale {
        trie.remove(&k).map_err(|e| BpfError::map(name, e))?;
    }
    Ok(())
}

/// The pod program's `bpf_fib_lookup` flags on this kernel: the ENI table
/// directly where `BPF_FIB_LOOKUP_TBID` exists (6.5+), else the policy rules
/// (`from <pod> lookup <eni table>` selects the same table).
fn fib_flags() -> u32 {
    let tbid = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 5, 0));
    if tbid {
        fib::DIRECT | fib::TBID
    } else {
        tracing::info!("kernel before 6.5 (no BPF_FIB_LOOKUP_TBID): the fast path looks routes up through the policy rules");
        0
    }
}

/// The map key of a pod address: its bytes in network order.
fn pod_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The map key of a pod IPv6 address: its bytes in network order.
fn pod_key6(ip: Ipv6Addr) -> PodAddr6 {
    PodAddr6 { addr: ip.octets() }
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, BpfError> {
    bpf::program_mut(ebpf, name)
}

/// Removes the pinned counter map when an earlier podnet pinned it with
/// another number of counters, so the loader creates one of today's size.
///
/// The loader reuses a pinned map as it is (aya checks no sizes), and the
/// counters are indexed `direction * result::COUNT + result`: with a map of
/// the old size, today's programs would count under the wrong labels or
/// miss the slots past its end, and reading them would fail. The programs
/// still attached keep the old map until they are replaced; the counts
/// start again from zero, which counter continuity covers for `/metrics`.
fn unpin_resized_counters(pin_dir: &Path) -> Result<(), BpfError> {
    let pin = pin_dir.join(m::COUNTERS);
    if !pin.exists() {
        return Ok(());
    }
    let entries = MapData::from_pin(&pin)
        .and_then(|map| map.info())
        .map_err(|e| BpfError::map(m::COUNTERS, format!("pinned map: {e}")))?
        .max_entries();
    if entries != COUNTERS {
        std::fs::remove_file(&pin)
            .map_err(|e| BpfError::map(m::COUNTERS, format!("unpin {}: {e}", pin.display())))?;
        tracing::info!(
            pinned = entries,
            counters = COUNTERS,
            "fast path counters changed layout: their pinned map starts anew"
        );
    }
    Ok(())
}

/// Attaches `program` at the tcx ingress of `ifname` through a link pinned
/// at `pin`, or adopts the pinned link when it is still attached to this
/// interface. An adopted link that runs another instance (a previous
/// agent's load: maybe another version or other settings in its read-only
/// data, maybe the same) is switched to ours in place with
/// `bpf_link_update`: no gap, no overlap, the pinned maps carry the state
/// over, and the previous instance loses its last reference. A pinned link
/// whose interface went away is replaced by a fresh one. Returns an open
/// handle on the link, which the caller holds.
fn attach_tcx_pinned(
    program: &mut SchedClassifier,
    name: &str,
    ifname: &str,
    ifindex: u32,
    pin: &Path,
) -> Result<(Attachment, FdLink), BpfError> {
    let ours = program.info().map_err(|e| BpfError::program(name, e))?;
    let (our_id, our_tag) = (ours.id(), ours.tag());
    if pin.exists() {
        match PinnedLink::from_pin(pin) {
            Ok(pinned) => {
                let link: FdLink = pinned.into();
                let program_id = link.info().map(|i| i.program_id()).ok();
                let attached = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
                    .map(|(_, programs)| programs)
                    .unwrap_or_default();
                let live = attached.iter().find(|p| Some(p.id()) == program_id);
                match live {
                    Some(p) if p.id() == our_id => return Ok((Attachment::Adopted, link)),
                    Some(p) => {
                        let same_code = p.tag() == our_tag;
                        let link = SchedClassifierLink::try_from(link)
                            .map_err(|e| BpfError::program(name, e))?;
                        let id = program
                            .attach_to_link(link)
                            .map_err(|e| BpfError::program(name, format!("update link: {e}")))?;
                        let link = program
                            .take_link(id)
                            .map_err(|e| BpfError::program(name, e))?;
                        let link =
                            FdLink::try_from(link).map_err(|e| BpfError::program(name, e))?;
                        let how = if same_code {
                            Attachment::Adopted
                        } else {
                            Attachment::Replaced
                        };
                        return Ok((how, link));
                    }
                    None => {}
                }
            }
            Err(e) => {
                tracing::warn!(pin = %pin.display(), error = %e, "unreadable pinned link, replacing it");
            }
        }
        std::fs::remove_file(pin)
            .map_err(|e| BpfError::program(name, format!("unpin defunct link: {e}")))?;
    }
    let id = program
        .attach_with_options(
            ifname,
            TcAttachType::Ingress,
            aya::programs::tc::TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| {
            BpfError::program(name, format!("attach to {ifname} (ifindex {ifindex}): {e}"))
        })?;
    let link = program
        .take_link(id)
        .map_err(|e| BpfError::program(name, e))?;
    let pinned = FdLink::try_from(link)
        .map_err(|e| BpfError::program(name, e))?
        .pin(pin)
        .map_err(|e| BpfError::program(name, format!("pin link at {}: {e}", pin.display())))?;
    Ok((Attachment::Attached, pinned.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_avoid_dots_and_round_trip() {
        assert_eq!(link_pin_name("eth0.100"), "ingress_eth0:100");
        assert_eq!(pin_ifname("ingress_eth0:100").as_deref(), Some("eth0.100"));
        assert_eq!(pin_ifname("STEER_PODS"), None);
    }

    #[test]
    fn failed_redirects_are_a_result_of_their_own() {
        let mut counts = SteerCounts::default();
        for (i, slot) in counts.packets.iter_mut().flatten().enumerate() {
            *slot = 10 + u64::try_from(i).unwrap();
        }
        assert_eq!(
            counts
                .samples()
                .filter(|s| s.family == "ipv4")
                .map(|s| (s.direction, s.result, s.packets))
                .collect::<Vec<_>>(),
            [
                ("egress", "redirected", 10),
                ("egress", "no_neighbour", 11),
                ("egress", "fib_miss", 12),
                ("egress", "passed", 13),
                ("egress", "redirect_failed", 14),
                ("ingress", "redirected", 15),
                ("ingress", "no_neighbour", 16),
                ("ingress", "fib_miss", 17),
                ("ingress", "passed", 18),
                ("ingress", "redirect_failed", 19),
            ]
        );
        // The labels sit at the kernel's indices.
        assert_eq!(
            RESULT_LABELS[result::REDIRECT_FAILED as usize],
            "redirect_failed"
        );
        assert_eq!(RESULT_LABELS[result::REDIRECTED as usize], "redirected");
        assert_eq!(
            usize::try_from(COUNTERS).unwrap(),
            DIRECTION_LABELS.len()
                * (RESULT_LABELS.len() + usize::try_from(result::COUNT).unwrap())
        );
    }

    #[test]
    fn ipv6_counts_carry_their_family_and_extension_headers() {
        let mut counts = SteerCounts::default();
        counts.packets6[1][result::EXTENSION_HEADERS as usize] = 7;
        counts.packets6[0][result::REDIRECTED as usize] = 3;
        let samples: Vec<SteerSample> = counts.samples().collect();
        // 5 results per direction for IPv4, 6 for IPv6.
        assert_eq!(samples.len(), 2 * 5 + 2 * 6);
        let nonzero: Vec<(&str, &str, &str, u64)> = samples
            .iter()
            .filter(|s| s.packets > 0)
            .map(|s| (s.family, s.direction, s.result, s.packets))
            .collect();
        assert_eq!(
            nonzero,
            [
                ("ipv6", "egress", "redirected", 3),
                ("ipv6", "ingress", "extension_headers", 7)
            ]
        );
    }
}
