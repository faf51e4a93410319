//! spotinit's own use of the machine, for the `ready` line: its CPU time and resident memory.

use crate::sys::Paths;
use std::time::Duration;

/// Our CPU time so far (user and system, every thread; not the children), for the ready line.
pub(super) fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage the pointer points to (zeroed, so initialised even if
    // it did not); RUSAGE_SELF is always valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let of = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    of(usage.ru_utime) + of(usage.ru_stime)
}

/// Our resident memory (VmRSS), for the ready line.
pub(super) fn resident_memory(paths: &Paths) -> String {
    std::fs::read_to_string(paths.p("/proc/self/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
