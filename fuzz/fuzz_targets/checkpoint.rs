//! The IPAM checkpoint in `--state-dir` (`ipam.json`), read back at start:
//! any bytes decode to a checkpoint or a clear error, never a panic. A
//! checkpoint that decodes survives saving and loading unchanged, and one the
//! node state accepts is a fixed point of open → save → open.
#![no_main]

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use podnet::{
    ipam::{
        allocator::AttachmentKey,
        source::{AddressSource, NodeCidr},
        state::NodeState,
        store::{self, StateFs, Store},
        Clock,
    },
    net::Cidr,
};

/// A state directory in memory: one file, shared with the fuzz target.
#[derive(Clone, Debug, Default)]
struct MemFs(Arc<Mutex<Option<Vec<u8>>>>);

impl MemFs {
    fn with(bytes: &[u8]) -> Self {
        Self(Arc::new(Mutex::new(Some(bytes.to_vec()))))
    }

    fn bytes(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default()
    }
}

impl StateFs for MemFs {
    fn read(&self, _: &Path) -> io::Result<Option<Vec<u8>>> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone())
    }

    fn write_atomic(&self, _: &Path, bytes: &[u8]) -> io::Result<()> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(bytes.to_vec());
        Ok(())
    }

    /// One file stands for every path (the checkpoint and its copy read the
    /// same bytes, so a damaged input is damaged in both), so a rename
    /// changes nothing.
    fn rename(&self, _: &Path, _: &Path) -> io::Result<()> {
        Ok(())
    }
}

/// A clock that stands still, so cooldowns do not depend on the run.
#[derive(Debug)]
struct Fixed;

impl Clock for Fixed {
    fn now_unix_ms(&self) -> u64 {
        1_800_000_000_000
    }
}

fn sources() -> Vec<Arc<dyn AddressSource>> {
    let v4 = Cidr::new(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 0)), 24).expect("valid prefix");
    let v6 = Cidr::new(
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0)),
        64,
    )
    .expect("valid prefix");
    vec![
        Arc::new(NodeCidr::new(v4).expect("large enough")),
        Arc::new(NodeCidr::new(v6).expect("large enough")),
    ]
}

fn open(fs: &MemFs) -> Result<NodeState, podnet::ipam::IpamError> {
    let store = Store::new(Path::new("/state"), Box::new(fs.clone()));
    NodeState::open(sources(), Arc::new(Fixed), Duration::from_secs(30), store)
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/state/ipam.json");
    // The decoder alone: what it accepts is saved and loaded unchanged.
    if let Ok(checkpoint) = store::parse(path, data) {
        let fs = MemFs::default();
        let store = Store::new(Path::new("/state"), Box::new(fs.clone()));
        store.save(&checkpoint).expect("saving to memory");
        let again = store::parse(path, &fs.bytes()).expect("a saved checkpoint parses");
        assert_eq!(again, checkpoint, "checkpoint changed by save and load");
    }
    // The agent's start: decode, then check the allocations against each other.
    let fs = MemFs::with(data);
    if let Ok(state) = open(&fs) {
        let checkpoint = state.checkpoint();
        state.flush().expect("saving to memory");
        let reopened = open(&fs).expect("a saved state opens");
        assert_eq!(
            reopened.checkpoint(),
            checkpoint,
            "state changed by save and open"
        );
        // Every address handed out belongs to exactly one allocation.
        let mut ips: Vec<IpAddr> = checkpoint
            .ipam
            .allocations
            .iter()
            .flat_map(|a| a.ips.iter().map(|i| i.ip))
            .collect();
        let n = ips.len();
        ips.sort_unstable();
        ips.dedup();
        assert_eq!(ips.len(), n, "one address in two allocations");
        // Usage accounting and a new allocation work whatever the checkpoint
        // held (addresses outside the sources, cooldowns far in the future).
        let mut state = reopened;
        let _ = state.allocator().usage();
        let _ = state.allocator().outside_sources();
        if let Ok(new) = state.allocate(&AttachmentKey::new("fuzz", "eth0"), "fuzz") {
            for assigned in &new.ips {
                let reused = ips.binary_search(&assigned.ip).is_ok()
                    && checkpoint.ipam.allocations.iter().all(|a| a.key != new.key);
                assert!(!reused, "{} handed out twice", assigned.ip);
            }
        }
    }
});
