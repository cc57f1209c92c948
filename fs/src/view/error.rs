//! What can go wrong while setting up a view, said with the path and the cause.

use std::path::PathBuf;

use crate::store_path::StorePath;

/// An error found while setting up the view.
#[derive(Debug)]
pub enum ViewError {
    /// The store directory cannot be opened.
    StoreDir {
        /// The store directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Closure paths absent from the host store.
    Missing {
        /// Where the closure came from (file name or `<stdin>`).
        origin: String,
        /// The store directory.
        store_dir: PathBuf,
        /// The missing paths (all of them).
        paths: Vec<StorePath>,
    },
    /// A closure path is a mount point, and crossing mounts was not asked for.
    MountPoint {
        /// The path.
        path: PathBuf,
    },
    /// `/proc` cannot be used: the view needs `/proc/self/fd` to check where cached
    /// directories are and to reopen files it has verified.
    Proc {
        /// The cause.
        source: std::io::Error,
    },
    /// An update's closure is of another store directory than the one served.
    OtherStore {
        /// Where the closure came from.
        origin: String,
        /// The closure's store directory.
        closure_store: PathBuf,
        /// The store directory the view serves.
        served_store: PathBuf,
    },
    /// A closure path exists but cannot be examined.
    Stat {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl std::fmt::Display for ViewError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ViewError::StoreDir { path, source } => {
                write!(f, "cannot open directory {}: {source}", path.display())
            }
            ViewError::Missing {
                origin,
                store_dir,
                paths,
            } => {
                const SHOWN: usize = 5;
                write!(
                    f,
                    "{origin}: {} closure path{} missing from {}: ",
                    paths.len(),
                    if paths.len() == 1 { " is" } else { "s are" },
                    store_dir.display()
                )?;
                for (i, p) in paths.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{}", p.base_name())?;
                }
                if paths.len() > SHOWN {
                    write!(f, " and {} more", paths.len() - SHOWN)?;
                }
                write!(f, " (--allow-missing leaves them out)")
            }
            ViewError::MountPoint { path } => write!(
                f,
                "closure path {} is a mount point; --cross-mounts serves it",
                path.display()
            ),
            ViewError::Proc { source } => write!(
                f,
                "cannot use /proc/self/fd ({source}): nixstorefs needs procfs at /proc"
            ),
            ViewError::OtherStore {
                origin,
                closure_store,
                served_store,
            } => write!(
                f,
                "{origin}: a closure of {}, but this daemon serves {}",
                closure_store.display(),
                served_store.display()
            ),
            ViewError::Stat { path, source } => {
                write!(f, "cannot examine {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for ViewError {}
