//! Refusal logs that a hostile sandbox cannot flood. A loop of refused
//! connects made about 3,000 WARN lines a second through a log writer
//! that never drops lines (so the relay's workers would wait on it). Each
//! (reason, process) may log [`PER_WINDOW`] lines per [`WINDOW`]; the rest
//! are counted, and one summary line per key says how many were not
//! logged. Audit lines for served requests never go through this.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines each (reason, process) may log per window.
pub const PER_WINDOW: u32 = 10;
/// How often the counts start again (and summaries are written).
pub const WINDOW: Duration = Duration::from_secs(5);
/// Lines logged one by one per window, all keys together: a process that
/// forks children to refuse ten times each gets no more lines than this.
/// Past it, new processes share one key (pid 0) and one summary, which
/// also bounds the table to about this many keys.
pub const MAX_LINES_PER_WINDOW: u32 = 100;

/// What is being refused, and by whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    reason: &'static str,
    pid: u32,
}

#[derive(Debug, Default)]
struct Count {
    logged: u32,
    suppressed: u64,
    comm: String,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    counts: HashMap<Key, Count>,
    /// Lines logged one by one in this window, all keys together.
    logged: u32,
}

/// The budget of one process's refusal logs.
#[derive(Debug)]
pub struct LogBudget {
    window: Mutex<Window>,
    per_window: u32,
    length: Duration,
}

/// One key's lines that were counted but not logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub reason: &'static str,
    pub pid: u32,
    pub comm: String,
    pub count: u64,
}

impl LogBudget {
    pub fn new(per_window: u32, length: Duration) -> LogBudget {
        LogBudget {
            window: Mutex::new(Window {
                started: Instant::now(),
                counts: HashMap::new(),
                logged: 0,
            }),
            per_window,
            length,
        }
    }

    /// True if this refusal may be logged; otherwise it is counted. A
    /// window that ended is summarised first.
    pub fn admit(&self, reason: &'static str, pid: u32, comm: &str) -> bool {
        self.admit_at(Instant::now(), reason, pid, comm)
    }

    fn admit_at(&self, now: Instant, reason: &'static str, pid: u32, comm: &str) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(w.started) >= self.length {
            log_summaries(take_suppressed(&mut w, now));
        }
        let Window { counts, logged, .. } = &mut *w;
        let full = *logged >= MAX_LINES_PER_WINDOW;
        let mut key = Key { reason, pid };
        if full && !counts.contains_key(&key) {
            key.pid = 0;
        }
        let count = counts.entry(key).or_insert_with(|| Count {
            comm: if key.pid != pid {
                "(many processes)".into()
            } else {
                comm.into()
            },
            ..Count::default()
        });
        if count.logged < self.per_window && !full {
            count.logged += 1;
            *logged += 1;
            true
        } else {
            count.suppressed += 1;
            false
        }
    }

    /// Ends the window if it is over, returning what it did not log. A
    /// ticker calls this so the summary comes even when the flood stops.
    pub fn end_window_if_over(&self) -> Vec<Suppressed> {
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(w.started) < self.length {
            return Vec::new();
        }
        take_suppressed(&mut w, now)
    }

    /// Writes the summary lines of windows that ended, every `length`, for
    /// as long as the runtime runs.
    pub fn spawn_summaries(&'static self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.length);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                log_summaries(self.end_window_if_over());
            }
        })
    }
}

fn take_suppressed(w: &mut Window, now: Instant) -> Vec<Suppressed> {
    w.started = now;
    w.logged = 0;
    let mut out: Vec<Suppressed> = w
        .counts
        .drain()
        .filter(|(_, c)| c.suppressed > 0)
        .map(|(k, c)| Suppressed {
            reason: k.reason,
            pid: k.pid,
            comm: c.comm,
            count: c.suppressed,
        })
        .collect();
    out.sort_by(|a, b| (a.reason, a.pid).cmp(&(b.reason, b.pid)));
    out
}

fn log_summaries(lines: Vec<Suppressed>) {
    for s in lines {
        tracing::warn!(
            target: "denied",
            reason = s.reason,
            pid = s.pid,
            comm = %s.comm,
            not_logged = s.count,
            "{} more refusals of this kind from this process in the last {}s were counted, not logged one by one",
            s.count,
            WINDOW.as_secs()
        );
    }
}

/// The budget shared by every refusal log of this process.
pub fn refusals() -> &'static LogBudget {
    static BUDGET: OnceLock<LogBudget> = OnceLock::new();
    BUDGET.get_or_init(|| LogBudget::new(PER_WINDOW, WINDOW))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_lines_per_reason_and_process_then_counts() {
        let b = LogBudget::new(3, Duration::from_secs(60));
        let t = Instant::now();
        let admitted: Vec<bool> = (0..5)
            .map(|_| b.admit_at(t, "not allowed", 7, "curl"))
            .collect();
        assert_eq!(admitted, [true, true, true, false, false]);
        // Another process, and another reason, have budgets of their own.
        assert!(b.admit_at(t, "not allowed", 8, "wget"));
        assert!(b.admit_at(t, "quic", 7, "curl"));
        // Not over yet: nothing to summarise.
        assert!(b.end_window_if_over().is_empty());
    }

    #[test]
    fn a_new_window_summarises_the_last_one_and_starts_again() {
        let b = LogBudget::new(1, Duration::from_millis(1));
        let t = Instant::now();
        assert!(b.admit_at(t, "not allowed", 7, "curl"));
        assert!(!b.admit_at(t, "not allowed", 7, "curl"));
        assert!(!b.admit_at(t, "not allowed", 7, "curl"));
        std::thread::sleep(Duration::from_millis(5));
        let over = b.end_window_if_over();
        assert_eq!(
            over,
            [Suppressed {
                reason: "not allowed",
                pid: 7,
                comm: "curl".into(),
                count: 2
            }]
        );
        assert!(b.admit_at(Instant::now(), "not allowed", 7, "curl"));
    }

    #[test]
    fn forked_processes_get_no_more_lines_than_the_window_allows() {
        let b = LogBudget::new(10, Duration::from_secs(60));
        let t = Instant::now();
        let logged = (1..=60u32)
            .flat_map(|pid| (0..20).map(move |_| pid))
            .filter(|&pid| b.admit_at(t, "not allowed", pid, "child"))
            .count();
        assert_eq!(logged, MAX_LINES_PER_WINDOW as usize);
        // Ten processes logged their ten; the other fifty share one key.
        assert_eq!(b.window.lock().unwrap().counts.len(), 11);
    }
}
