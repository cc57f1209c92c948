//! The Landlock part of the sandbox: file access confined to reading the store.
//!
//! Every file-system right the running kernel knows is handled (so denied unless granted),
//! and the only grant is reading files and directories beneath the store directory. Where
//! the kernel's ABI has them, TCP bind and connect are handled with no port granted
//! (ABI 4), and abstract Unix sockets and signals are scoped to the process (ABI 6).
//! Landlock also forbids a restricted process to change the mount topology.
//!
//! The request path opens files through `/proc/self/fd` magic links of `O_PATH`
//! descriptors it holds; Landlock checks such an open against the object's real place,
//! which is beneath the store, so that keeps working. The FUSE daemon also reopens
//! `/dev/fuse` for each request thread (a cloned queue), so it is granted read and write
//! of that one device.

use std::path::Path;

use ::landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::Profile;

/// The newest Landlock ABI this daemon asks for; older kernels get what they have.
const WANTED: ABI = ABI::V6;

/// What Landlock enforces on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// The ABI in force (0 when the kernel has no Landlock).
    pub abi: i32,
    /// Whether everything asked for is enforced.
    pub complete: bool,
}

/// Restricts the calling thread (and the threads it starts afterwards) to reading beneath
/// `store_dir`, as described in the module documentation. Best effort: a kernel without
/// Landlock, or with an older ABI, enforces what it can, and [`Status`] says what.
pub fn restrict(store_dir: &Path, profile: Profile) -> Result<Status, String> {
    let store = PathFd::new(store_dir).map_err(|e| format!("{}: {e}", store_dir.display()))?;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(WANTED))
        .map_err(|e| e.to_string())?
        .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
        .map_err(|e| e.to_string())?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .map_err(|e| e.to_string())?
        .create()
        .map_err(|e| e.to_string())?
        .add_rule(PathBeneath::new(store, AccessFs::from_read(WANTED)))
        .map_err(|e| e.to_string())?;
    if profile == Profile::Fuse {
        let fuse = PathFd::new("/dev/fuse").map_err(|e| format!("/dev/fuse: {e}"))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(
                fuse,
                AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
            ))
            .map_err(|e| e.to_string())?;
    }
    let status = ruleset.restrict_self().map_err(|e| e.to_string())?;
    let abi = match status.landlock {
        ::landlock::LandlockStatus::Available { effective_abi, .. } => effective_abi as i32,
        _ => 0,
    };
    Ok(Status {
        abi: if status.ruleset == RulesetStatus::NotEnforced {
            0
        } else {
            abi
        },
        complete: status.ruleset == RulesetStatus::FullyEnforced,
    })
}
