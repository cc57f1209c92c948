//! What is timed: walks, sequential and random reads, small-file reads. Each works on a
//! root (the host store, a nixstorefs mount, a bindfs mount) and paths relative to it, so
//! every variant does exactly the same work.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nixstorefs_tests::sample::PseudoRandom;

/// What a walk saw; equal totals across variants show they did the same work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkTotals {
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
}

/// lstat of every entry below `root/name` for each name, depth first, reading directories
/// with getdents and stat-ing entries relative to them (as `find` does).
pub fn walk(root: &Path, names: &[String]) -> io::Result<(WalkTotals, Duration)> {
    let t = Instant::now();
    let mut totals = WalkTotals::default();
    let mut stack: Vec<PathBuf> = Vec::new();
    for n in names {
        let p = root.join(n);
        let m = fs::symlink_metadata(&p)?;
        count(&mut totals, &m);
        if m.is_dir() {
            stack.push(p);
        }
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir)? {
                let e = e?;
                let m = e.metadata()?;
                count(&mut totals, &m);
                if m.is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
    Ok((totals, t.elapsed()))
}

fn count(t: &mut WalkTotals, m: &fs::Metadata) {
    t.entries += 1;
    if m.is_dir() {
        t.dirs += 1;
    } else if m.is_file() {
        t.files += 1;
        t.bytes += m.len();
    }
}

/// Regular files below the named paths of `root`, relative to it, with their sizes.
pub fn files(root: &Path, names: &[String]) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = names.iter().map(PathBuf::from).collect();
    while let Some(rel) = stack.pop() {
        let m = fs::symlink_metadata(root.join(&rel))?;
        if m.is_dir() {
            for e in fs::read_dir(root.join(&rel))? {
                stack.push(rel.join(e?.file_name()));
            }
        } else if m.is_file() {
            out.push((rel, m.len()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads each file whole in `chunk`-byte reads; bytes read and the time.
fn read_whole(root: &Path, rels: &[PathBuf], chunk: usize) -> io::Result<(u64, Duration)> {
    let mut buf = vec![0u8; chunk];
    let t = Instant::now();
    let mut total = 0;
    for r in rels {
        let mut f = File::open(root.join(r))?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok((total, t.elapsed()))
}

/// Reads each file whole in 1 MiB chunks; bytes read and the time.
pub fn read_sequential(root: &Path, rels: &[PathBuf]) -> io::Result<(u64, Duration)> {
    read_whole(root, rels, 1 << 20)
}

/// `count` 4 KiB-aligned offsets spread over the files of the given sizes, from `seed`:
/// every variant reads the same blocks in the same order.
pub fn random_offsets(sizes: &[u64], count: usize, seed: &str) -> Vec<(usize, u64)> {
    let mut rng = PseudoRandom::new(seed);
    (0..count)
        .map(|_| {
            let f = rng.below(sizes.len() as u64) as usize;
            let blocks = (sizes[f] / 4096).max(1);
            (f, rng.below(blocks) * 4096)
        })
        .collect()
}

/// 4 KiB preads at `offsets` (file index, offset); files are opened before the clock starts.
pub fn read_random(
    root: &Path,
    rels: &[PathBuf],
    offsets: &[(usize, u64)],
) -> io::Result<Duration> {
    let files: Vec<File> = rels
        .iter()
        .map(|r| File::open(root.join(r)))
        .collect::<io::Result<_>>()?;
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    for &(f, off) in offsets {
        let n = files[f].read_at(&mut buf, off)?;
        if n != buf.len() {
            return Err(io::Error::other(format!(
                "short read at {off} of {}",
                rels[f].display()
            )));
        }
    }
    Ok(t.elapsed())
}

/// Opens, reads whole (64 KiB reads) and closes each file; bytes read and the time.
pub fn read_small(root: &Path, rels: &[PathBuf]) -> io::Result<(u64, Duration)> {
    read_whole(root, rels, 64 << 10)
}

/// Resident memory (KiB) and open descriptors of `pid`.
pub fn footprint(pid: i32) -> io::Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS"))?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok((rss, fds))
}
