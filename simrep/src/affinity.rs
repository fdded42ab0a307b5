//! Spreading helper threads over CPUs.
//!
//! On this project's machines the kernel wakes (or starts) a thread on the
//! CPU of the thread that woke it, where it waits until that one sleeps:
//! two threads meant to run side by side run one after the other. Helpers
//! that must overlap are therefore pinned. Pins are best effort: a thread
//! whose pin fails still works, only later.

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// The CPUs this process may run on, ascending (empty when unknown).
pub(crate) fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Restricts the calling thread to `cpus` (nothing happens for an empty
/// list or when the kernel refuses).
pub(crate) fn pin_current_thread(cpus: &[usize]) {
    let mut set = CpuSet::new();
    if cpus.is_empty() || cpus.iter().any(|&c| set.set(c).is_err()) {
        return;
    }
    let _ = sched_setaffinity(Pid::from_raw(0), &set);
}
