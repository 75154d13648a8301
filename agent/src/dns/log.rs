//! A bounded log of recent slow, failed and unanswered DNS queries, for `podnetctl dns slow`.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
};

use super::decode::QueryRecord;

/// How many queries the log keeps by default.
pub const DEFAULT_CAPACITY: usize = 1024;

/// Recent queries, newest last; the oldest fall off when full. Cloning shares it.
#[derive(Clone, Debug)]
pub struct QueryLog {
    inner: Arc<Mutex<VecDeque<QueryRecord>>>,
    capacity: usize,
}

impl Default for QueryLog {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl QueryLog {
    /// A log keeping at most `capacity` queries (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity,
        }
    }

    /// Appends a query, dropping the oldest when full.
    pub fn push(&self, record: QueryRecord) {
        let mut log = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == self.capacity {
            log.pop_front();
        }
        log.push_back(record);
    }

    /// The newest `limit` queries, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<QueryRecord> {
        let log = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = log.len().saturating_sub(limit);
        log.iter().skip(skip).cloned().collect()
    }
}
