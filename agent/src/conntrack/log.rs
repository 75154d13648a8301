//! A bounded log of recent races, for `podnetctl conntrack races`.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
};

use super::events::RaceRecord;

/// How many races the log keeps by default.
pub const DEFAULT_CAPACITY: usize = 1024;

/// Recent races, newest last; the oldest fall off when full. Cloning shares it.
#[derive(Clone, Debug)]
pub struct RaceLog {
    inner: Arc<Mutex<VecDeque<RaceRecord>>>,
    capacity: usize,
}

impl Default for RaceLog {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl RaceLog {
    /// A log keeping at most `capacity` races (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity,
        }
    }

    /// Appends a race, dropping the oldest when full.
    pub fn push(&self, record: RaceRecord) {
        let mut log = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == self.capacity {
            log.pop_front();
        }
        log.push_back(record);
    }

    /// The newest `limit` races, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<RaceRecord> {
        let log = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = log.len().saturating_sub(limit);
        log.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::events::{Flow, WinnerLookup};
    use crate::endpoint::PodRef;

    fn record(ms: u64) -> RaceRecord {
        let flow = Flow {
            src: "10.0.0.2:1".parse().unwrap(),
            dst: "10.0.0.3:2".parse().unwrap(),
            proto: 17,
        };
        RaceRecord {
            time_unix_ms: ms,
            proto: "udp".into(),
            loser: PodRef::host(),
            flow,
            destination: flow.dst,
            snat: "10.0.0.1:40000".parse().unwrap(),
            winner: WinnerLookup::Gone,
        }
    }

    #[test]
    fn keeps_the_newest() {
        let log = RaceLog::with_capacity(3);
        for ms in 0..5 {
            log.push(record(ms));
        }
        let times: Vec<u64> = log.recent(10).iter().map(|r| r.time_unix_ms).collect();
        assert_eq!(times, vec![2, 3, 4]);
        let times: Vec<u64> = log.recent(2).iter().map(|r| r.time_unix_ms).collect();
        assert_eq!(times, vec![3, 4]);
    }
}
