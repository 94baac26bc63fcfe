//! A cap on what one tagged cgroup may hold in the proxy at once: connections from their accept to their
//! end (waiting for a hello, pending approval, or live), so one agent cannot take every descriptor and
//! every session slot from the others. Beyond it, connections are refused with `overloaded`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Connections held per tagged cgroup, up to a maximum each.
#[derive(Debug)]
pub struct PerCgroup {
    max: usize,
    held: Mutex<HashMap<u64, usize>>,
}

/// One connection's place in its cgroup's share; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<PerCgroup>,
    cgroup: u64,
}

impl PerCgroup {
    /// At most `max` connections per tagged cgroup (at least one).
    #[must_use]
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), held: Mutex::new(HashMap::new()) }
    }

    /// The cap per cgroup.
    #[must_use]
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for one more connection of `cgroup`, or `None` when it holds its share.
    #[must_use]
    pub fn try_take(self: &Arc<Self>, cgroup: u64) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let n = held.entry(cgroup).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot { owner: self.clone(), cgroup })
    }

    /// Connections `cgroup` holds now.
    #[must_use]
    pub fn held(&self, cgroup: u64) -> usize {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).get(&cgroup).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.cgroup) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.cgroup);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cgroup_holds_at_most_its_share_and_gets_slots_back_when_they_end() {
        let p = Arc::new(PerCgroup::new(2));
        let a = p.try_take(7).unwrap();
        let _b = p.try_take(7).unwrap();
        assert!(p.try_take(7).is_none());
        // Another cgroup is unaffected.
        let c = p.try_take(8).unwrap();
        drop(a);
        assert_eq!(p.held(7), 1);
        assert!(p.try_take(7).is_some());
        drop(c);
        assert_eq!(p.held(8), 0);
        assert!(p.held.lock().unwrap().get(&8).is_none(), "an idle cgroup holds no entry");
    }
}
