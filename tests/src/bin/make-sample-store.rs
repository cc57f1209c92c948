//! `make-sample-store [--big-mib N] [--closure-info] DIR`: writes the sample Nix store used
//! by the end-to-end tests into DIR, to try nixstorefs by hand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use nixstorefs_tests::sample::{self, SampleOptions};

const USAGE: &str = "usage: make-sample-store [--big-mib N] [--closure-info] DIR

Writes a sample Nix store to DIR/store and its closure (a store-paths list) to
DIR/closure.txt. DIR must not exist or be empty.

  --big-mib N       size of the big pseudo-random file in MiB (default 64)
  --closure-info    also write DIR/closure-info (store-paths, registration)
                    and DIR/registration";

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("make-sample-store: {msg}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<(), String> {
    let mut opts = SampleOptions::default();
    let mut closure_info = false;
    let mut dir: Option<PathBuf> = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return Ok(());
            }
            Some("--big-mib") => {
                let n = args.next().ok_or("--big-mib needs a value")?;
                opts.big_file_mib = n
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("--big-mib: not a number: {n:?}"))?;
            }
            Some("--closure-info") => closure_info = true,
            Some(s) if s.starts_with('-') && s != "-" => {
                return Err(format!("unknown option {s}\n{USAGE}"))
            }
            _ if dir.is_none() => dir = Some(PathBuf::from(arg)),
            _ => return Err(format!("one DIR only\n{USAGE}")),
        }
    }
    let dir = dir.ok_or_else(|| format!("missing DIR\n{USAGE}"))?;
    // Refusing a non-empty DIR keeps a typo from sprinkling a store into someone's files.
    match std::fs::read_dir(&dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(format!("{} exists and is not empty", dir.display()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }

    let start = Instant::now();
    let s = sample::build(&dir, &opts).map_err(|e| format!("{}: {e}", dir.display()))?;
    if closure_info {
        s.write_closure_info(&s.dir.join("closure-info"))
            .and_then(|()| s.write_registration(&s.dir.join("registration"), false))
            .map_err(|e| format!("writing the closure info: {e}"))?;
    }
    println!("store dir:    {}", s.store_dir.display());
    println!("closure file: {}", s.closure_file.display());
    if closure_info {
        println!("closure info: {}", s.dir.join("closure-info").display());
        println!("registration: {}", s.dir.join("registration").display());
    }
    println!(
        "{} closure paths, {} noise entries, big file {} MiB, {} wide entries, depth {}; built in {:.2?}",
        s.closure.len(),
        s.noise.len(),
        opts.big_file_mib,
        opts.wide_dir_entries,
        opts.depth,
        start.elapsed()
    );
    Ok(())
}
