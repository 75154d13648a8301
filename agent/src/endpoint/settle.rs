//! Read-your-writes for the registry: the subsystems that act on its changes
//! in the kernel (attach a pod's programs, install its rules and routes)
//! follow it and say which change they have acted on, so a writer (a CNI
//! ADD) can wait until its own change is in the kernel before it answers.
//!
//! Every change that notifies subscribers gets the next generation number.
//! A follower reads the generation *before* it reads the registry and, once
//! it has acted on what it read, reports that generation as caught up: what
//! it acted on holds every change up to it.

use std::{
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

/// The followers of one registry and how far each has caught up.
#[derive(Debug, Default)]
pub struct Followers {
    state: Mutex<State>,
    caught_up: Condvar,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// (id, name, generation acted on) of every live follower.
    followers: Vec<(u64, &'static str, u64)>,
}

impl Followers {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain numbers: a panicked holder leaves them valid.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new follower named `name` (for logs), caught up with nothing yet.
    pub fn follow(self: &Arc<Self>, name: &'static str) -> Follower {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.followers.push((id, name, 0));
        Follower {
            followers: self.clone(),
            id,
        }
    }

    /// Waits until every follower has acted on `generation` or later, at
    /// most `timeout`; on timeout, the names of those still behind.
    pub fn wait(&self, generation: u64, timeout: Duration) -> Result<(), Vec<&'static str>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let behind: Vec<&'static str> = state
                .followers
                .iter()
                .filter(|(_, _, acted_on)| *acted_on < generation)
                .map(|(_, name, _)| *name)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(behind);
            };
            state = self
                .caught_up
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// One follower; leaving (drop) stops it from holding writers back.
#[derive(Debug)]
pub struct Follower {
    followers: Arc<Followers>,
    id: u64,
}

impl Follower {
    /// Everything up to `generation` is acted on.
    pub fn caught_up(&self, generation: u64) {
        let mut state = self.followers.lock();
        if let Some(entry) = state.followers.iter_mut().find(|(id, ..)| *id == self.id) {
            entry.2 = entry.2.max(generation);
        }
        drop(state);
        self.followers.caught_up.notify_all();
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.followers
            .lock()
            .followers
            .retain(|(id, ..)| *id != self.id);
        self.followers.caught_up.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_waits_for_every_follower_to_act_on_its_generation() {
        let followers = Arc::new(Followers::default());
        assert_eq!(followers.wait(7, Duration::ZERO), Ok(()), "nobody follows");
        let dns = followers.follow("dns");
        let routing = followers.follow("routing");
        dns.caught_up(7);
        assert_eq!(followers.wait(7, Duration::ZERO), Err(vec!["routing"]));
        routing.caught_up(6);
        assert_eq!(followers.wait(7, Duration::ZERO), Err(vec!["routing"]));
        assert_eq!(followers.wait(6, Duration::ZERO), Ok(()));
        routing.caught_up(3);
        assert_eq!(
            followers.wait(6, Duration::ZERO),
            Ok(()),
            "a follower never goes back"
        );
        drop(routing);
        assert_eq!(followers.wait(7, Duration::ZERO), Ok(()), "routing left");
        assert_eq!(followers.wait(8, Duration::ZERO), Err(vec!["dns"]));
    }

    #[test]
    fn a_waiting_writer_is_woken_when_the_follower_catches_up() {
        let followers = Arc::new(Followers::default());
        let dns = followers.follow("dns");
        let waiter = {
            let followers = followers.clone();
            std::thread::spawn(move || followers.wait(2, Duration::from_mins(1)))
        };
        dns.caught_up(1);
        dns.caught_up(2);
        assert_eq!(waiter.join().unwrap(), Ok(()));
    }
}
