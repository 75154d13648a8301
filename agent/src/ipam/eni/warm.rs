//! The warm pool: from the targets, the instance limits and what each ENI
//! holds, the fewest cloud calls that reach the targets. Pure.
//!
//! Semantics follow the AWS VPC CNI. With `warm_ip_target` or
//! `minimum_ip_target` set, they decide and `warm_eni_target` is ignored:
//! keep `warm_ip_target` addresses free and at least `minimum_ip_target`
//! addresses in all; assign in batches up to an ENI's free slots, and create
//! an ENI only when the attached ones are full. Otherwise every ENI is filled
//! and `warm_eni_target` ENIs' worth of addresses is kept free. Surplus is
//! released down to the targets, never an address in use or cooling down, and
//! only ENIs podnet created are deleted.
//!
//! The planner counts slots ([`SlotKind`]): addresses, or `/28` prefixes
//! with prefix delegation. Then, as the AWS VPC CNI: IP targets, when set,
//! still count addresses (enough prefixes that `warm_ip_target` addresses
//! are free, counting the free addresses of prefixes partly in use, and
//! `minimum_ip_target` held); else `warm_prefix_target` wholly free prefixes
//! are kept; else `warm_eni_target` ENIs' worth of prefixes. Only a prefix
//! with no address in use or cooling down is released.

use std::net::Ipv4Addr;

use crate::cloud::{InstanceLimits, SlotKind};

/// The warm pool targets (`--warm-ip-target`, `--minimum-ip-target`,
/// `--warm-prefix-target`, `--warm-eni-target`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Targets {
    /// Free addresses to keep.
    pub warm_ip: Option<u32>,
    /// Addresses to hold at least, free or not.
    pub minimum_ip: Option<u32>,
    /// With prefix delegation, wholly free prefixes to keep (when no IP
    /// target is set).
    pub warm_prefix: Option<u32>,
    /// Whole ENIs' worth of free slots to keep (when no other target is set).
    pub warm_eni: u32,
}

impl Default for Targets {
    /// The AWS VPC CNI's defaults: one warm ENI.
    fn default() -> Self {
        Self {
            warm_ip: None,
            minimum_ip: None,
            warm_prefix: None,
            warm_eni: 1,
        }
    }
}

impl Targets {
    fn ip_mode(&self) -> bool {
        self.warm_ip.is_some_and(|n| n > 0) || self.minimum_ip.is_some_and(|n| n > 0)
    }

    /// The free and total slots to keep when a count decides, `None` when
    /// whole ENIs do. `partly_free`: free addresses in slots partly in use.
    fn counts_in_slots(&self, kind: SlotKind, partly_free: u32) -> Option<(u32, u32)> {
        let size = kind.size();
        if self.ip_mode() {
            let warm = self.warm_ip.unwrap_or(0).saturating_sub(partly_free);
            let minimum = self.minimum_ip.unwrap_or(0);
            return Some((warm.div_ceil(size), minimum.div_ceil(size)));
        }
        match (kind, self.warm_prefix) {
            (SlotKind::Prefix, Some(n)) if n > 0 => Some((n, 0)),
            _ => None,
        }
    }
}

/// What one ENI holds, as the planner needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniView {
    /// `eni-...`.
    pub id: String,
    /// Attachment slot (0: primary).
    pub device_index: u32,
    /// Whether podnet created it.
    pub managed: bool,
    /// `eni-attach-...`.
    pub attachment_id: String,
    /// Its slots (secondary addresses, or prefixes by first address).
    pub ips: Vec<Ipv4Addr>,
    /// How many of `ips` hold an address allocated to a pod or cooling down.
    pub busy: u32,
    /// The slots that hold neither, in release order.
    pub idle: Vec<Ipv4Addr>,
    /// Free addresses in its busy slots (prefixes partly in use).
    pub partly_free: u32,
    /// Attached by someone else (not the primary, not podnet's): it takes a
    /// slot, and podnet neither uses nor changes it.
    pub foreign: bool,
}

/// One cloud change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Assign `count` slots to `eni` (one call).
    Assign {
        /// The ENI.
        eni: String,
        /// How many.
        count: u32,
    },
    /// Create an ENI with `slots` slots and attach it at `device_index`.
    CreateEni {
        /// The slot.
        device_index: u32,
        /// Secondary addresses created with it.
        slots: u32,
    },
    /// Unassign these idle slots from `eni` (one call).
    Unassign {
        /// The ENI.
        eni: String,
        /// The addresses.
        ips: Vec<Ipv4Addr>,
    },
    /// Detach and delete `eni` (podnet's, holding nothing in use).
    DeleteEni {
        /// The ENI.
        eni: String,
        /// Its attachment.
        attachment_id: String,
    },
}

/// The calls that bring `enis`, whose slots are of `kind`, to `targets`.
pub fn plan(
    targets: &Targets,
    kind: SlotKind,
    limits: &InstanceLimits,
    all: &[EniView],
) -> Vec<Action> {
    let slots_taken = count(all.len());
    let enis: Vec<EniView> = all.iter().filter(|e| !e.foreign).cloned().collect();
    let enis = &enis[..];
    let limits = &InstanceLimits {
        // Foreign interfaces take slots podnet cannot use.
        max_enis: limits
            .max_enis
            .saturating_sub(slots_taken - count(enis.len())),
        ..*limits
    };
    // Targets and limits may be as large as u32 allows (config caps the
    // targets, EC2 the limits): every sum and product saturates, so a huge
    // value asks for as much as the limits allow instead of wrapping.
    let per_eni = limits.ips_per_eni.saturating_sub(1);
    let total = sum(enis.iter().map(|e| count(e.ips.len())));
    let busy = sum(enis.iter().map(|e| e.busy));
    let free = total.saturating_sub(busy);
    let partly_free = sum(enis.iter().map(|e| e.partly_free));
    if let Some((warm, minimum)) = targets.counts_in_slots(kind, partly_free) {
        let short = warm.saturating_sub(free).max(minimum.saturating_sub(total));
        if short > 0 {
            return with_indexes(grow(*limits, enis, short, false), all);
        }
        let surplus = free.saturating_sub(warm).min(total.saturating_sub(minimum));
        return shrink_ips(enis, surplus);
    }
    let want_free = targets.warm_eni.saturating_mul(per_eni);
    // Surplus ENIs go first: filling one about to be deleted wastes calls.
    let deletions = shrink_enis(enis, free, want_free);
    if !deletions.is_empty() {
        return deletions;
    }
    // Fill every ENI, then add whole ENIs while the free addresses fall short.
    let slots = sum(enis
        .iter()
        .map(|e| per_eni.saturating_sub(count(e.ips.len()))));
    let short = want_free.saturating_sub(free.saturating_add(slots));
    let mut actions = grow(*limits, enis, slots, true);
    if short > 0 {
        let more = grow_new(
            *limits,
            enis,
            short.div_ceil(per_eni.max(1)).saturating_mul(per_eni),
            true,
        );
        actions.extend(more);
    }
    with_indexes(actions, all)
}

/// Moves new ENIs off device indexes foreign interfaces hold, to the next
/// free one; an ENI with no free index above its own is not created.
fn with_indexes(actions: Vec<Action>, all: &[EniView]) -> Vec<Action> {
    let mut taken: Vec<u32> = all.iter().map(|e| e.device_index).collect();
    actions
        .into_iter()
        .filter_map(|mut a| {
            if let Action::CreateEni { device_index, .. } = &mut a {
                *device_index = free_index(*device_index, |i| taken.contains(&i))?;
                taken.push(*device_index);
            }
            Some(a)
        })
        .collect()
}

/// The first index from `from` up that is not `taken`; `None` when every
/// one up to `u32::MAX` is.
fn free_index(from: u32, taken: impl Fn(u32) -> bool) -> Option<u32> {
    (from..=u32::MAX).find(|i| !taken(*i))
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The sum of `values`, `u32::MAX` when it does not fit.
fn sum(values: impl Iterator<Item = u32>) -> u32 {
    values.fold(0, u32::saturating_add)
}

/// Assigns `need` addresses to attached ENIs with free slots (device order),
/// then creates ENIs for the rest. `whole`: new ENIs come full.
fn grow(limits: InstanceLimits, enis: &[EniView], need: u32, whole: bool) -> Vec<Action> {
    let per_eni = limits.ips_per_eni.saturating_sub(1);
    let mut left = need;
    let mut actions = Vec::new();
    for e in enis {
        if left == 0 {
            break;
        }
        let room = per_eni.saturating_sub(count(e.ips.len()));
        let n = room.min(left);
        if n > 0 {
            actions.push(Action::Assign {
                eni: e.id.clone(),
                count: n,
            });
            left -= n;
        }
    }
    if left > 0 && !whole {
        actions.extend(grow_new(limits, enis, left, false));
    }
    actions
}

/// Creates ENIs at free device indexes for `need` addresses.
fn grow_new(limits: InstanceLimits, enis: &[EniView], need: u32, whole: bool) -> Vec<Action> {
    let per_eni = limits.ips_per_eni.saturating_sub(1);
    let mut left = need;
    let mut actions = Vec::new();
    let mut attached = count(enis.len());
    let mut index = 0;
    while left > 0 && attached < limits.max_enis && per_eni > 0 {
        let used = |i: u32| {
            enis.iter().any(|e| e.device_index == i)
                || actions.iter().any(
                    |a| matches!(a, Action::CreateEni { device_index, .. } if *device_index == i),
                )
        };
        let Some(free) = free_index(index, used) else {
            break;
        };
        index = free;
        let n = if whole { per_eni } else { left.min(per_eni) };
        actions.push(Action::CreateEni {
            device_index: index,
            slots: n,
        });
        left = left.saturating_sub(n);
        attached += 1;
    }
    actions
}

/// Releases `surplus` idle addresses: whole idle ENIs of podnet's first
/// (highest device index first), then addresses from the highest ENIs.
fn shrink_ips(enis: &[EniView], surplus: u32) -> Vec<Action> {
    let mut left = surplus;
    let mut actions = Vec::new();
    let mut order: Vec<&EniView> = enis.iter().collect();
    order.sort_by_key(|e| std::cmp::Reverse(e.device_index));
    let mut deleted = Vec::new();
    for e in &order {
        let n = count(e.ips.len());
        if deletable(e) && n <= left {
            actions.push(Action::DeleteEni {
                eni: e.id.clone(),
                attachment_id: e.attachment_id.clone(),
            });
            left -= n;
            deleted.push(e.id.clone());
        }
    }
    for e in &order {
        if left == 0 {
            break;
        }
        if deleted.contains(&e.id) || e.idle.is_empty() {
            continue;
        }
        let take = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(e.idle.len());
        actions.push(Action::Unassign {
            eni: e.id.clone(),
            ips: e.idle[..take].to_vec(),
        });
        left -= count(take);
    }
    actions
}

/// Deletes podnet's idle ENIs (highest device index first) while the free
/// addresses left still meet `want_free`.
fn shrink_enis(enis: &[EniView], free: u32, want_free: u32) -> Vec<Action> {
    let mut free = free;
    let mut order: Vec<&EniView> = enis.iter().collect();
    order.sort_by_key(|e| std::cmp::Reverse(e.device_index));
    let mut actions = Vec::new();
    for e in order {
        let n = count(e.ips.len());
        if deletable(e) && free.saturating_sub(n) >= want_free {
            actions.push(Action::DeleteEni {
                eni: e.id.clone(),
                attachment_id: e.attachment_id.clone(),
            });
            free = free.saturating_sub(n);
        }
    }
    actions
}

/// Podnet's, not the primary, nothing allocated or cooling down.
fn deletable(e: &EniView) -> bool {
    e.managed && e.device_index != 0 && e.busy == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const T3_MEDIUM: InstanceLimits = InstanceLimits {
        max_enis: 3,
        ips_per_eni: 6,
    };

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 1, n)
    }

    fn eni(id: &str, device_index: u32, managed: bool, ips: &[u8], busy: &[u8]) -> EniView {
        EniView {
            id: id.into(),
            device_index,
            managed,
            attachment_id: format!("att-{id}"),
            ips: ips.iter().map(|n| ip(*n)).collect(),
            busy: count(busy.len()),
            idle: ips
                .iter()
                .filter(|n| !busy.contains(n))
                .map(|n| ip(*n))
                .collect(),
            foreign: false,
            partly_free: 0,
        }
    }

    #[test]
    fn huge_targets_and_limits_saturate_instead_of_wrapping() {
        let huge = InstanceLimits {
            max_enis: u32::MAX,
            ips_per_eni: u32::MAX,
        };
        let primary = eni("eni-0", 0, false, &[], &[]);
        let per_eni = u32::MAX - 1;
        // warm_eni * per_eni does not fit u32: as many as the limits allow.
        let targets = Targets {
            warm_ip: None,
            minimum_ip: None,
            warm_prefix: None,
            warm_eni: u32::MAX,
        };
        assert_eq!(
            plan(
                &targets,
                SlotKind::Address,
                &huge,
                std::slice::from_ref(&primary)
            ),
            [
                Action::Assign {
                    eni: "eni-0".into(),
                    count: per_eni,
                },
                Action::CreateEni {
                    device_index: 1,
                    slots: per_eni,
                },
            ]
        );
        // IP targets at u32::MAX stop at the instance's three ENIs.
        assert_eq!(
            plan(
                &ip_target(Some(u32::MAX), Some(u32::MAX)),
                SlotKind::Address,
                &T3_MEDIUM,
                std::slice::from_ref(&primary)
            ),
            [
                Action::Assign {
                    eni: "eni-0".into(),
                    count: 5,
                },
                Action::CreateEni {
                    device_index: 1,
                    slots: 5,
                },
                Action::CreateEni {
                    device_index: 2,
                    slots: 5,
                },
            ]
        );
        // Busy counts whose sum does not fit u32.
        let mut a = eni("eni-0", 0, false, &[], &[]);
        let mut b = eni("eni-1", 1, true, &[], &[]);
        a.busy = u32::MAX;
        b.busy = u32::MAX;
        assert_eq!(
            plan(&Targets::default(), SlotKind::Address, &T3_MEDIUM, &[a, b]),
            [
                Action::Assign {
                    eni: "eni-0".into(),
                    count: 5,
                },
                Action::Assign {
                    eni: "eni-1".into(),
                    count: 5,
                },
            ]
        );
        assert_eq!(huge.max_pods(SlotKind::Address), u32::MAX);
        assert_eq!(T3_MEDIUM.max_pods(SlotKind::Address), 15);
        assert_eq!(T3_MEDIUM.max_pods(SlotKind::Prefix), 240);
    }

    #[test]
    fn a_new_eni_with_no_free_device_index_is_not_created() {
        let mut last = eni("eni-x", u32::MAX, false, &[], &[]);
        last.foreign = true;
        let create = |device_index| Action::CreateEni {
            device_index,
            slots: 5,
        };
        assert_eq!(
            with_indexes(vec![create(u32::MAX), create(7)], &[last.clone()]),
            [create(7)]
        );
        last.device_index = u32::MAX - 1;
        assert_eq!(
            with_indexes(vec![create(u32::MAX - 1)], &[last]),
            [create(u32::MAX)]
        );
    }

    fn ip_target(warm: Option<u32>, minimum: Option<u32>) -> Targets {
        Targets {
            warm_ip: warm,
            minimum_ip: minimum,
            warm_prefix: None,
            warm_eni: 1,
        }
    }

    #[test]
    fn warm_ip_target_on_a_fresh_node_is_one_batch() {
        let enis = [eni("eni-0", 0, false, &[], &[])];
        assert_eq!(
            plan(
                &ip_target(Some(5), None),
                SlotKind::Address,
                &T3_MEDIUM,
                &enis
            ),
            [Action::Assign {
                eni: "eni-0".into(),
                count: 5
            }]
        );
    }

    #[test]
    fn a_full_eni_leads_to_one_new_eni_with_the_shortfall() {
        let enis = [eni("eni-0", 0, false, &[10, 11, 12, 13, 14], &[10])];
        assert_eq!(
            plan(
                &ip_target(Some(5), None),
                SlotKind::Address,
                &T3_MEDIUM,
                &enis
            ),
            [Action::CreateEni {
                device_index: 1,
                slots: 1
            }]
        );
        // Batches across ENIs: 2 slots left on eni-0, the rest on a new one.
        let enis = [eni("eni-0", 0, false, &[10, 11, 12], &[10, 11, 12])];
        assert_eq!(
            plan(
                &ip_target(Some(7), None),
                SlotKind::Address,
                &T3_MEDIUM,
                &enis
            ),
            [
                Action::Assign {
                    eni: "eni-0".into(),
                    count: 2
                },
                Action::CreateEni {
                    device_index: 1,
                    slots: 5
                },
            ]
        );
    }

    #[test]
    fn minimum_ip_target_is_a_floor_and_limits_cap_growth() {
        let enis = [eni("eni-0", 0, false, &[], &[])];
        assert_eq!(
            plan(
                &ip_target(None, Some(20)),
                SlotKind::Address,
                &T3_MEDIUM,
                &enis
            ),
            [
                Action::Assign {
                    eni: "eni-0".into(),
                    count: 5
                },
                Action::CreateEni {
                    device_index: 1,
                    slots: 5
                },
                Action::CreateEni {
                    device_index: 2,
                    slots: 5
                },
            ]
        );
        // At the floor with nothing to spare: no call.
        let enis = [eni("eni-0", 0, false, &[10, 11], &[])];
        assert!(plan(
            &ip_target(Some(1), Some(2)),
            SlotKind::Address,
            &T3_MEDIUM,
            &enis
        )
        .is_empty());
    }

    #[test]
    fn surplus_is_released_but_never_busy_addresses_or_foreign_enis() {
        // 9 addresses, 1 busy, want 2 free: release 6, the idle ENI of podnet's
        // first (4 addresses) then 2 idle ones from eni-0.
        let enis = [
            eni("eni-0", 0, false, &[10, 11, 12, 13, 14], &[10]),
            eni("eni-1", 1, true, &[20, 21, 22, 23], &[]),
        ];
        assert_eq!(
            plan(
                &ip_target(Some(2), None),
                SlotKind::Address,
                &T3_MEDIUM,
                &enis
            ),
            [
                Action::DeleteEni {
                    eni: "eni-1".into(),
                    attachment_id: "att-eni-1".into()
                },
                Action::Unassign {
                    eni: "eni-0".into(),
                    ips: vec![ip(11), ip(12)]
                },
            ]
        );
        // Not podnet's: addresses are unassigned, the ENI stays.
        let enis = [
            eni("eni-0", 0, false, &[10], &[10]),
            eni("eni-1", 1, false, &[20, 21, 22, 23], &[]),
        ];
        assert_eq!(
            plan(
                &ip_target(Some(2), None),
                SlotKind::Address,
                &T3_MEDIUM,
                &enis
            ),
            [Action::Unassign {
                eni: "eni-1".into(),
                ips: vec![ip(20), ip(21)]
            }]
        );
        // Everything busy or cooling: nothing to release.
        let enis = [eni("eni-0", 0, false, &[10, 11, 12], &[10, 11, 12])];
        assert!(plan(
            &ip_target(Some(0), Some(1)),
            SlotKind::Address,
            &T3_MEDIUM,
            &enis
        )
        .is_empty());
    }

    #[test]
    fn warm_eni_target_fills_enis_and_keeps_one_spare() {
        let targets = Targets::default();
        let enis = [eni("eni-0", 0, false, &[], &[])];
        assert_eq!(
            plan(&targets, SlotKind::Address, &T3_MEDIUM, &enis),
            [Action::Assign {
                eni: "eni-0".into(),
                count: 5
            }]
        );
        let enis = [eni("eni-0", 0, false, &[10, 11, 12, 13, 14], &[10])];
        assert_eq!(
            plan(&targets, SlotKind::Address, &T3_MEDIUM, &enis),
            [Action::CreateEni {
                device_index: 1,
                slots: 5
            }]
        );
        // Two spare ENIs' worth: podnet's idle one goes.
        let enis = [
            eni("eni-0", 0, false, &[10, 11, 12, 13, 14], &[]),
            eni("eni-1", 1, true, &[20, 21, 22, 23, 24], &[]),
        ];
        assert_eq!(
            plan(&targets, SlotKind::Address, &T3_MEDIUM, &enis),
            [Action::DeleteEni {
                eni: "eni-1".into(),
                attachment_id: "att-eni-1".into()
            }]
        );
        // Full instance: no call.
        let full = [
            eni(
                "eni-0",
                0,
                false,
                &[10, 11, 12, 13, 14],
                &[10, 11, 12, 13, 14],
            ),
            eni(
                "eni-1",
                1,
                true,
                &[20, 21, 22, 23, 24],
                &[20, 21, 22, 23, 24],
            ),
            eni(
                "eni-2",
                2,
                true,
                &[30, 31, 32, 33, 34],
                &[30, 31, 32, 33, 34],
            ),
        ];
        assert!(plan(&targets, SlotKind::Address, &T3_MEDIUM, &full).is_empty());
        assert!(plan(
            &ip_target(Some(5), None),
            SlotKind::Address,
            &T3_MEDIUM,
            &full
        )
        .is_empty());
    }

    #[test]
    fn foreign_enis_take_a_slot_and_are_left_alone() {
        let mut other = eni("eni-9", 1, false, &[20, 21], &[]);
        other.foreign = true;
        let enis = [
            eni(
                "eni-0",
                0,
                false,
                &[10, 11, 12, 13, 14],
                &[10, 11, 12, 13, 14],
            ),
            other,
        ];
        // One slot left (3 - 2): one new ENI at index 2, not 1.
        assert_eq!(
            plan(
                &ip_target(Some(8), None),
                SlotKind::Address,
                &T3_MEDIUM,
                &enis
            ),
            [Action::CreateEni {
                device_index: 2,
                slots: 5
            }]
        );
        // Surplus never touches it.
        let enis = [eni("eni-0", 0, false, &[10], &[]), enis[1].clone()];
        assert!(plan(
            &ip_target(Some(1), None),
            SlotKind::Address,
            &T3_MEDIUM,
            &enis
        )
        .is_empty());
    }
}
