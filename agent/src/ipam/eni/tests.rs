//! ENI mode against a fake cloud and fake links.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use super::{
    link::{LinkInfo, Links},
    manager::test_worker,
    pool::EniPool,
    warm::Targets,
    BusyFn,
};
use crate::{
    cloud::{
        CloudError, CloudProvider, DetachedEni, EniInfo, InstanceIdentity, InstanceLimits,
        SlotKind, SubnetInfo,
    },
    ipam::source::AddressSource,
    net::MacAddr,
};

#[derive(Default)]
struct FakeCloud {
    enis: Mutex<Vec<EniInfo>>,
    /// Listings lag this many listings behind the changes (EC2's eventual
    /// consistency).
    lag: Mutex<usize>,
    listings: Mutex<Vec<Vec<EniInfo>>>,
    /// podnet's interfaces attached nowhere.
    detached: Mutex<Vec<DetachedEni>>,
    next_ip: Mutex<u8>,
    /// The next delegated prefix's first address.
    next_prefix: Mutex<u32>,
    calls: Mutex<Vec<String>>,
    fail: Mutex<Option<CloudError>>,
}

fn mac(n: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 1, n])
}

impl FakeCloud {
    fn new() -> Self {
        let c = Self::default();
        *c.next_ip.lock().unwrap() = 10;
        *c.next_prefix.lock().unwrap() = u32::from(Ipv4Addr::new(10, 0, 16, 0));
        c.enis.lock().unwrap().push(EniInfo {
            id: "eni-0".into(),
            mac: mac(0),
            device_index: 0,
            attachment_id: "att-0".into(),
            subnet_id: "subnet-1".into(),
            security_groups: vec!["sg-1".into()],
            primary_ip: Ipv4Addr::new(10, 0, 1, 5),
            secondary_ips: vec![],
            prefixes: vec![],
            ipv6_prefixes: vec![],
            managed: false,
        });
        c
    }

    fn call(&self, name: &str) -> Result<(), CloudError> {
        self.calls.lock().unwrap().push(name.into());
        match self.fail.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn new_ips(&self, n: u32) -> Vec<Ipv4Addr> {
        let mut next = self.next_ip.lock().unwrap();
        (0..n)
            .map(|_| {
                *next += 1;
                Ipv4Addr::new(10, 0, 1, *next)
            })
            .collect()
    }

    /// `n` new `/28` prefixes, by first address.
    fn new_prefixes(&self, n: u32) -> Vec<Ipv4Addr> {
        let mut next = self.next_prefix.lock().unwrap();
        (0..n)
            .map(|_| {
                let first = Ipv4Addr::from(*next);
                *next += 16;
                first
            })
            .collect()
    }

    /// `n` new slots of `kind`, by first address.
    fn new_slots(&self, kind: SlotKind, n: u32) -> Vec<Ipv4Addr> {
        match kind {
            SlotKind::Address => self.new_ips(n),
            SlotKind::Prefix => self.new_prefixes(n),
        }
    }

    fn count(&self, name: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| *c == name)
            .count()
    }
}

impl CloudProvider for FakeCloud {
    fn identity(&self) -> Result<InstanceIdentity, CloudError> {
        Ok(InstanceIdentity {
            instance_id: "i-1".into(),
            instance_type: "t3.medium".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            mac: mac(0),
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.1.0/24".parse().unwrap(),
            security_groups: vec!["sg-1".into()],
        })
    }

    fn limits(&self, _: &str) -> Result<InstanceLimits, CloudError> {
        self.call("DescribeInstanceTypes")?;
        Ok(InstanceLimits {
            max_enis: 3,
            ips_per_eni: 6,
        })
    }

    fn list_enis(&self, _: &str) -> Result<Vec<EniInfo>, CloudError> {
        self.call("DescribeNetworkInterfaces")?;
        let mut listings = self.listings.lock().unwrap();
        listings.push(self.enis.lock().unwrap().clone());
        let lag = *self.lag.lock().unwrap();
        Ok(listings[listings.len().saturating_sub(lag + 1)].clone())
    }

    fn create_and_attach_eni(
        &self,
        _: &str,
        subnet_id: &str,
        security_groups: &[String],
        device_index: u32,
        kind: SlotKind,
        slots: u32,
    ) -> Result<EniInfo, CloudError> {
        self.call("CreateNetworkInterface")?;
        self.call("AttachNetworkInterface")?;
        let primary = self.new_ips(1)[0];
        let id = format!("eni-{device_index}");
        let mut eni = EniInfo {
            id,
            mac: mac(u8::try_from(device_index).unwrap()),
            device_index,
            attachment_id: format!("att-{device_index}"),
            subnet_id: subnet_id.into(),
            security_groups: security_groups.to_vec(),
            primary_ip: primary,
            secondary_ips: Vec::new(),
            prefixes: Vec::new(),
            ipv6_prefixes: Vec::new(),
            managed: true,
        };
        add_slots(&mut eni, kind, &self.new_slots(kind, slots));
        self.enis.lock().unwrap().push(eni.clone());
        Ok(eni)
    }

    fn assign(&self, eni: &str, kind: SlotKind, count: u32) -> Result<Vec<Ipv4Addr>, CloudError> {
        self.call("AssignPrivateIpAddresses")?;
        let slots = self.new_slots(kind, count);
        let mut enis = self.enis.lock().unwrap();
        let e = enis.iter_mut().find(|e| e.id == eni).unwrap();
        add_slots(e, kind, &slots);
        Ok(slots)
    }

    fn assign_ipv6_prefix(&self, eni: &str) -> Result<crate::net::Cidr, CloudError> {
        self.call("AssignIpv6Addresses")?;
        let prefix: crate::net::Cidr = "2600:1f18:1:100:7a8b::/80".parse().unwrap();
        let mut enis = self.enis.lock().unwrap();
        enis.iter_mut()
            .find(|e| e.id == eni)
            .unwrap()
            .ipv6_prefixes
            .push(prefix);
        Ok(prefix)
    }

    fn unassign(&self, eni: &str, kind: SlotKind, slots: &[Ipv4Addr]) -> Result<(), CloudError> {
        self.call("UnassignPrivateIpAddresses")?;
        let mut enis = self.enis.lock().unwrap();
        let e = enis.iter_mut().find(|e| e.id == eni).unwrap();
        match kind {
            SlotKind::Address => e.secondary_ips.retain(|ip| !slots.contains(ip)),
            SlotKind::Prefix => e
                .prefixes
                .retain(|p| !slots.contains(&p.network_v4().unwrap())),
        }
        Ok(())
    }

    fn list_detached_enis(&self, _: &str) -> Result<Vec<DetachedEni>, CloudError> {
        self.call("DescribeNetworkInterfaces")?;
        Ok(self.detached.lock().unwrap().clone())
    }

    fn describe_subnet(&self, _: &str) -> Result<SubnetInfo, CloudError> {
        self.call("DescribeSubnets")?;
        Ok(SubnetInfo {
            cidr: "10.0.1.0/24".parse().unwrap(),
            free: 200,
        })
    }

    fn delete_eni(&self, eni: &str) -> Result<(), CloudError> {
        self.call("DeleteNetworkInterface")?;
        self.detached.lock().unwrap().retain(|d| d.id != eni);
        Ok(())
    }

    fn detach_and_delete_eni(&self, eni: &str, _: &str) -> Result<(), CloudError> {
        self.call("DetachNetworkInterface")?;
        self.call("DeleteNetworkInterface")?;
        self.enis.lock().unwrap().retain(|e| e.id != eni);
        Ok(())
    }
}

/// Adds `slots` of `kind` to `eni` as EC2 lists them.
fn add_slots(eni: &mut EniInfo, kind: SlotKind, slots: &[Ipv4Addr]) {
    match kind {
        SlotKind::Address => eni.secondary_ips.extend(slots),
        SlotKind::Prefix => eni.prefixes.extend(
            slots
                .iter()
                .map(|s| crate::net::Cidr::new(IpAddr::V4(*s), 28).unwrap()),
        ),
    }
}

/// Every ENI's link exists, down at MTU 1500.
struct FakeLinks {
    cloud: Arc<FakeCloud>,
    up: Mutex<Vec<String>>,
}

impl Links for FakeLinks {
    fn list(&self) -> Result<Vec<(MacAddr, LinkInfo)>, String> {
        let up = self.up.lock().unwrap();
        Ok(self
            .cloud
            .enis
            .lock()
            .unwrap()
            .iter()
            .map(|e| {
                let name = format!("eth{}", e.device_index);
                let is_up = up.contains(&name);
                (
                    e.mac,
                    LinkInfo {
                        up: is_up,
                        mtu: if is_up { 9001 } else { 1500 },
                        name,
                    },
                )
            })
            .collect())
    }

    fn bring_up(&self, name: &str, _: u32) -> Result<(), String> {
        self.up.lock().unwrap().push(name.into());
        Ok(())
    }
}

type Busy = Arc<Mutex<(BTreeSet<IpAddr>, BTreeSet<IpAddr>)>>;

fn setup(
    targets: Targets,
) -> (
    super::manager::Worker,
    Arc<FakeCloud>,
    EniPool,
    Busy,
    Arc<FakeLinks>,
) {
    let cloud = Arc::new(FakeCloud::new());
    let links = Arc::new(FakeLinks {
        cloud: cloud.clone(),
        up: Mutex::new(Vec::new()),
    });
    let busy: Busy = Arc::default();
    let b = busy.clone();
    let busy_fn: BusyFn = Arc::new(move || b.lock().unwrap().clone());
    let pool = EniPool::new();
    let (worker, _) = test_worker(targets, cloud.clone(), links.clone(), busy_fn, pool.clone());
    (worker, cloud, pool, busy, links)
}

fn run_until_settled(worker: &super::manager::Worker, rounds: usize) {
    let cloud_id = worker.cloud.identity().unwrap();
    let limits = worker.cloud.limits("t3.medium").unwrap();
    for _ in 0..rounds {
        let round = worker.reconcile(&cloud_id, limits).unwrap();
        if round.changes == 0 {
            return;
        }
    }
    panic!("did not settle");
}

#[test]
fn warm_ip_target_then_a_new_eni_without_primaries() {
    let targets = Targets {
        warm_ip: Some(5),
        minimum_ip: None,
        warm_prefix: None,
        warm_eni: 1,
    };
    let (worker, cloud, pool, busy, links) = setup(targets);
    run_until_settled(&worker, 5);
    assert_eq!(cloud.count("AssignPrivateIpAddresses"), 1);
    assert_eq!(cloud.count("CreateNetworkInterface"), 0);
    assert_eq!(pool.capacity(), 5);
    assert!(!pool.is_usable(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5))));
    // One pod: 4 free, one short, eni-0 full: one new ENI with one address.
    let first = pool.next_after(None).unwrap();
    busy.lock().unwrap().0.insert(first);
    run_until_settled(&worker, 5);
    assert_eq!(cloud.count("AssignPrivateIpAddresses"), 1);
    assert_eq!(cloud.count("CreateNetworkInterface"), 1);
    assert_eq!(cloud.count("AttachNetworkInterface"), 1);
    assert_eq!(pool.capacity(), 6);
    // The new ENI's link was brought up, the primary's left alone.
    assert_eq!(*links.up.lock().unwrap(), ["eth1"]);
    let enis = cloud.enis.lock().unwrap().clone();
    for e in &enis {
        assert!(!pool.is_usable(IpAddr::V4(e.primary_ip)));
    }
}

#[test]
fn surplus_release_spares_busy_and_cooling_addresses() {
    let (worker, cloud, pool, busy, _) = setup(Targets {
        warm_ip: None,
        minimum_ip: Some(5),
        warm_prefix: None,
        warm_eni: 1,
    });
    run_until_settled(&worker, 5);
    let ips: Vec<IpAddr> = pool.ready().into_iter().collect();
    assert_eq!(ips.len(), 5);
    // Lower the floor: one allocated, one cooling, three idle; with minimum
    // 0 and warm 1, two of the idle ones go.
    {
        let mut b = busy.lock().unwrap();
        b.0.insert(ips[0]);
        b.1.insert(ips[1]);
    }
    let (worker2, _) = test_worker(
        Targets {
            warm_ip: Some(1),
            minimum_ip: None,
            warm_prefix: None,
            warm_eni: 1,
        },
        cloud.clone(),
        worker.links.clone(),
        worker.busy.clone(),
        pool.clone(),
    );
    run_until_settled(&worker2, 5);
    assert_eq!(cloud.count("UnassignPrivateIpAddresses"), 1);
    let left: Vec<IpAddr> = cloud.enis.lock().unwrap()[0]
        .secondary_ips
        .iter()
        .map(|ip| IpAddr::V4(*ip))
        .collect();
    assert_eq!(left.len(), 3);
    assert!(left.contains(&ips[0]) && left.contains(&ips[1]));
}

#[test]
fn cloud_errors_keep_the_pool() {
    let (worker, cloud, pool, _, _) = setup(Targets {
        warm_ip: Some(3),
        minimum_ip: None,
        warm_prefix: None,
        warm_eni: 1,
    });
    run_until_settled(&worker, 5);
    assert_eq!(pool.capacity(), 3);
    *cloud.fail.lock().unwrap() = Some(CloudError::Api {
        action: "DescribeNetworkInterfaces".into(),
        code: "RequestLimitExceeded".into(),
        message: "Request limit exceeded.".into(),
    });
    let id = worker.cloud.identity().unwrap();
    let limits = InstanceLimits {
        max_enis: 3,
        ips_per_eni: 6,
    };
    let e = worker.reconcile(&id, limits).unwrap_err();
    assert!(e.to_string().contains("RequestLimitExceeded"), "{e}");
    assert_eq!(pool.capacity(), 3);
}

#[test]
fn backoff_doubles_to_the_cap() {
    let mut b = super::manager::Backoff::default();
    let waits: Vec<u64> = (0..7).map(|_| b.next_wait().as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 16, 16]);
    b.reset();
    assert_eq!(b.next_wait().as_secs(), 1);
}

#[test]
fn an_eni_past_the_last_routing_table_is_not_published() {
    let (worker, cloud, _, busy, _) = setup(Targets::default());
    let far = Ipv4Addr::new(10, 0, 1, 200);
    cloud.enis.lock().unwrap().push(EniInfo {
        id: "eni-far".into(),
        mac: mac(9),
        device_index: u32::MAX,
        attachment_id: "att-far".into(),
        subnet_id: "subnet-1".into(),
        security_groups: vec!["sg-1".into()],
        primary_ip: Ipv4Addr::new(10, 0, 1, 199),
        secondary_ips: vec![far],
        prefixes: vec![],
        ipv6_prefixes: vec![],
        managed: true,
    });
    // In use, so the plan keeps the interface.
    busy.lock().unwrap().0.insert(IpAddr::V4(far));
    let store = crate::routing::eni::EniStore::new();
    *worker.shared.routing.lock().unwrap() = Some(store.clone());
    let id = worker.cloud.identity().unwrap();
    let limits = worker.cloud.limits("t3.medium").unwrap();
    worker.reconcile(&id, limits).unwrap();
    let published: Vec<(String, u32)> = store
        .enis()
        .into_iter()
        .map(|e| (e.name, e.table))
        .collect();
    assert_eq!(published, [("eth0".to_owned(), 100)]);
    assert_eq!(super::manager::table_of(u32::MAX), None);
    assert_eq!(super::manager::table_of(1), Some(101));
}

/// Every address the pool may hand out is one the cloud holds now.
fn assert_pool_is_held(pool: &EniPool, cloud: &FakeCloud) {
    let held: BTreeSet<IpAddr> = cloud
        .enis
        .lock()
        .unwrap()
        .iter()
        .flat_map(|e| e.secondary_ips.iter().map(|ip| IpAddr::V4(*ip)))
        .collect();
    let ready = pool.ready();
    assert!(ready.is_subset(&held), "{ready:?} not all in {held:?}");
}

#[test]
fn stale_listings_neither_repeat_changes_nor_hand_out_unconfirmed_addresses() {
    let (worker, cloud, pool, busy, _) = setup(Targets {
        warm_ip: Some(5),
        minimum_ip: None,
        warm_prefix: None,
        warm_eni: 1,
    });
    // Each listing shows the cloud as it was three listings earlier.
    *cloud.lag.lock().unwrap() = 3;
    let id = worker.cloud.identity().unwrap();
    let limits = worker.cloud.limits("t3.medium").unwrap();
    let rounds = |n: usize| -> Vec<u128> {
        (0..n)
            .map(|_| {
                worker.reconcile(&id, limits).unwrap();
                assert_pool_is_held(&pool, &cloud);
                pool.capacity()
            })
            .collect()
    };
    // Round 1 assigns 5; rounds 2-4 list the cloud from before; round 5
    // shows them.
    assert_eq!(rounds(6), [0, 0, 0, 0, 5, 5]);
    assert_eq!(cloud.count("AssignPrivateIpAddresses"), 1);

    // One pod: one ENI more (with one address), created once.
    let first = pool.next_after(None).unwrap();
    busy.lock().unwrap().0.insert(first);
    assert_eq!(rounds(6), [5, 5, 5, 5, 6, 6]);
    assert_eq!(cloud.count("CreateNetworkInterface"), 1);
    assert_eq!(cloud.count("AssignPrivateIpAddresses"), 1);

    // The pod leaves: one address too many. Whatever is released leaves the
    // pool at once although the next listings still show it.
    busy.lock().unwrap().0.clear();
    assert_eq!(rounds(6), [5, 5, 5, 5, 5, 5]);
    let released =
        cloud.count("UnassignPrivateIpAddresses") + cloud.count("DeleteNetworkInterface");
    assert_eq!(released, 1);
    assert_eq!(cloud.count("CreateNetworkInterface"), 1);
    assert_eq!(cloud.count("AssignPrivateIpAddresses"), 1);
}

#[test]
fn a_sweep_deletes_only_enis_attached_nowhere_past_the_grace() {
    let (worker, cloud, _, _, _) = setup(Targets::default());
    let now = crate::sys::unix_now_s();
    let grace = super::DEFAULT_LEAK_GRACE.as_secs();
    *cloud.detached.lock().unwrap() = vec![
        DetachedEni {
            id: "eni-old".into(),
            created_unix_s: Some(now - grace - 1),
        },
        DetachedEni {
            id: "eni-new".into(),
            created_unix_s: Some(now - 1),
        },
        // Made before podnet tagged creation times: first seen now.
        DetachedEni {
            id: "eni-untagged".into(),
            created_unix_s: None,
        },
    ];
    // Next sweep when the youngest reaches the grace.
    let again = worker.sweep("i-1").as_secs();
    assert!((grace - 1..=grace).contains(&again), "{again}");
    let left: Vec<String> = cloud
        .detached
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.id.clone())
        .collect();
    assert_eq!(left, ["eni-new", "eni-untagged"]);
    assert_eq!(cloud.count("DeleteNetworkInterface"), 1);
    // The untagged one is remembered from its first sweep.
    assert_eq!(
        worker
            .first_seen_detached
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        ["eni-untagged"]
    );
}

/// Prefix delegation with the AWS VPC CNI's IP targets: enough prefixes
/// for `minimum_ip_target` addresses, then one more when the free
/// addresses (in prefixes partly used too) fall below `warm_ip_target`;
/// every address of a confirmed prefix is handed out, and only wholly idle
/// prefixes are released.
#[test]
fn prefix_delegation_counts_addresses_in_prefixes() {
    let (mut worker, cloud, pool, busy, _) = setup(Targets {
        warm_ip: Some(5),
        minimum_ip: Some(20),
        warm_prefix: None,
        warm_eni: 1,
    });
    worker.kind = SlotKind::Prefix;
    run_until_settled(&worker, 5);
    // 20 addresses: two /28s, in one call.
    assert_eq!(cloud.count("AssignPrivateIpAddresses"), 1);
    let prefixes = cloud.enis.lock().unwrap()[0].prefixes.clone();
    assert_eq!(
        prefixes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.0.16.0/28", "10.0.16.16/28"]
    );
    assert_eq!(pool.capacity(), 32);
    assert!(pool.is_usable("10.0.16.0".parse().unwrap()));
    assert!(pool.is_usable("10.0.16.31".parse().unwrap()));
    // 28 pods: 4 free addresses, below 5: one more prefix.
    let ips: Vec<IpAddr> = pool.ready().into_iter().take(28).collect();
    busy.lock().unwrap().0.extend(ips.iter().copied());
    run_until_settled(&worker, 5);
    assert_eq!(cloud.count("AssignPrivateIpAddresses"), 2);
    assert_eq!(pool.capacity(), 48);
    // 27 pods leave: one pod holds the first prefix, two are idle; minimum
    // 20 keeps two prefixes, so the highest idle one is released.
    busy.lock().unwrap().0 = ips[..1].iter().copied().collect();
    run_until_settled(&worker, 5);
    assert_eq!(cloud.count("UnassignPrivateIpAddresses"), 1);
    let left: Vec<String> = cloud.enis.lock().unwrap()[0]
        .prefixes
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(left, ["10.0.16.0/28", "10.0.16.16/28"]);
    assert_eq!(pool.capacity(), 32);
}

/// `--warm-prefix-target` keeps that many wholly free prefixes: one pod
/// in the only prefix brings a second.
#[test]
fn warm_prefix_target_keeps_whole_prefixes_free() {
    let (mut worker, cloud, pool, busy, _) = setup(Targets {
        warm_ip: None,
        minimum_ip: None,
        warm_prefix: Some(1),
        warm_eni: 1,
    });
    worker.kind = SlotKind::Prefix;
    run_until_settled(&worker, 5);
    assert_eq!(cloud.count("AssignPrivateIpAddresses"), 1);
    assert_eq!(pool.capacity(), 16);
    let first = pool.next_after(None).unwrap();
    busy.lock().unwrap().0.insert(first);
    run_until_settled(&worker, 5);
    assert_eq!(cloud.count("AssignPrivateIpAddresses"), 2);
    assert_eq!(cloud.enis.lock().unwrap()[0].prefixes.len(), 2);
    assert_eq!(pool.capacity(), 32);
}

/// `--eni-ipv6`: one prefix delegated to the primary ENI, in one call,
/// handed out only once a listing shows it (two listings behind here).
#[test]
fn ipv6_prefix_is_delegated_once_and_handed_out_when_listed() {
    let (mut worker, cloud, _, _, _) = setup(Targets {
        warm_ip: Some(1),
        minimum_ip: None,
        warm_prefix: None,
        warm_eni: 1,
    });
    let pool6 = super::ipv6::Ipv6Pool::default();
    worker.ipv6 = Some(pool6.clone());
    *cloud.lag.lock().unwrap() = 2;
    let id = worker.cloud.identity().unwrap();
    let limits = worker.cloud.limits("t3.medium").unwrap();
    for _ in 0..2 {
        let round = worker.reconcile(&id, limits).unwrap();
        assert_eq!(pool6.capacity(), 0);
        assert!(round.unconfirmed > 0 || round.changes > 0, "{round:?}");
    }
    // The listings catch up: no second call meanwhile.
    for _ in 0..3 {
        worker.reconcile(&id, limits).unwrap();
    }
    assert_eq!(cloud.count("AssignIpv6Addresses"), 1);
    assert_eq!(
        pool6.prefix().map(|p| p.to_string()).as_deref(),
        Some("2600:1f18:1:100:7a8b::/80")
    );
    assert!(pool6.is_usable("2600:1f18:1:100:7a8b::2".parse().unwrap()));
}
