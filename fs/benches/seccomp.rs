//! What the seccomp filter costs a request: the virtio-fs device serving the same
//! requests (LOOKUP, GETATTR, OPEN, READ of 4 KiB, RELEASE, FORGET) from crafted rings,
//! in child processes with and without the filter, interleaved, medians compared.
//!
//! `cargo bench -p nixstorefs --features hostile-guest --bench seccomp`
//!
//! A plain `main`: each measurement forks a child (the filter cannot be removed once
//! installed), which the test harness's threads would make unsound.

use std::time::Instant;

use nixstorefs::sandbox::{seccomp, Profile, SeccompMode};
use nixstorefs::session::SessionLimits;
use nixstorefs::transport::virtiofs::hostile::{opcode, Harness, CLOSURE_PATH, ROOT};

/// Request rounds per measurement (each round is six requests).
const ROUNDS: u32 = 20_000;
/// Measurements of each variant, interleaved.
const SAMPLES: usize = 7;

/// Serves `ROUNDS` rounds and returns nanoseconds per request.
fn measure(h: &mut Harness) -> f64 {
    let path = h.lookup(ROOT, CLOSURE_PATH).unwrap();
    let started = Instant::now();
    for _ in 0..ROUNDS {
        let file = h.lookup(path, "file").unwrap();
        h.call(opcode::GETATTR, file, &[0u8; 16], 16 + 104);
        let fh = h.open(opcode::OPEN, file).unwrap();
        h.call(
            opcode::READ,
            file,
            &Harness::read_in(fh, 0, 4096),
            16 + 4096,
        );
        h.call(opcode::RELEASE, file, &Harness::release_in(fh), 16);
        h.call(opcode::FORGET, file, &1u64.to_le_bytes(), 0);
    }
    started.elapsed().as_nanos() as f64 / f64::from(ROUNDS * 6)
}

/// Runs one measurement in a child, with the filter when `filtered`; returns ns/request.
fn in_child(filtered: bool) -> f64 {
    let (read, write) = rustix::pipe::pipe().unwrap();
    // SAFETY: this process has one thread; the child runs the measurement and exits.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            let mut h = Harness::new(SessionLimits::default(), 1, 1);
            if filtered {
                seccomp::install(Profile::VirtioFs, SeccompMode::Kill, None).unwrap();
            }
            let ns = measure(&mut h);
            rustix::io::write(&write, &ns.to_le_bytes()).unwrap();
            // SAFETY: ends the child without running the parent's exit handlers (the
            // harness's temporary directory is the child's copy; it is left to /tmp).
            unsafe { libc::_exit(0) }
        }
        child => {
            drop(write);
            let mut buf = [0u8; 8];
            rustix::io::read(&read, &mut buf).expect("the child's figure");
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
            f64::from_le_bytes(buf)
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let mut plain = Vec::new();
    let mut filtered = Vec::new();
    let mut ratios = Vec::new();
    in_child(false); // warm-up: page cache, allocator
    for _ in 0..SAMPLES {
        let a = in_child(true);
        let b = in_child(false);
        filtered.push(a);
        plain.push(b);
        ratios.push(a / b);
    }
    let (p, f, r) = (
        median(plain),
        median(filtered.clone()),
        median(ratios.clone()),
    );
    println!("requests served per measurement: {}", ROUNDS * 6);
    println!("without the filter: {p:.0} ns/request (median of {SAMPLES})");
    println!("with the filter:    {f:.0} ns/request (median of {SAMPLES})");
    println!(
        "filtered / plain:   {r:.3}x (median of pairwise ratios; min {:.3}, max {:.3})",
        ratios.iter().cloned().fold(f64::INFINITY, f64::min),
        ratios.iter().cloned().fold(0.0, f64::max)
    );
    println!("cost of the filter: {:.0} ns/request", f - p);
}
