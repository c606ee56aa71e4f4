//! Connection slots: at most `--max-connections` at once, and at most
//! `--max-connections-per-process` of them held by any one sandbox process
//! (by tgid, from the kernel's origin record). Without the second cap one
//! process looping on connect took every slot and starved the others
//! (issue 21: 4,200 bare connects left a victim 15%).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    max: AtomicUsize,
    per_process: AtomicUsize,
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
        let s = Slots {
            max: AtomicUsize::new(1),
            per_process: AtomicUsize::new(1),
            held: Arc::default(),
        };
        s.resize(max, per_process);
        s
    }

    /// New caps (a reload). Slots held now stay held; if more are held
    /// than the new cap, new connections wait for enough to be given back.
    pub fn resize(&self, max: usize, per_process: usize) {
        let _held = lock(&self.held);
        self.max.store(max.max(1), Ordering::Relaxed);
        self.per_process
            .store(per_process.clamp(1, max.max(1)), Ordering::Relaxed);
    }

    /// A slot for a connection of process `pid`, if one is free to it.
    pub fn try_take(&self, pid: u32) -> Result<Slot, NoSlot> {
        let mut h = lock(&self.held);
        if h.total >= self.max.load(Ordering::Relaxed) {
            return Err(NoSlot::Full);
        }
        let mine = h.by_process.entry(pid).or_default();
        if *mine >= self.per_process.load(Ordering::Relaxed) {
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
        self.max.load(Ordering::Relaxed)
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
        let share = |s: Slots| s.per_process.load(Ordering::Relaxed);
        assert_eq!(share(Slots::new(4, 0)), 1);
        assert_eq!(share(Slots::new(4, 100)), 4);
    }

    #[test]
    fn a_smaller_cap_after_a_reload_keeps_held_slots_and_admits_below_it() {
        let slots = Slots::new(4, 4);
        let held: Vec<Slot> = (0..3).map(|_| slots.try_take(1).unwrap()).collect();
        slots.resize(2, 2);
        assert_eq!(slots.in_use(), 3, "nothing open is dropped");
        assert_eq!(slots.try_take(2).unwrap_err(), NoSlot::Full);
        drop(held);
        let _a = slots.try_take(1).unwrap();
        let _b = slots.try_take(1).unwrap();
        assert_eq!(slots.try_take(1).unwrap_err(), NoSlot::Full);
        slots.resize(8, 2);
        assert_eq!(slots.try_take(1).unwrap_err(), NoSlot::ProcessShare);
        assert!(slots.try_take(2).is_ok());
    }
}
