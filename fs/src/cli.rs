//! What the command-line tools built on the closure view share: the closure options, exit
//! statuses and logging, so that `nixstorefs` and `mkimage` take and report alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::closure::Closure;

/// A failure and the exit status it maps to: 2 for bad input, 1 for the rest.
#[derive(Debug)]
pub struct Failure {
    /// The process's exit status.
    pub status: u8,
    /// What to print.
    pub message: String,
}

impl Failure {
    /// Bad input (malformed closure, missing paths, bad options): exit status 2.
    pub fn input(message: impl Into<String>) -> Self {
        Failure {
            status: 2,
            message: message.into(),
        }
    }

    /// Anything else that went wrong: exit status 1.
    pub fn runtime(message: impl Into<String>) -> Self {
        Failure {
            status: 1,
            message: message.into(),
        }
    }
}

/// Where the closure's store paths live, for both tools.
#[derive(clap::Args, Debug, Clone)]
pub struct ClosureOptions {
    /// The host store directory; the closure's paths must be directly below it.
    #[arg(
        long,
        env = "NIX_STORE_DIR",
        default_value = "/nix/store",
        value_name = "DIR"
    )]
    pub store_dir: PathBuf,

    /// Leave out closure paths that are missing from the store, with a warning, instead of
    /// refusing them.
    #[arg(long)]
    pub allow_missing: bool,
}

/// Reads and validates the closure `input` against `store_dir` (made absolute).
pub fn load_closure(input: &Path, store_dir: &Path) -> Result<Closure, Failure> {
    let store_dir = std::path::absolute(store_dir)
        .map_err(|e| Failure::input(format!("store directory {}: {e}", store_dir.display())))?;
    Closure::load(input, &store_dir).map_err(|e| Failure::input(e.to_string()))
}

/// Logs through tracing to stderr, or appended to `log_file`: `-v` info, `-vv` debug,
/// `-vvv` trace, warnings otherwise; RUST_LOG overrides.
pub fn init_logging(verbose: u8, log_file: Option<&Path>) -> Result<(), Failure> {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    Failure::input(format!("cannot open log file {}: {e}", path.display()))
                })?;
            builder.with_ansi(false).with_writer(Arc::new(file)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}
