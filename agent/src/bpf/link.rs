//! Attach a program through a pinned link, or adopt the one already pinned.
//!
//! A pinned link is named `<base>-<fingerprint>`, where the fingerprint
//! covers the program's object and every global it was loaded with (kernel
//! offsets, namespace filter, budgets, hook mode). A link with our exact
//! fingerprint runs exactly what we would load: it is adopted with the
//! instance it runs, with no gap and no overlap, and no second instance is
//! loaded. (These are tracing and probe links, which cannot switch program:
//! the kernel's `BPF_LINK_UPDATE` serves tcx, XDP, cgroup and netns links.)
//! Any other link of the same base is an older version or another
//! configuration: it is detached before ours attaches.

use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};

use super::BpfError;

/// What happened when a program was put in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    /// Nothing was pinned: the program was attached and its link pinned.
    Attached,
    /// The pinned link runs the same program and globals: kept as is.
    Adopted,
    /// The pinned link ran another version or configuration: replaced.
    Replaced,
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Attached => "attached",
            Self::Adopted => "adopted",
            Self::Replaced => "replaced",
        })
    }
}

/// FNV-1a over `parts`: a stable fingerprint of an object and its globals.
pub fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The pin file name of a link.
pub fn pin_name(base: &str, fingerprint: u64) -> String {
    format!("{base}-{fingerprint:016x}")
}

fn fs_error(path: &Path, message: impl std::fmt::Display) -> BpfError {
    BpfError::Fs {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Pins of `base` in `dir`, whatever their fingerprint.
fn existing(dir: &Path, base: &str) -> Result<Vec<String>, BpfError> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| fs_error(dir, e))?;
    for entry in entries {
        let name = entry.map_err(|e| fs_error(dir, e))?.file_name();
        let name = name.to_string_lossy();
        if name == base
            || name
                .strip_prefix(base)
                .is_some_and(|rest| rest.starts_with('-'))
        {
            found.push(name.into_owned());
        }
    }
    Ok(found)
}

/// Removes every pinned link of `base` in `dir`, which detaches their
/// programs. Returns how many were removed.
pub fn remove_pinned(dir: &Path, base: &str) -> Result<usize, BpfError> {
    let names = existing(dir, base)?;
    for name in &names {
        let path = dir.join(name);
        std::fs::remove_file(&path).map_err(|e| fs_error(&path, format!("unpin: {e}")))?;
    }
    Ok(names.len())
}

/// Adopts the link pinned as `<base>-<fingerprint>` in `dir`, or detaches
/// other versions and calls `attach` (which loads and attaches the program),
/// pinning the new link. `attach` is not called on adoption: the adopted
/// link's instance is the one that runs, and none other is loaded.
///
/// Returns an open handle on the link, which the caller holds: while it
/// lives the link stays attached even if its pin goes (bpffs unmounted or
/// the pin deleted under the agent); dropping it only closes the descriptor,
/// the pin keeps the link across restarts.
///
/// On a version change the old link is detached before the new one attaches:
/// an event in that instant is missed rather than counted twice.
pub fn attach_pinned(
    dir: &Path,
    base: &str,
    fingerprint: u64,
    attach: impl FnOnce() -> Result<FdLink, BpfError>,
) -> Result<(Attachment, FdLink), BpfError> {
    let ours = pin_name(base, fingerprint);
    let path = dir.join(&ours);
    let names = existing(dir, base)?;
    if names.contains(&ours) && names.len() == 1 {
        let link = PinnedLink::from_pin(&path)
            .map_err(|e| fs_error(&path, format!("open pinned link: {e}")))?;
        return Ok((Attachment::Adopted, link.into()));
    }
    let outcome = if remove_pinned(dir, base)? > 0 {
        Attachment::Replaced
    } else {
        Attachment::Attached
    };
    let link = attach()?
        .pin(&path)
        .map_err(|e| fs_error(&path, format!("pin link: {e}")))?;
    Ok((outcome, link.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_change_with_any_byte() {
        let a = fingerprint(&[b"object", &[1, 0, 0, 0]]);
        assert_eq!(a, fingerprint(&[b"object", &[1, 0, 0, 0]]));
        assert_ne!(a, fingerprint(&[b"object", &[2, 0, 0, 0]]));
        assert_ne!(a, fingerprint(&[b"objecT", &[1, 0, 0, 0]]));
        assert_eq!(pin_name("link_x", 0xab), "link_x-00000000000000ab");
    }

    #[test]
    fn finds_only_its_own_base() {
        let dir = std::env::temp_dir().join(format!("podnet-link-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "link_a-0000000000000001",
            "link_a-0000000000000002",
            "link_ab-0000000000000003",
            "other",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let mut found = existing(&dir, "link_a").unwrap();
        found.sort();
        assert_eq!(
            found,
            vec!["link_a-0000000000000001", "link_a-0000000000000002"]
        );
        assert_eq!(remove_pinned(&dir, "link_a").unwrap(), 2);
        assert_eq!(existing(&dir, "link_a").unwrap().len(), 0);
        assert_eq!(existing(&dir, "link_ab").unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pin_that_is_not_a_link_is_an_error_not_an_adoption() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(pin_name("link_a", 7)), b"").unwrap();
        let e = attach_pinned(dir.path(), "link_a", 7, || {
            panic!("must not attach over an existing pin")
        })
        .unwrap_err();
        assert!(e.to_string().contains("open pinned link"), "{e}");
    }
}
