//! Durations as podnet's configurations write them (`"2s"`, `"500ms"`).

use std::time::Duration;

/// Parses `"2s"`, `"500ms"`, `"1.5s"`; between 1 ms and 60 s.
pub fn parse(s: &str) -> Option<Duration> {
    let (number, unit_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let ms: f64 = number.parse::<f64>().ok()? * unit_ms;
    // In range, so the cast below is exact enough and never negative.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (1.0..=60_000.0)
        .contains(&ms)
        .then(|| Duration::from_micros((ms * 1000.0).round() as u64))
}
