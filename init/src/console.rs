//! Console logging. Every line spotinit prints goes to stderr, which for PID 1 is `/dev/console`
//! (what EC2 "get console output" and the serial console show) and under another init is that
//! init's log. Lines carry the kernel uptime so they line up with the kernel's own messages.

use std::io::Write;
use std::time::Duration;

/// Seconds since the kernel booted (CLOCK_BOOTTIME), the same clock as the kernel log.
pub fn uptime() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Writes one line: `[   4.123] spotinit: <message>`. One `write` per line so lines from
/// concurrent tasks never interleave mid-line.
pub fn line(message: &str) {
    let up = uptime();
    let text = format!(
        "[{:>4}.{:03}] spotinit: {}\n",
        up.as_secs(),
        up.subsec_millis(),
        message
    );
    // Tests capture eprint!; PID 1 must never panic on a console write, so it writes directly.
    if cfg!(test) {
        eprint!("{text}");
    } else {
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// `log!("volume {id} attached")` — formats and prints one console line.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::console::line(&format!($($arg)*)) };
}

/// `1 container`, `10 containers`.
pub fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// A duration as people read it on a console: `850 ms`, `4.21 s`, `3 min 05 s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 120_000 {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{} min {:02} s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        assert_eq!(count(0, "container"), "0 containers");
        assert_eq!(count(1, "container"), "1 container");
        assert_eq!(count(30, "container"), "30 containers");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(850)), "850 ms");
        assert_eq!(human(Duration::from_millis(4213)), "4.21 s");
        assert_eq!(human(Duration::from_secs(185)), "3 min 05 s");
    }

    #[test]
    fn uptime_advances() {
        let a = uptime();
        std::thread::sleep(Duration::from_millis(5));
        assert!(uptime() > a);
    }
}
