//! Allocator, cooldown, persistence and failure tests with a fake clock and
//! a fake file system.

use std::{
    collections::{BTreeSet, HashMap},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use proptest::prelude::*;

use crate::net::Cidr;

use super::{
    allocator::AttachmentKey,
    source::{AddressSource, NodeCidr},
    state::NodeState,
    store::{StateFs, Store},
    Clock, IpamError, DEFAULT_COOLDOWN,
};

#[derive(Debug, Default)]
struct FakeClock(AtomicU64);

impl FakeClock {
    fn advance(&self, d: Duration) {
        self.0
            .fetch_add(u64::try_from(d.as_millis()).unwrap(), Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_unix_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// An in-memory file system whose writes can be made to fail, counted, and
/// held (as a slow disk holds an fsync) until the test lets them go.
#[derive(Debug, Default, Clone)]
struct FakeFs {
    files: Arc<Mutex<HashMap<PathBuf, Vec<u8>>>>,
    full: Arc<AtomicBool>,
    /// Durable writes started.
    writes: Arc<AtomicU64>,
    /// The durable writes from this one on (1-based) fail; 0: none.
    fail_from: Arc<AtomicU64>,
    /// While true, durable writes wait.
    hold: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl FakeFs {
    fn set_hold(&self, hold: bool) {
        *self.hold.0.lock().unwrap() = hold;
        self.hold.1.notify_all();
    }

    fn insert(&self, path: &Path, bytes: &[u8]) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_owned(), bytes.to_vec());
    }
}

impl StateFs for FakeFs {
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        Ok(self.files.lock().unwrap().get(path).cloned())
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let mut held = self.hold.0.lock().unwrap();
        while *held {
            held = self.hold.1.wait(held).unwrap();
        }
        drop(held);
        let fail_from = self.fail_from.load(Ordering::SeqCst);
        if self.full.load(Ordering::SeqCst) || (fail_from > 0 && n >= fail_from) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.insert(path, bytes);
        Ok(())
    }

    fn write_copy(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.insert(path, bytes);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut files = self.files.lock().unwrap();
        let bytes = files
            .remove(from)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        files.insert(to.to_owned(), bytes);
        Ok(())
    }
}

fn sources(cidrs: &[&str]) -> Vec<Arc<dyn AddressSource>> {
    cidrs
        .iter()
        .map(|c| {
            Arc::new(NodeCidr::new(c.parse::<Cidr>().unwrap()).unwrap()) as Arc<dyn AddressSource>
        })
        .collect()
}

fn open(cidrs: &[&str], clock: &Arc<FakeClock>, fs: &FakeFs) -> Result<NodeState, IpamError> {
    NodeState::open(
        sources(cidrs),
        clock.clone(),
        DEFAULT_COOLDOWN,
        Store::new(Path::new("/state"), Box::new(fs.clone())),
    )
}

fn key(i: usize) -> AttachmentKey {
    AttachmentKey::new(format!("c{i}"), "eth0")
}

fn ips(a: &super::allocator::Allocation) -> Vec<String> {
    a.ips.iter().map(|x| x.ip.to_string()).collect()
}

#[test]
fn add_is_idempotent_and_dual_stack() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    let mut s = open(&["10.244.1.0/24", "fd00:1::/120"], &clock, &fs).unwrap();
    let a = s.allocate(&key(1), "net").unwrap();
    assert_eq!(ips(&a), ["10.244.1.2", "fd00:1::2"]);
    assert_eq!(a.ips[0].gateway.unwrap().to_string(), "10.244.1.1");
    assert_eq!(s.allocate(&key(1), "net").unwrap(), a);
    let b = s.allocate(&key(2), "net").unwrap();
    assert_eq!(ips(&b), ["10.244.1.3", "fd00:1::3"]);
    // The same container with another interface is another attachment.
    let c = s
        .allocate(&AttachmentKey::new("c1", "net1"), "net")
        .unwrap();
    assert_eq!(ips(&c), ["10.244.1.4", "fd00:1::4"]);
}

#[test]
fn released_addresses_cool_down() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    let mut s = open(&["10.0.0.0/29"], &clock, &fs).unwrap();
    // /29: .2 .. .6 usable = 5 addresses.
    for i in 0..5 {
        s.allocate(&key(i), "n").unwrap();
    }
    let e = s.allocate(&key(9), "n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "no free address: node-cidr 10.0.0.0/29: 5/5 addresses allocated, 0 cooling down"
    );
    assert!(s.release(&key(0)).unwrap().is_some());
    assert!(s.release(&key(0)).unwrap().is_none(), "DEL is idempotent");
    let e = s.allocate(&key(9), "n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "no free address: node-cidr 10.0.0.0/29: 4/5 addresses allocated, 1 cooling down"
    );
    clock.advance(
        DEFAULT_COOLDOWN
            .checked_sub(Duration::from_millis(1))
            .unwrap(),
    );
    assert!(s.allocate(&key(9), "n").is_err());
    clock.advance(Duration::from_millis(1));
    assert_eq!(ips(&s.allocate(&key(9), "n").unwrap()), ["10.0.0.2"]);
}

#[test]
fn gc_frees_what_is_not_valid_in_its_network() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    let mut s = open(&["10.0.0.0/24"], &clock, &fs).unwrap();
    for i in 0..4 {
        s.allocate(&key(i), "a").unwrap();
    }
    s.allocate(&key(10), "b").unwrap();
    let valid: BTreeSet<_> = [key(1), key(3)].into_iter().collect();
    let freed = s.gc_allocations(Some("a"), &valid).unwrap();
    let mut freed: Vec<_> = freed.into_iter().map(|a| a.key).collect();
    freed.sort();
    assert_eq!(freed, [key(0), key(2)]);
    assert!(s.allocator().get(&key(10)).is_some(), "other network kept");
    assert_eq!(s.allocator().usage()[0].allocated, 3);
    assert_eq!(s.allocator().usage()[0].cooldown, 2);
}

#[test]
fn restart_restores_exactly() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    let mut s = open(&["10.0.0.0/24"], &clock, &fs).unwrap();
    for i in 0..3 {
        s.allocate(&key(i), "n").unwrap();
    }
    s.release(&key(1)).unwrap();
    let before = s.checkpoint();
    drop(s);
    let s = open(&["10.0.0.0/24"], &clock, &fs).unwrap();
    assert_eq!(s.checkpoint(), before);
    assert_eq!(s.allocator().cooldowns().len(), 1);
}

#[test]
fn a_full_disk_loses_nothing_and_recovers() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    let mut s = open(&["10.0.0.0/24"], &clock, &fs).unwrap();
    s.allocate(&key(1), "n").unwrap();
    fs.full.store(true, Ordering::SeqCst);
    let e = s.allocate(&key(2), "n").unwrap_err();
    assert!(e.is_transient());
    assert_eq!(
        e.to_string(),
        "writing checkpoint /state/ipam.json: No space left on device (os error 28); the change was not applied, retry later"
    );
    assert!(s.allocator().get(&key(2)).is_none());
    let e = s.release(&key(1)).unwrap_err();
    assert!(e.is_transient());
    assert!(s.allocator().get(&key(1)).is_some(), "still allocated");
    fs.full.store(false, Ordering::SeqCst);
    assert_eq!(ips(&s.allocate(&key(2), "n").unwrap()), ["10.0.0.3"]);
    assert!(s.release(&key(1)).unwrap().is_some());
    let restarted = open(&["10.0.0.0/24"], &clock, &fs).unwrap();
    assert_eq!(restarted.checkpoint(), s.checkpoint());
}

#[test]
fn bad_checkpoints_stop_the_start() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    let path = PathBuf::from("/state/ipam.json");
    fs.files
        .lock()
        .unwrap()
        .insert(path.clone(), b"{\"version\":7}".to_vec());
    let e = open(&["10.0.0.0/24"], &clock, &fs).unwrap_err();
    assert_eq!(
        e.to_string(),
        "checkpoint /state/ipam.json has version 7, this agent reads version 1 only; run a podnet-agent that knows version 7. The file is kept"
    );
    fs.files
        .lock()
        .unwrap()
        .insert(path.clone(), b"garbage".to_vec());
    let e = open(&["10.0.0.0/24"], &clock, &fs).unwrap_err().to_string();
    assert_eq!(
        e,
        "checkpoint /state/ipam.json is unusable (corrupt: expected value at line 1 column 1) and so is its copy /state/ipam.json.prev (it does not exist); the agent will not start over them. Both files are kept as they are: inspect them, and move both away only if every pod on this node is gone"
    );
    let dup = r#"{"version":1,"allocations":[
        {"containerId":"a","ifName":"eth0","network":"n","ips":[{"ip":"10.0.0.2","prefix":"10.0.0.0/24"}],"allocatedUnixMs":0},
        {"containerId":"b","ifName":"eth0","network":"n","ips":[{"ip":"10.0.0.2","prefix":"10.0.0.0/24"}],"allocatedUnixMs":0}],
        "cooldowns":[],"endpoints":[]}"#;
    fs.files
        .lock()
        .unwrap()
        .insert(path.clone(), dup.as_bytes().to_vec());
    let e = open(&["10.0.0.0/24"], &clock, &fs).unwrap_err().to_string();
    assert_eq!(
        e,
        "checkpoint /state/ipam.json is unusable (inconsistent IPAM state: 10.0.0.2 is given to both a/eth0 and b/eth0) and so is its copy /state/ipam.json.prev (it does not exist); the agent will not start over them. Both files are kept as they are: inspect them, and move both away only if every pod on this node is gone"
    );
    assert_eq!(fs.files.lock().unwrap().get(&path).unwrap(), dup.as_bytes());
}

#[test]
fn large_ipv6_prefixes_allocate_quickly() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    let mut s = open(&["fd00::/64"], &clock, &fs).unwrap();
    for i in 0..100 {
        s.allocate(&key(i), "n").unwrap();
    }
    let u = &s.allocator().usage()[0];
    assert_eq!(u.capacity, u64::MAX - 2);
    assert_eq!(u.allocated, 100);
}

#[derive(Clone, Debug)]
enum Op {
    Add(usize),
    Del(usize),
    Gc(Vec<usize>),
    Restart,
    Tick(u64),
    DiskFull(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..12).prop_map(Op::Add),
        4 => (0usize..12).prop_map(Op::Del),
        1 => proptest::collection::vec(0usize..12, 0..6).prop_map(Op::Gc),
        1 => Just(Op::Restart),
        2 => (0u64..40_000).prop_map(Op::Tick),
        1 => any::<bool>().prop_map(Op::DiskFull),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// No address is ever given twice, none is lost (allocated + cooling +
    /// free = capacity), and a restart restores exactly what was answered.
    #[test]
    fn never_twice_never_lost(ops in proptest::collection::vec(op(), 1..120)) {
        let clock = Arc::new(FakeClock::default());
        let fs = FakeFs::default();
        // 10.9.0.0/29 holds 5 pod addresses: exhaustion and reuse happen often.
        let cidrs = ["10.9.0.0/29", "fd09::/125"];
        let mut s = open(&cidrs, &clock, &fs).unwrap();
        // What callers were told: key -> addresses.
        let mut model: HashMap<AttachmentKey, Vec<IpAddr>> = HashMap::new();
        let mut released_at: HashMap<IpAddr, u64> = HashMap::new();
        for op in ops {
            match op {
                Op::Add(i) => match s.allocate(&key(i), "n") {
                    Ok(a) => {
                        let got: Vec<IpAddr> = a.ips.iter().map(|x| x.ip).collect();
                        if let Some(prev) = model.get(&key(i)) {
                            prop_assert_eq!(prev, &got);
                        } else {
                            for ip in &got {
                                for (k, v) in &model {
                                    prop_assert!(!v.contains(ip), "{} given to {} and {}", ip, k, key(i));
                                }
                                if let Some(t) = released_at.get(ip) {
                                    prop_assert!(clock.now_unix_ms() >= t + 30_000, "{} reused during cooldown", ip);
                                }
                            }
                            model.insert(key(i), got);
                        }
                    }
                    Err(IpamError::Exhausted { .. }) => {
                        prop_assert!(s.allocator().exhausted().is_some() || fs.full.load(Ordering::SeqCst));
                    }
                    Err(e) => prop_assert!(e.is_transient(), "{}", e),
                },
                Op::Del(i) => {
                    if s.release(&key(i)).is_ok() {
                        if let Some(v) = model.remove(&key(i)) {
                            for ip in v { released_at.insert(ip, clock.now_unix_ms()); }
                        }
                    }
                }
                Op::Gc(valid) => {
                    let valid: BTreeSet<_> = valid.into_iter().map(key).collect();
                    if let Ok(freed) = s.gc_allocations(Some("n"), &valid) {
                        for a in freed {
                            model.remove(&a.key);
                            for ip in a.ips { released_at.insert(ip.ip, clock.now_unix_ms()); }
                        }
                    }
                }
                Op::Restart => {
                    let before = s.checkpoint();
                    drop(s);
                    s = open(&cidrs, &clock, &fs).unwrap();
                    prop_assert_eq!(s.checkpoint(), before);
                }
                Op::Tick(ms) => clock.advance(Duration::from_millis(ms)),
                Op::DiskFull(full) => fs.full.store(full, Ordering::SeqCst),
            }
            // The allocator agrees with what callers were told...
            let live: HashMap<AttachmentKey, Vec<IpAddr>> = s
                .allocator()
                .allocations()
                .map(|a| (a.key.clone(), a.ips.iter().map(|x| x.ip).collect()))
                .collect();
            prop_assert_eq!(&live, &model);
            // ...and accounts for every address.
            for u in s.allocator().usage() {
                prop_assert_eq!(u.allocated + u.cooldown + u.free, u.capacity);
                prop_assert_eq!(u.capacity, 5);
            }
        }
    }
}

fn endpoint_record(i: usize, pod: &str, ip: &str) -> podnet_api::endpoint::EndpointRecord {
    podnet_api::endpoint::EndpointRecord {
        container_id: format!("c{i}"),
        if_name: "eth0".into(),
        network: "net".into(),
        netns: format!("/var/run/netns/p{i}"),
        namespace: "shop".into(),
        pod: pod.into(),
        pod_uid: String::new(),
        interface: Some(format!("veth{i}")),
        ips: vec![ip.parse().unwrap()],
    }
}

#[test]
fn a_second_owner_of_an_address_is_refused_and_nothing_is_written() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    let mut s = open(&["10.244.1.0/24"], &clock, &fs).unwrap();
    s.add_endpoint(endpoint_record(1, "cart-1", "10.244.1.7"))
        .unwrap();
    let written = fs.files.lock().unwrap().clone();
    let err = s
        .add_endpoint(endpoint_record(2, "cart-2", "10.244.1.7"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "10.244.1.7 is already registered to shop/cart-1 (c1/eth0); refusing a second owner"
    );
    assert_eq!(s.endpoints().count(), 1);
    assert_eq!(
        *fs.files.lock().unwrap(),
        written,
        "the checkpoint is unchanged"
    );
    // The holder may re-register itself (kubelet retries ADD), with the address.
    s.add_endpoint(endpoint_record(1, "cart-1", "10.244.1.7"))
        .unwrap();
    // Once the holder is gone, the address is free for the next pod.
    s.remove_endpoint(&key(1)).unwrap();
    s.add_endpoint(endpoint_record(2, "cart-2", "10.244.1.7"))
        .unwrap();
    assert_eq!(
        s.endpoints().map(|e| e.pod.clone()).collect::<Vec<_>>(),
        ["cart-2"]
    );
}

const CHECKPOINT: &str = "/state/ipam.json";
const COPY: &str = "/state/ipam.json.prev";

#[test]
fn a_damaged_checkpoint_is_replaced_by_its_copy() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    let mut s = open(&["10.244.1.0/24"], &clock, &fs).unwrap();
    for i in 0..3 {
        let a = s.allocate(&key(i), "net").unwrap();
        s.add_endpoint(endpoint_record(i, &format!("p{i}"), &ips(&a)[0]))
            .unwrap();
    }
    let before = s.checkpoint();
    drop(s);
    let good = fs.read(Path::new(CHECKPOINT)).unwrap().unwrap();
    assert_eq!(fs.read(Path::new(COPY)).unwrap().unwrap(), good);
    // Truncated, overwritten with garbage, removed: each time the copy is used.
    let truncated = &good[..good.len() / 2];
    for (damaged, error_start) in [
        (Some(truncated), "corrupt: EOF while parsing"),
        (Some(&b"\x00garbage\xff"[..]), "corrupt: expected value"),
        (None, "it does not exist"),
    ] {
        match damaged {
            Some(bytes) => fs.insert(Path::new(CHECKPOINT), bytes),
            None => {
                fs.files.lock().unwrap().remove(Path::new(CHECKPOINT));
            }
        }
        let s = open(&["10.244.1.0/24"], &clock, &fs).unwrap();
        assert_eq!(s.checkpoint(), before);
        let r = s.recovery().unwrap();
        assert_eq!(r.from, Path::new(COPY));
        assert_eq!(r.damaged, Path::new(CHECKPOINT));
        assert!(r.error.starts_with(error_start), "{}", r.error);
        // The damaged file is kept aside; the checkpoint is whole again.
        assert_eq!(
            r.kept_as.as_deref(),
            damaged.map(|_| Path::new("/state/ipam.json.corrupt"))
        );
        if let Some(bytes) = damaged {
            assert_eq!(
                fs.read(Path::new("/state/ipam.json.corrupt"))
                    .unwrap()
                    .unwrap(),
                bytes
            );
        }
        assert_eq!(fs.read(Path::new(CHECKPOINT)).unwrap().unwrap(), good);
        drop(s);
        // A start over a whole checkpoint recovers nothing.
        assert_eq!(
            open(&["10.244.1.0/24"], &clock, &fs).unwrap().recovery(),
            None
        );
    }
}

#[test]
fn both_files_damaged_stop_the_start_naming_both() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    fs.insert(Path::new(CHECKPOINT), b"{\"version\":1,\"allocations\":[{");
    fs.insert(Path::new(COPY), b"garbage");
    let e = open(&["10.244.1.0/24"], &clock, &fs)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "checkpoint /state/ipam.json is unusable (corrupt: EOF while parsing an object at line 1 column 29) and so is its copy /state/ipam.json.prev (corrupt: expected value at line 1 column 1); the agent will not start over them. Both files are kept as they are: inspect them, and move both away only if every pod on this node is gone"
    );
    // Both are left as they were.
    assert_eq!(
        fs.read(Path::new(CHECKPOINT)).unwrap().unwrap(),
        b"{\"version\":1,\"allocations\":[{"
    );
    assert_eq!(fs.read(Path::new(COPY)).unwrap().unwrap(), b"garbage");
    assert_eq!(fs.writes.load(Ordering::SeqCst), 0);
}

#[derive(Debug)]
struct LivePaths(BTreeSet<String>);

impl super::recovery::NetnsProbe for LivePaths {
    fn exists(&self, netns: &str) -> bool {
        self.0.contains(netns)
    }
}

#[test]
fn recovery_keeps_live_pods_and_finds_the_gone() {
    let clock = Arc::new(FakeClock::default());
    let fs = FakeFs::default();
    let mut s = open(&["10.244.1.0/24"], &clock, &fs).unwrap();
    // c0, c1: allocated and registered; c2: registered with an address the
    // state has no allocation for; c3: registered without a namespace.
    for i in 0..2 {
        let a = s.allocate(&key(i), "net").unwrap();
        s.add_endpoint(endpoint_record(i, &format!("p{i}"), &ips(&a)[0]))
            .unwrap();
    }
    s.add_endpoint(endpoint_record(2, "p2", "10.244.1.9"))
        .unwrap();
    let mut no_netns = endpoint_record(3, "p3", "10.244.1.10");
    no_netns.netns = String::new();
    s.add_endpoint(no_netns).unwrap();
    let probe = LivePaths(
        ["/var/run/netns/p0", "/var/run/netns/p2"]
            .into_iter()
            .map(String::from)
            .collect(),
    );
    let found = super::recovery::check(&mut s, &probe);
    assert_eq!(
        found,
        super::recovery::Findings {
            live: vec![key(0), key(2)],
            gone: vec![key(1)],
            unknown: vec![key(3)],
            adopted: 1,
        }
    );
    // The live pod's address is now allocated to it and never handed out.
    assert_eq!(ips(s.allocator().get(&key(2)).unwrap()), ["10.244.1.9"]);
    let handed: BTreeSet<String> = (10..250)
        .map(|i| ips(&s.allocate(&key(i), "net").unwrap())[0].clone())
        .collect();
    assert_eq!(handed.len(), 240);
    assert!(!handed.contains("10.244.1.9"));
    assert!(!handed.contains("10.244.1.2") && !handed.contains("10.244.1.3"));
}

mod group_commit {
    use super::*;
    use crate::ipam::{commit::GroupCommit, state::change};

    fn commit(fs: &FakeFs, clock: &Arc<FakeClock>) -> Arc<GroupCommit> {
        let state = open(&["10.244.1.0/24"], clock, fs).unwrap();
        Arc::new(GroupCommit::new(state, clock.clone(), Box::new(|_, _| {})))
    }

    fn allocate(
        c: &Arc<GroupCommit>,
        i: usize,
        deadline: Option<u64>,
    ) -> std::thread::JoinHandle<Result<String, IpamError>> {
        let c = c.clone();
        std::thread::spawn(move || {
            c.run(
                deadline,
                Some(key(i)),
                change::allocate(key(i), "net".into()),
            )
            .map(|a| ips(&a)[0].clone())
        })
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < until, "waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn on_disk(fs: &FakeFs) -> usize {
        let bytes = fs.read(Path::new(CHECKPOINT)).unwrap().unwrap();
        crate::ipam::store::parse(Path::new(CHECKPOINT), &bytes)
            .unwrap()
            .ipam
            .allocations
            .len()
    }

    #[test]
    fn changes_waiting_for_a_write_share_the_next_one() {
        let clock = Arc::new(FakeClock::default());
        let fs = FakeFs::default();
        let c = commit(&fs, &clock);
        fs.set_hold(true);
        let first = allocate(&c, 0, None);
        wait_until("the first write", || fs.writes.load(Ordering::SeqCst) == 1);
        let rest: Vec<_> = (1..20).map(|i| allocate(&c, i, None)).collect();
        wait_until("19 queued changes", || c.queued() == 19);
        fs.set_hold(false);
        let mut answered = vec![first.join().unwrap().unwrap()];
        answered.extend(rest.into_iter().map(|t| t.join().unwrap().unwrap()));
        let unique: BTreeSet<&String> = answered.iter().collect();
        assert_eq!(unique.len(), 20);
        // Two writes for twenty changes: the first alone, then the nineteen
        // that queued behind it.
        assert_eq!(fs.writes.load(Ordering::SeqCst), 2);
        assert_eq!(c.stats().writes_ok.load(Ordering::SeqCst), 2);
        assert_eq!(c.stats().changes.load(Ordering::SeqCst), 20);
        assert_eq!(on_disk(&fs), 20);
    }

    #[test]
    fn a_failed_write_fails_and_rolls_back_exactly_its_batch() {
        let clock = Arc::new(FakeClock::default());
        let fs = FakeFs::default();
        let c = commit(&fs, &clock);
        fs.fail_from.store(2, Ordering::SeqCst);
        fs.set_hold(true);
        let first = allocate(&c, 0, None);
        wait_until("the first write", || fs.writes.load(Ordering::SeqCst) == 1);
        let batch: Vec<_> = (1..5).map(|i| allocate(&c, i, None)).collect();
        wait_until("4 queued changes", || c.queued() == 4);
        fs.set_hold(false);
        assert_eq!(first.join().unwrap().unwrap(), "10.244.1.2");
        for t in batch {
            assert_eq!(
                t.join().unwrap().unwrap_err().to_string(),
                "writing checkpoint /state/ipam.json: No space left on device (os error 28); the change was not applied, retry later"
            );
        }
        assert_eq!(c.stats().writes_ok.load(Ordering::SeqCst), 1);
        assert_eq!(c.stats().writes_failed.load(Ordering::SeqCst), 1);
        assert_eq!(
            c.state().allocator().allocations().count(),
            1,
            "only the first batch's change stays"
        );
        fs.fail_from.store(0, Ordering::SeqCst);
        // The failed batch took no address: the next one is .3.
        assert_eq!(allocate(&c, 9, None).join().unwrap().unwrap(), "10.244.1.3");
        assert_eq!(on_disk(&fs), 2);
    }

    #[test]
    fn a_change_past_its_deadline_is_not_made() {
        let clock = Arc::new(FakeClock::default());
        clock.advance(Duration::from_secs(1000));
        let fs = FakeFs::default();
        let c = commit(&fs, &clock);
        let now = clock.now_unix_ms();
        let e = allocate(&c, 0, Some(now - 7)).join().unwrap().unwrap_err();
        assert!(
            matches!(e, IpamError::DeadlineExceeded { late_ms: 7 }),
            "{e}"
        );
        assert_eq!(c.stats().refused_late.load(Ordering::SeqCst), 1);
        assert_eq!(fs.writes.load(Ordering::SeqCst), 0);
        // Queued behind a write during which its deadline passes: refused
        // when its batch starts.
        fs.set_hold(true);
        let first = allocate(&c, 1, None);
        wait_until("the first write", || fs.writes.load(Ordering::SeqCst) == 1);
        let late = allocate(&c, 2, Some(now + 100));
        wait_until("1 queued change", || c.queued() == 1);
        clock.advance(Duration::from_millis(150));
        fs.set_hold(false);
        assert_eq!(first.join().unwrap().unwrap(), "10.244.1.2");
        let e = late.join().unwrap().unwrap_err();
        assert!(
            matches!(e, IpamError::DeadlineExceeded { late_ms: 50 }),
            "{e}"
        );
        assert_eq!(c.stats().refused_late.load(Ordering::SeqCst), 2);
        assert_eq!(fs.writes.load(Ordering::SeqCst), 1);
        assert!(c.state().allocator().get(&key(2)).is_none());
    }

    #[test]
    fn an_allocation_written_after_its_callers_deadline_is_taken_back() {
        let clock = Arc::new(FakeClock::default());
        clock.advance(Duration::from_secs(1000));
        let fs = FakeFs::default();
        let c = commit(&fs, &clock);
        let now = clock.now_unix_ms();
        fs.set_hold(true);
        let late = allocate(&c, 0, Some(now + 1000));
        wait_until("the first write", || fs.writes.load(Ordering::SeqCst) == 1);
        // The disk holds the write for longer than the caller waits.
        clock.advance(Duration::from_millis(1500));
        fs.set_hold(false);
        let e = late.join().unwrap().unwrap_err();
        assert!(
            matches!(e, IpamError::DeadlineExceeded { late_ms: 500 }),
            "{e}"
        );
        // One write for the change, one for taking it back.
        assert_eq!(c.stats().writes_ok.load(Ordering::SeqCst), 2);
        assert_eq!(c.stats().undone_late.load(Ordering::SeqCst), 1);
        assert!(c.state().allocator().get(&key(0)).is_none());
        assert_eq!(on_disk(&fs), 0);
        // A caller that waits gets the next address (the taken-back one
        // cools down like any released address).
        assert_eq!(allocate(&c, 1, None).join().unwrap().unwrap(), "10.244.1.3");
        assert_eq!(on_disk(&fs), 1);
    }
}
