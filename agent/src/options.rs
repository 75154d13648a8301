//! One declaration per configuration section: [`options!`] turns a list of
//! settings into a struct that is at once a clap argument group (each flag
//! with its `PODNET_*` twin and its `--help` text) and the same section of the
//! `--config` YAML file (each key the flag's name), every value optional so
//! that flags win over the file and the file over the defaults.
//!
//! Each subsystem declares its own section beside its code and resolves it
//! into its settings; `config` only composes the sections.

use std::time::Duration;

/// Declares a configuration section: the struct (all fields `Option`), its
/// derives (`clap::Args`, `serde::Deserialize` with kebab-case keys and
/// unknown keys refused), [`keys`](#method.keys) (the YAML keys) and `or`
/// (each value from `self`, else from the other).
macro_rules! options {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident : Option<$ty:ty>, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq, clap::Args, serde::Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: Option<$ty>, )*
        }

        impl $name {
            /// The section's keys in the `--config` file (the flags' names).
            pub fn keys() -> impl Iterator<Item = String> {
                [$(stringify!($field)),*].into_iter().map(|f| f.replace('_', "-"))
            }

            /// Each setting from `self` (flags and environment), else from
            /// `fallback` (the config file).
            #[must_use]
            pub fn or(self, fallback: Self) -> Self {
                Self { $( $field: self.$field.or(fallback.$field), )* }
            }
        }
    };
}
pub(crate) use options;

/// Parses a duration flag such as `5s`, `500ms` or `1.5s` (1 ms to 60 s).
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    podnet_api::duration::parse(s)
        .ok_or_else(|| format!("{s:?} is not a duration like \"5s\" or \"500ms\" (1ms to 60s)"))
}

/// Reads a duration key of the config file (same syntax as the flag).
pub fn duration_key<'de, D>(d: D) -> Result<Option<Duration>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let s = <String as serde::Deserialize>::deserialize(d)?;
    duration_arg(&s).map(Some).map_err(serde::de::Error::custom)
}

/// Parses a long duration flag: whole seconds, minutes or hours such as
/// `90s`, `5m` or `1h` (1 s to 24 h).
pub fn long_duration_arg(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like \"90s\", \"5m\" or \"1h\" (1s to 24h)");
    let (number, unit_s) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => return Err(bad()),
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let secs = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_s))
        .filter(|n| (1..=86_400).contains(n))
        .ok_or_else(bad)?;
    Ok(Duration::from_secs(secs))
}

/// Reads a long duration key of the config file (same syntax as the flag).
pub fn long_duration_key<'de, D>(d: D) -> Result<Option<Duration>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let s = <String as serde::Deserialize>::deserialize(d)?;
    long_duration_arg(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    options! {
        /// A section for the test.
        pub struct Sample {
            /// A port list.
            #[arg(long, env = "PODNET_TEST_SAMPLE_PORTS", value_delimiter = ',')]
            pub sample_ports: Option<Vec<u16>>,
            /// A duration.
            #[arg(long, value_parser = duration_arg)]
            #[serde(default, deserialize_with = "duration_key")]
            pub sample_wait: Option<Duration>,
        }
    }

    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        sample: Sample,
    }

    #[test]
    fn one_declaration_gives_flags_keys_and_precedence() {
        let flags = Args::try_parse_from(["x", "--sample-ports", "53,5353"])
            .unwrap()
            .sample;
        let file: Sample =
            serde_norway::from_str("sample-ports: [1]\nsample-wait: 250ms\n").unwrap();
        assert_eq!(
            flags.or(file),
            Sample {
                sample_ports: Some(vec![53, 5353]),
                sample_wait: Some(Duration::from_millis(250)),
            }
        );
        assert_eq!(
            Sample::keys().collect::<Vec<_>>(),
            ["sample-ports", "sample-wait"]
        );
        let unknown = serde_norway::from_str::<Sample>("sample-port: [1]\n").unwrap_err();
        assert!(unknown.to_string().contains("unknown field `sample-port`"));
    }

    #[test]
    fn long_durations_take_seconds_minutes_and_hours_within_a_day() {
        assert_eq!(long_duration_arg("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(long_duration_arg("5m"), Ok(Duration::from_mins(5)));
        assert_eq!(long_duration_arg("24h"), Ok(Duration::from_hours(24)));
        for bad in [
            "",
            "5",
            "m",
            "0s",
            "25h",
            "1.5m",
            "-1m",
            "5 m",
            "99999999999999999999h",
        ] {
            let e = long_duration_arg(bad).unwrap_err();
            assert!(e.contains("1s to 24h"), "{bad}: {e}");
        }
    }
}
