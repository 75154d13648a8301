//! What podnet changed in the cloud that a listing may not show yet.
//!
//! EC2's Describe calls are eventually consistent: for a while after an
//! Assign a listing may lack the new addresses, and after an Unassign or a
//! Delete it may still show what is gone, so a warm pool planned from the
//! listing alone assigns the same addresses again and again, and hands out
//! addresses EC2 no longer routes to the node. The ledger remembers each of
//! podnet's changes for [`SETTLE`] and corrects every listing with it before
//! anything is planned or handed out:
//! - an address assigned within `SETTLE` counts as its ENI's for planning,
//!   listed or not; it may be handed out only once a listing shows it (EC2
//!   has confirmed it);
//! - an address unassigned within `SETTLE` is neither planned with nor
//!   handed out, whatever a listing says;
//! - an ENI created within `SETTLE` counts, with its addresses, while a
//!   listing lacks it; one deleted within `SETTLE` is ignored if listed.
//!
//! As the AWS VPC CNI does. Pure: the caller gives the time.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use crate::cloud::EniInfo;

/// How long a change of podnet's outranks what a listing says. EC2's
/// listings lag its changes by seconds.
pub const SETTLE: Duration = Duration::from_mins(1);

/// podnet's recent changes.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Address -> (its ENI, when assigned).
    assigned: BTreeMap<Ipv4Addr, (String, Instant)>,
    unassigned: BTreeMap<Ipv4Addr, Instant>,
    created: BTreeMap<String, (EniInfo, Instant)>,
    deleted: BTreeMap<String, Instant>,
}

/// A listing corrected by the ledger.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Corrected {
    /// The ENIs as EC2 will list them once settled, by device index: plan
    /// with these.
    pub enis: Vec<EniInfo>,
    /// Secondary addresses the listing showed and podnet did not release
    /// since: the only ones that may be handed out.
    pub confirmed: BTreeSet<Ipv4Addr>,
    /// Addresses assigned and ENIs created that the listing did not show
    /// yet: list again soon.
    pub unconfirmed: usize,
}

impl Ledger {
    /// `ips` were assigned to `eni` at `now`.
    pub fn assigned(&mut self, eni: &str, ips: &[Ipv4Addr], now: Instant) {
        for ip in ips {
            self.unassigned.remove(ip);
            self.assigned.insert(*ip, (eni.to_owned(), now));
        }
    }

    /// `ips` were unassigned at `now`.
    pub fn unassigned(&mut self, ips: &[Ipv4Addr], now: Instant) {
        for ip in ips {
            self.assigned.remove(ip);
            self.unassigned.insert(*ip, now);
        }
    }

    /// `eni` was created and attached at `now`.
    pub fn created(&mut self, eni: EniInfo, now: Instant) {
        self.assigned(&eni.id, &eni.secondary_ips, now);
        self.created.insert(eni.id.clone(), (eni, now));
    }

    /// `eni`, holding `ips`, was detached and deleted at `now`.
    pub fn deleted(&mut self, eni: &str, ips: &[Ipv4Addr], now: Instant) {
        self.unassigned(ips, now);
        self.created.remove(eni);
        self.deleted.insert(eni.to_owned(), now);
    }

    /// Corrects `listed`, a listing of any age, with the changes of the
    /// last [`SETTLE`] before `now`.
    pub fn correct(&mut self, listed: Vec<EniInfo>, now: Instant) -> Corrected {
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < SETTLE;
        self.assigned.retain(|_, (_, at)| fresh(at));
        self.unassigned.retain(|_, at| fresh(at));
        self.created.retain(|_, (_, at)| fresh(at));
        self.deleted.retain(|_, at| fresh(at));

        let mut confirmed = BTreeSet::new();
        let mut enis: Vec<EniInfo> = listed
            .into_iter()
            .filter(|e| !self.deleted.contains_key(&e.id))
            .collect();
        for e in &mut enis {
            e.secondary_ips
                .retain(|ip| !self.unassigned.contains_key(ip));
            confirmed.extend(&e.secondary_ips);
        }
        let mut unconfirmed = 0;
        for (eni, _) in self.created.values() {
            if !enis.iter().any(|e| e.id == eni.id) {
                let mut eni = eni.clone();
                eni.secondary_ips.clear();
                enis.push(eni);
                unconfirmed += 1;
            }
        }
        for (ip, (id, _)) in &self.assigned {
            if let Some(e) = enis.iter_mut().find(|e| &e.id == id) {
                if !e.secondary_ips.contains(ip) {
                    e.secondary_ips.push(*ip);
                    unconfirmed += 1;
                }
            }
        }
        for e in &mut enis {
            e.secondary_ips.sort_unstable();
        }
        enis.sort_by_key(|e| e.device_index);
        Corrected {
            enis,
            confirmed,
            unconfirmed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::MacAddr;

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 1, n)
    }

    fn eni(id: &str, index: u32, ips: &[u8]) -> EniInfo {
        EniInfo {
            id: id.into(),
            mac: MacAddr([2, 0, 0, 0, 1, u8::try_from(index).unwrap()]),
            device_index: index,
            attachment_id: format!("att-{id}"),
            subnet_id: "subnet-1".into(),
            security_groups: vec![],
            primary_ip: ip(200 + u8::try_from(index).unwrap()),
            secondary_ips: ips.iter().map(|n| ip(*n)).collect(),
            prefixes: vec![],
            ipv6_prefixes: vec![],
            managed: index > 0,
        }
    }

    #[test]
    fn an_assign_counts_before_it_is_listed_and_is_confirmed_by_a_listing() {
        let t0 = Instant::now();
        let mut ledger = Ledger::default();
        ledger.assigned("eni-0", &[ip(10), ip(11)], t0);
        // A listing from before the assign.
        let c = ledger.correct(vec![eni("eni-0", 0, &[9])], t0 + Duration::from_secs(1));
        assert_eq!(c.enis[0].secondary_ips, vec![ip(9), ip(10), ip(11)]);
        assert_eq!(c.confirmed, BTreeSet::from([ip(9)]));
        assert_eq!(c.unconfirmed, 2);
        // A listing that shows one of them.
        let c = ledger.correct(vec![eni("eni-0", 0, &[9, 10])], t0 + Duration::from_secs(2));
        assert_eq!(c.enis[0].secondary_ips, vec![ip(9), ip(10), ip(11)]);
        assert_eq!(c.confirmed, BTreeSet::from([ip(9), ip(10)]));
        assert_eq!(c.unconfirmed, 1);
        // After SETTLE, the listing is the truth: ip(11) never showed.
        let c = ledger.correct(vec![eni("eni-0", 0, &[9, 10])], t0 + SETTLE);
        assert_eq!(c.enis[0].secondary_ips, vec![ip(9), ip(10)]);
        assert_eq!(c.unconfirmed, 0);
    }

    #[test]
    fn an_unassigned_address_is_never_handed_out_while_a_stale_listing_shows_it() {
        let t0 = Instant::now();
        let mut ledger = Ledger::default();
        ledger.unassigned(&[ip(10)], t0);
        let stale = vec![eni("eni-0", 0, &[9, 10])];
        let just_before = t0 + SETTLE.saturating_sub(Duration::from_millis(1));
        let c = ledger.correct(stale.clone(), just_before);
        assert_eq!(c.enis[0].secondary_ips, vec![ip(9)]);
        assert_eq!(c.confirmed, BTreeSet::from([ip(9)]));
        // Still listed a minute later: EC2 holds it after all.
        let c = ledger.correct(stale, t0 + SETTLE);
        assert_eq!(c.confirmed, BTreeSet::from([ip(9), ip(10)]));
    }

    #[test]
    fn a_created_eni_counts_until_listed_and_a_deleted_one_is_ignored() {
        let t0 = Instant::now();
        let mut ledger = Ledger::default();
        ledger.created(eni("eni-1", 1, &[20, 21]), t0);
        let c = ledger.correct(vec![eni("eni-0", 0, &[9])], t0);
        assert_eq!(
            c.enis.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["eni-0", "eni-1"]
        );
        assert_eq!(c.enis[1].secondary_ips, vec![ip(20), ip(21)]);
        assert_eq!(c.confirmed, BTreeSet::from([ip(9)]));
        // The ENI and its two addresses.
        assert_eq!(c.unconfirmed, 3);
        // Listed: confirmed.
        let listed = vec![eni("eni-0", 0, &[9]), eni("eni-1", 1, &[20, 21])];
        let c = ledger.correct(listed.clone(), t0);
        assert_eq!(c.enis.len(), 2);
        assert_eq!(c.confirmed, BTreeSet::from([ip(9), ip(20), ip(21)]));
        // Deleted, still listed: gone, and its addresses with it.
        ledger.deleted("eni-1", &[ip(20), ip(21)], t0);
        let c = ledger.correct(listed, t0 + Duration::from_secs(5));
        assert_eq!(c.enis.len(), 1);
        assert_eq!(c.confirmed, BTreeSet::from([ip(9)]));
    }
}
