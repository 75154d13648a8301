//! How podnetctl shows API results to people: plain-text tables and
//! `key: value` lines. Kept in the library so the output is unit-tested.

use std::fmt::Write as _;

use serde_json::Value;

/// `HH:MM:SS.mmm` of a Unix time in milliseconds, in UTC.
pub fn time_of_day_utc(unix_ms: u64) -> String {
    let ms_of_day = unix_ms % 86_400_000;
    let (hours, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (seconds, millis) = (rest / 1000, rest % 1000);
    format!("{hours:02}:{minutes:02}:{seconds:02}.{millis:03}")
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
pub fn table<'a, const N: usize>(rows: impl Iterator<Item = &'a [String; N]> + Clone) -> String {
    let mut widths = [0usize; N];
    for row in rows.clone() {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                // Writing to a String cannot fail.
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A JSON value as `key: value` lines: nested objects become dotted keys,
/// arrays of plain values a comma-separated list, other arrays indexed keys.
pub fn key_value_lines(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(_) => flatten(&mut out, "", value),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn flatten(out: &mut String, key: &str, value: &Value) {
    let child = |name: &str| {
        if key.is_empty() {
            name.to_owned()
        } else {
            format!("{key}.{name}")
        }
    };
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (name, v) in map {
                flatten(out, &child(name), v);
            }
        }
        Value::Array(items) if items.iter().any(|v| v.is_object() || v.is_array()) => {
            for (i, v) in items.iter().enumerate() {
                flatten(out, &child(&i.to_string()), v);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let list: Vec<String> = items.iter().map(scalar).collect();
            let _ = writeln!(out, "{key}: {}", list.join(", "));
        }
        Value::Array(_) | Value::Object(_) => {
            let _ = writeln!(out, "{key}: (none)");
        }
        v => {
            let _ = writeln!(out, "{key}: {}", scalar(v));
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_of_day() {
        assert_eq!(time_of_day_utc(0), "00:00:00.000");
        assert_eq!(time_of_day_utc(86_399_999), "23:59:59.999");
        assert_eq!(time_of_day_utc(86_400_000 + 3_723_004), "01:02:03.004");
    }

    #[test]
    fn status_as_key_value_lines() {
        let status = json!({
            "version": "0.1.0",
            "ready": true,
            "tracer": {"attached": true, "program_id": 42, "hook": null},
            "uplinks": ["eth0", "eth1"],
            "endpoints": [{"pod": "a"}],
            "warnings": []
        });
        assert_eq!(
            key_value_lines(&status),
            "\
endpoints.0.pod: a
ready: true
tracer.attached: true
tracer.hook: -
tracer.program_id: 42
uplinks: eth0, eth1
version: 0.1.0
warnings: (none)
"
        );
        assert_eq!(key_value_lines(&json!("ok")), "ok\n");
    }
}
