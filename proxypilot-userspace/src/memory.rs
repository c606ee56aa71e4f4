//! The allocator's footprint. glibc keeps memory a burst freed (a peak of
//! connections, each with its TLS and HTTP buffers) in its arenas instead
//! of returning it: after one burst RSS stayed at 447 MiB with 5 MiB of
//! heap in use (issue 21). A tick returns it once enough sits free.

use std::time::Duration;

/// How often the free memory is looked at.
const EVERY: Duration = Duration::from_secs(5);
/// Free memory held in the arenas past which it is given back, when it is
/// also more than the memory in use (a burst ended, not steady churn).
const TRIM_ABOVE: usize = 8 << 20;

/// glibc gives each thread that meets contention a new malloc arena, up to
/// 8 per core, and each keeps its high-water pages: the soak saw RSS step
/// up by megabytes long after warm-up, then stay flat. One arena per core
/// (the runtime has a worker per core) keeps the footprint steady. Must
/// run before any thread starts.
pub fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        // SAFETY: mallopt only sets an allocator parameter; no thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, cores.max(2) as libc::c_int);
        }
    }
}

/// Gives free arena memory back to the kernel, every few seconds, when
/// more than 8 MiB of it is held and more is free than in use. Trimming
/// walks the arenas under their locks, so it runs after a burst, not on
/// every tick of a steady load.
pub fn spawn_trimmer() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(freed) = trim_if_worth_it() {
                tracing::debug!(
                    free_bytes = freed,
                    "returned free heap memory to the kernel"
                );
            }
        }
    })
}

/// Trims if enough is free; returns how much was free then.
fn trim_if_worth_it() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 reads the allocator's counters; malloc_trim
        // only returns free pages.
        let m = unsafe { libc::mallinfo2() };
        let free = m.fordblks;
        if free > TRIM_ABOVE && free > m.uordblks {
            unsafe { libc::malloc_trim(0) };
            return Some(free);
        }
    }
    None
}
