//! A bounded log of the most recent records (races, slow DNS queries) for
//! podnetctl, shared by its clones.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
};

/// How many records a log keeps by default.
pub const DEFAULT_CAPACITY: usize = 1024;

/// Recent records, newest last; the oldest fall off when full. Cloning
/// shares it.
#[derive(Debug)]
pub struct Recent<T> {
    inner: Arc<Mutex<VecDeque<T>>>,
    capacity: usize,
}

impl<T> Clone for Recent<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            capacity: self.capacity,
        }
    }
}

impl<T: Clone> Default for Recent<T> {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl<T: Clone> Recent<T> {
    /// A log keeping at most `capacity` records (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity,
        }
    }

    /// Appends a record, dropping the oldest when full.
    pub fn push(&self, record: T) {
        let mut log = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == self.capacity {
            log.pop_front();
        }
        log.push_back(record);
    }

    /// The newest `limit` records, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<T> {
        self.recent_matching(limit, |_| true)
    }

    /// The newest `limit` records that `keep` selects, oldest first.
    pub fn recent_matching(&self, limit: usize, keep: impl Fn(&T) -> bool) -> Vec<T> {
        let log = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<T> = log
            .iter()
            .rev()
            .filter(|r| keep(r))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_in_order_and_clones_share() {
        let log = Recent::with_capacity(3);
        let other = log.clone();
        for n in 1..=5 {
            other.push(n);
        }
        assert_eq!(log.recent(10), [3, 4, 5]);
        assert_eq!(log.recent(2), [4, 5]);
        assert_eq!(log.recent(0), Vec::<i32>::new());
        assert_eq!(Recent::<u8>::with_capacity(0).capacity, 1);
        assert_eq!(log.recent_matching(1, |n| n % 2 == 1), [5]);
        assert_eq!(log.recent_matching(9, |n| n % 2 == 1), [3, 5]);
    }
}
