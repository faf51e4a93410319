//! spotinit's phase timings, read from its console lines.

use crate::qemu::ConsoleLine;

/// Reads `phase X: done in Y` lines (and `FAILED after`) from console lines: (phase, seconds).
pub fn phase_timings(lines: &[ConsoleLine]) -> Vec<(String, f64)> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.text.split("spotinit: phase ").nth(1)?;
            let (name, took) = rest
                .split_once(": done in ")
                .or_else(|| rest.split_once(": FAILED after "))?;
            Some((name.to_owned(), parse_human(took)?))
        })
        .collect()
}

/// Parses spotinit's human durations (`850 ms`, `4.21 s`, `3 min 05 s`) into seconds.
pub fn parse_human(text: &str) -> Option<f64> {
    let t = text.trim();
    let words: Vec<&str> = t.split_whitespace().collect();
    match words.as_slice() {
        [n, "ms", ..] => n.parse::<f64>().ok().map(|v| v / 1000.0),
        [n, "s", ..] => n.parse::<f64>().ok(),
        [m, "min", s, "s", ..] => Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn human_durations_parse() {
        assert_eq!(parse_human("850 ms"), Some(0.85));
        assert_eq!(parse_human("4.21 s"), Some(4.21));
        assert_eq!(parse_human("3 min 05 s"), Some(185.0));
        assert_eq!(parse_human("4.21 s (12 s left)"), Some(4.21));
        assert_eq!(parse_human("soon"), None);
    }

    #[test]
    fn phase_lines_are_read() {
        let l = |t: &str| ConsoleLine {
            at: Duration::ZERO,
            text: t.into(),
        };
        let lines = [
            l("[   3.100] spotinit: phase early mounts: done in 12 ms"),
            l("[   9.000] spotinit: phase volume: done in 4.21 s"),
            l("[   9.100] spotinit: volume: something else"),
            l("[  10.000] spotinit: phase dockerd: FAILED after 1.50 s"),
        ];
        assert_eq!(
            phase_timings(&lines),
            vec![
                ("early mounts".to_string(), 0.012),
                ("volume".to_string(), 4.21),
                ("dockerd".to_string(), 1.5)
            ]
        );
    }
}
