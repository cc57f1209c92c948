//! Running mkimage and checking what it writes, for the image tests.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::harness;
use crate::sample::SampleStore;

/// How long one mkimage or fsck.erofs run may take.
pub const TIMEOUT: Duration = Duration::from_secs(180);

/// Runs mkimage with `args`, without the environment's image cache.
pub fn mkimage(args: &[&OsStr]) -> Output {
    harness::run(
        Command::new(harness::bin("mkimage"))
            .args(args)
            .env_remove("NIXSTOREFS_IMAGE_CACHE")
            .stdin(Stdio::null()),
        TIMEOUT,
    )
}

/// mkimage of the sample's closure into `out`; must succeed. Returns its standard error.
pub fn image_of(s: &SampleStore, out: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&OsStr> = vec!["--store-dir".as_ref(), s.store_dir.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    args.push(s.closure_file.as_os_str());
    args.push(out.as_os_str());
    let o = mkimage(&args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "mkimage {args:?} failed ({}): {stderr}",
        o.status
    );
    stderr
}

/// `fsck.erofs --extract` reads and decompresses every file; 1.5 exits 0 on some
/// problems it reports, so its messages count too.
pub fn fsck(image: &Path) {
    let o = harness::run(
        Command::new("fsck.erofs").arg("--extract").arg(image),
        TIMEOUT,
    );
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !text.contains("<E>") && !text.contains("<W>"),
        "fsck.erofs {}: {text}",
        image.display()
    );
}

/// The SHA-256 of the file at `path`.
pub fn sha256(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}
