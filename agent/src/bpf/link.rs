//! Attach a program through a pinned link, or adopt the one already pinned.

use std::path::Path;

use aya::programs::{
    links::{FdLink, PinnedLink},
    loaded_programs, BtfTracePoint,
};

use super::BpfError;

/// What happened when a program was put in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    /// Nothing was pinned: the program was attached and its link pinned.
    Attached,
    /// The pinned link runs the same program: kept as is (no gap, no overlap).
    Adopted,
    /// The pinned link ran another program version: replaced.
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

fn program_error(program: &str, message: impl std::fmt::Display) -> BpfError {
    BpfError::Program {
        program: program.to_owned(),
        message: message.to_string(),
    }
}

/// Tag (hash of the instructions) of the program behind a pinned link.
fn pinned_program_tag(link: &FdLink) -> Option<u64> {
    let program_id = link.info().ok()?.program_id();
    loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == program_id)
        .map(|p| p.tag())
}

/// Attaches the loaded `program` and pins its link at `pin`, or adopts the
/// link already pinned there if it runs the same instructions.
///
/// On a version change the old link is detached before the new one attaches:
/// a drop in that instant is missed rather than counted twice.
pub fn attach_tp_btf_pinned(
    program: &mut BtfTracePoint,
    name: &str,
    pin: &Path,
) -> Result<Attachment, BpfError> {
    let our_tag = program.info().map_err(|e| program_error(name, e))?.tag();
    let mut outcome = Attachment::Attached;
    if pin.exists() {
        match PinnedLink::from_pin(pin) {
            Ok(pinned) => {
                let link: FdLink = pinned.into();
                if pinned_program_tag(&link) == Some(our_tag) {
                    return Ok(Attachment::Adopted);
                }
                outcome = Attachment::Replaced;
            }
            Err(e) => {
                tracing::warn!(pin = %pin.display(), error = %e, "unreadable pinned link, replacing it");
            }
        }
        // Dropping the FdLink above closed our handle; removing the pin drops
        // the last reference, which detaches the old program.
        std::fs::remove_file(pin)
            .map_err(|e| program_error(name, format!("unpin old link: {e}")))?;
    }
    let id = program.attach().map_err(|e| program_error(name, e))?;
    let link = program.take_link(id).map_err(|e| program_error(name, e))?;
    FdLink::from(link)
        .pin(pin)
        .map_err(|e| program_error(name, format!("pin link at {}: {e}", pin.display())))?;
    Ok(outcome)
}
