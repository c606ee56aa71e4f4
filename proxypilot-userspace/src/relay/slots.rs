//! Connection slots: at most `--max-connections` at once, and at most
//! `--max-connections-per-process` of them held by any one sandbox process
//! (by tgid, from the kernel's origin record). Without the second cap one
//! process looping on connect took every slot and starved the others
//! (issue 21: 4,200 bare connects left a victim 15%).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// Every slot is taken.
    Full,
    /// This process holds its share already.
    ProcessShare,
}

impl NoSlot {
    pub fn reason(self) -> &'static str {
        match self {
            NoSlot::Full => "too many concurrent connections",
            NoSlot::ProcessShare => {
                "this process holds its share of connections (--max-connections-per-process)"
            }
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_process: HashMap<u32, usize>,
}

/// The relay's connection slots.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    per_process: usize,
    held: Arc<Mutex<Held>>,
}

/// One connection's slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    pid: u32,
    held: Arc<Mutex<Held>>,
}

impl Slots {
    pub fn new(max: usize, per_process: usize) -> Slots {
        Slots {
            max: max.max(1),
            per_process: per_process.clamp(1, max.max(1)),
            held: Arc::default(),
        }
    }

    /// A slot for a connection of process `pid`, if one is free to it.
    pub fn try_take(&self, pid: u32) -> Result<Slot, NoSlot> {
        let mut h = lock(&self.held);
        if h.total >= self.max {
            return Err(NoSlot::Full);
        }
        let mine = h.by_process.entry(pid).or_default();
        if *mine >= self.per_process {
            return Err(NoSlot::ProcessShare);
        }
        *mine += 1;
        h.total += 1;
        Ok(Slot {
            pid,
            held: self.held.clone(),
        })
    }

    /// Slots in use now.
    pub fn in_use(&self) -> usize {
        lock(&self.held).total
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut h = lock(&self.held);
        h.total -= 1;
        if let Some(n) = h.by_process.get_mut(&self.pid) {
            *n -= 1;
            if *n == 0 {
                h.by_process.remove(&self.pid);
            }
        }
    }
}

fn lock(m: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_gets_its_share_and_others_still_get_slots() {
        let slots = Slots::new(4, 2);
        let a1 = slots.try_take(10).unwrap();
        let _a2 = slots.try_take(10).unwrap();
        assert_eq!(slots.try_take(10).unwrap_err(), NoSlot::ProcessShare);
        let _b1 = slots.try_take(20).unwrap();
        let _b2 = slots.try_take(20).unwrap();
        assert_eq!(slots.try_take(30).unwrap_err(), NoSlot::Full);
        assert_eq!(slots.in_use(), 4);
        drop(a1);
        assert_eq!(slots.in_use(), 3);
        // The freed slot is process 10's again, or anyone's.
        let _c = slots.try_take(30).unwrap();
        assert_eq!(lock(&slots.held).by_process.len(), 3);
    }

    #[test]
    fn a_process_with_no_slot_left_is_forgotten() {
        let slots = Slots::new(8, 8);
        drop(slots.try_take(5).unwrap());
        assert!(lock(&slots.held).by_process.is_empty());
        assert_eq!(slots.in_use(), 0);
    }

    #[test]
    fn the_share_is_at_least_one_and_at_most_the_total() {
        assert_eq!(Slots::new(4, 0).per_process, 1);
        assert_eq!(Slots::new(4, 100).per_process, 4);
    }
}
