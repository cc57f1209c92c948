//! A hostile guest against the virtio-fs device, request by request: every bound holds,
//! nothing panics or spins, and no byte from outside the closure comes back.

use super::device::Drained;
use super::hostile::{opcode, Harness, CLOSURE_PATH, IN_HEADER, OUTSIDE_PATH, ROOT};
use crate::session::SessionLimits;

fn limits() -> SessionLimits {
    SessionLimits {
        max_open_files: 500,
        max_open_dirs: 50,
        max_dir_bytes: 1 << 20,
        max_cached_files: 16,
    }
}

/// The node of the closure path, and of `name` inside it.
fn node(h: &mut Harness, name: &str) -> u64 {
    let path = h.lookup(ROOT, CLOSURE_PATH).expect("the closure path");
    h.lookup(path, name).expect("the file")
}

#[test]
fn opens_without_release_are_bounded() {
    let mut h = Harness::new(limits(), 40, 100);
    let dir = node(&mut h, "dir");
    let file = node(&mut h, "file");
    let before = h.open_descriptors();
    let mut handles = Vec::new();
    for _ in 0..limits().max_open_files {
        handles.push(
            h.open(opcode::OPEN, file)
                .expect("an open within the limit"),
        );
    }
    // Opening every other file too: the host descriptors stay within the cache.
    for i in 0..40 {
        let f = h.lookup(dir, &format!("f{i:05}")).unwrap();
        assert_eq!(h.open(opcode::OPEN, f), Err(libc::EMFILE));
    }
    for _ in 0..100 {
        assert_eq!(h.open(opcode::OPEN, file), Err(libc::EMFILE));
    }
    let held = h.open_descriptors() - before;
    assert!(
        held <= limits().max_cached_files + 2,
        "{held} descriptors for {} handles",
        handles.len()
    );
    // The guest keeps working: its handles read, and a release makes room.
    let reply = h.call(
        opcode::READ,
        file,
        &Harness::read_in(handles[7], 0, 4096),
        16 + 4096,
    );
    assert_eq!(reply.error(), Some(0));
    assert_eq!(reply.body(), b"hello, guest\n");
    let released = h.call(opcode::RELEASE, file, &Harness::release_in(handles[0]), 16);
    assert_eq!(released.error(), Some(0));
    assert!(h.open(opcode::OPEN, file).is_ok());
}

#[test]
fn many_files_read_through_a_bounded_cache() {
    let mut h = Harness::new(limits(), 200, 5000);
    let dir = node(&mut h, "dir");
    let files: Vec<u64> = (0..200)
        .map(|i| h.lookup(dir, &format!("f{i:05}")).unwrap())
        .collect();
    // After the lookups: the directory's own descriptor is cached by then.
    let before = h.open_descriptors();
    let mut opened = Vec::new();
    for f in files {
        opened.push((f, h.open(opcode::OPEN, f).unwrap()));
    }
    // Every handle still reads, each through a descriptor reopened and checked again.
    for &(f, fh) in opened.iter().rev() {
        let reply = h.call(opcode::READ, f, &Harness::read_in(fh, 0, 8192), 16 + 8192);
        assert_eq!(reply.error(), Some(0));
        assert_eq!(reply.body().len(), 5000);
    }
    let held = h.open_descriptors() - before;
    assert!(held <= limits().max_cached_files + 2, "{held} descriptors");
    // Closed files hold none.
    for &(f, fh) in &opened {
        h.call(opcode::RELEASE, f, &Harness::release_in(fh), 16);
    }
    assert!(
        h.open_descriptors() <= before,
        "descriptors left after the last release"
    );
}

#[test]
fn opendir_snapshots_are_bounded() {
    let mut h = Harness::new(limits(), 10, 1);
    let dir = node(&mut h, "dir");
    for _ in 0..limits().max_open_dirs {
        h.open(opcode::OPENDIR, dir).expect("within the limit");
    }
    assert_eq!(h.open(opcode::OPENDIR, dir), Err(libc::EMFILE));
    assert_eq!(h.session.open_handles().1, limits().max_open_dirs);

    // Listing bytes: a directory of 2,000 entries (about 100 KB) against 256 KiB.
    let mut small = limits();
    small.max_dir_bytes = 256 << 10;
    let mut h = Harness::new(small, 2000, 1);
    let dir = node(&mut h, "dir");
    let mut refused = None;
    for i in 0..small.max_open_dirs {
        if let Err(e) = h.open(opcode::OPENDIR, dir) {
            refused = Some((i, e));
            break;
        }
    }
    let (after, errno) = refused.expect("the byte budget ran out");
    assert_eq!(errno, libc::ENFILE);
    assert!(after >= 1, "one snapshot fits");
}

#[test]
fn forget_of_unknown_and_overcounted_nodes() {
    let mut h = Harness::new(limits(), 1, 1);
    let forget = |count: u64| count.to_le_bytes().to_vec();
    // Unknown nodes, the root, and absurd counts: no reply, no panic.
    for node in [0, ROOT, 12345, u64::MAX] {
        let reply = h.call(opcode::FORGET, node, &forget(u64::MAX), 16);
        assert_eq!(reply.used, 0);
    }
    let file = node(&mut h, "file");
    assert!(h.live_nodes() >= 2);
    let reply = h.call(opcode::FORGET, file, &forget(1_000_000), 16);
    assert_eq!(reply.used, 0);
    // Forgotten past zero: gone from the live set, and the guest still works.
    let getattr = h.call(opcode::GETATTR, file, &[0u8; 16], 16 + 104);
    assert_ne!(getattr.error(), None);
    assert!(node(&mut h, "file") > 0);
    // BATCH_FORGET with a count that promises more entries than were sent.
    let mut body = 1000u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&file.to_le_bytes());
    body.extend_from_slice(&1u64.to_le_bytes());
    assert_eq!(h.call(opcode::BATCH_FORGET, ROOT, &body, 16).used, 0);
}

#[test]
fn huge_and_far_reads() {
    let mut h = Harness::new(limits(), 1, 1);
    let big = node(&mut h, "big");
    let fh = h.open(opcode::OPEN, big).unwrap();
    // 4 GiB asked for, 64 KiB of buffers given: refused, not a panic or a wrong length.
    let reply = h.call(
        opcode::READ,
        big,
        &Harness::read_in(fh, 0, u32::MAX),
        16 + 65536,
    );
    assert_eq!(reply.error(), Some(libc::EINVAL));
    // Within the buffers but past the negotiated maximum: clamped to 1 MiB.
    let reply = h.call(
        opcode::READ,
        big,
        &Harness::read_in(fh, 0, u32::MAX),
        16 + (2 << 20),
    );
    assert_eq!(reply.error(), Some(0));
    assert_eq!(reply.body().len(), 1 << 20);
    // At the end of every offset: nothing, successfully.
    for offset in [u64::MAX, u64::MAX - 1, 1 << 63, 3 << 20] {
        let reply = h.call(
            opcode::READ,
            big,
            &Harness::read_in(fh, offset, 4096),
            16 + 4096,
        );
        assert_eq!(reply.error(), Some(0), "offset {offset}");
        assert!(reply.body().is_empty());
    }
    // A handle never given out, and one of a directory.
    let reply = h.call(
        opcode::READ,
        big,
        &Harness::read_in(fh + 1000, 0, 10),
        16 + 10,
    );
    assert_eq!(reply.error(), Some(libc::EBADF));
}

#[test]
fn buffers_too_short_for_a_reply() {
    let mut h = Harness::new(limits(), 1, 1);
    let file = node(&mut h, "file");
    let fh = h.open(opcode::OPEN, file).unwrap();
    let dir = node(&mut h, "dir");
    for (op, node, body) in [
        (opcode::READ, file, Harness::read_in(fh, 0, 4096)),
        (opcode::READDIR, dir, Harness::read_in(0, 0, 4096)),
        (opcode::READDIRPLUS, dir, Harness::read_in(0, 0, 4096)),
        (opcode::GETATTR, file, vec![0u8; 16]),
        (opcode::LOOKUP, ROOT, b"x\0".to_vec()),
    ] {
        for reply_len in [0, 1, 8, 15] {
            let reply = h.call(op, node, &body, reply_len);
            assert_eq!(reply.used, 0, "opcode {op} with {reply_len} reply bytes");
        }
        // Room for the header only: an error reply, never a short success.
        let reply = h.call(op, node, &body, 16);
        assert!(reply.used == 16 && reply.error() != Some(0) || op == opcode::GETATTR);
    }
    // Requests cut short: shorter than a header, a body shorter than its opcode's.
    let request = h.request(opcode::READ, file, &Harness::read_in(fh, 0, 10));
    for cut in [0, 1, IN_HEADER - 1, IN_HEADER, IN_HEADER + 8] {
        let reply = h.send(&request[..cut.max(1)], 4096);
        assert!(
            reply.used == 0 || reply.error().is_some_and(|e| e != 0),
            "cut at {cut}"
        );
    }
    // A header that claims more than the buffers hold, and an unknown opcode.
    let mut lying = h.request(opcode::LOOKUP, ROOT, b"file\0");
    lying[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_ne!(h.send(&lying, 4096).error(), Some(0));
    assert_eq!(h.call(9999, ROOT, &[], 4096).error(), Some(libc::ENOSYS));
    // The device still serves.
    assert_eq!(node(&mut h, "file"), file);
}

#[test]
fn chains_outside_guest_memory() {
    let mut h = Harness::new(limits(), 1, 1);
    let request = h.request(opcode::GETATTR, ROOT, &[0u8; 16]);
    let len = request.len() as u32;
    let _ = h.send(&request, 0);
    for chain in [
        vec![(u64::MAX - 8, len, 0), (0x10_0000, 4096, 2)],
        vec![(0x1_0000, len, 0), (u64::MAX - 100, 4096, 2)],
        vec![(0x1_0000, len, 0), (0x3f_ff00, 0x1000, 2)],
        vec![(0x1_0000, u32::MAX, 0), (0x10_0000, 4096, 2)],
    ] {
        assert_eq!(h.send_chain(&chain).used, 0);
    }
    assert!(h.lookup(ROOT, CLOSURE_PATH).is_ok());
}

#[test]
fn a_malformed_ring_is_left_alone_not_spun_on() {
    let mut h = Harness::new(limits(), 1, 1);
    // The available index more than a queue ahead of what was read.
    assert_eq!(h.ring_with_avail_ahead(200), Drained::Broken);
    assert!(h.device.is_broken(1));
    // Still broken, answered at once, until the VMM resets the device.
    assert_eq!(h.ring_with_avail_ahead(1), Drained::Broken);
    vhost_user_backend::VhostUserBackend::reset_device(&h.device);
    assert!(!h.device.is_broken(1));
    assert!(h.lookup(ROOT, CLOSURE_PATH).is_ok());
}

#[test]
fn destroy_and_reset_release_everything() {
    let mut h = Harness::new(limits(), 20, 10);
    let baseline_fds = h.open_descriptors();
    let baseline_live = h.live_nodes();
    for boot in 0..100 {
        let dir = node(&mut h, "dir");
        for i in 0..20 {
            let f = h.lookup(dir, &format!("f{i:05}")).unwrap();
            h.open(opcode::OPEN, f).unwrap();
        }
        h.open(opcode::OPENDIR, dir).unwrap();
        assert!(h.live_nodes() > baseline_live);
        if boot % 2 == 0 {
            assert_eq!(h.call(opcode::DESTROY, ROOT, &[], 0).used, 0);
        } else {
            vhost_user_backend::VhostUserBackend::reset_device(&h.device);
        }
        assert_eq!(h.session.open_handles(), (0, 0), "after boot {boot}");
        assert_eq!(h.live_nodes(), baseline_live, "after boot {boot}");
    }
    assert!(h.open_descriptors() <= baseline_fds + 1);
    // And the next driver is served as the first was.
    assert!(h.lookup(ROOT, CLOSURE_PATH).is_ok());
}

#[test]
fn nothing_outside_the_closure() {
    let mut h = Harness::new(limits(), 1, 1);
    for name in [OUTSIDE_PATH, ".links", "", "/", "../store", "../secret"] {
        assert!(h.lookup(ROOT, name).is_err(), "{name:?} was found");
    }
    // The root's parent is the root itself.
    assert_eq!(h.lookup(ROOT, ".."), Ok(ROOT));
    let path = h.lookup(ROOT, CLOSURE_PATH).unwrap();
    for name in ["..", "../..", &format!("../{OUTSIDE_PATH}")] {
        if let Ok(n) = h.lookup(path, name) {
            // `..` may resolve, but only ever to the root.
            assert_eq!(n, ROOT, "{name:?}");
        }
    }
    // Nothing the guest can read names the secret: walk, list and read everything.
    let mut seen = Vec::new();
    let listing = h.call(
        opcode::READDIR,
        ROOT,
        &Harness::read_in(0, 0, 65536),
        16 + 65536,
    );
    seen.extend_from_slice(&listing.bytes);
    for name in ["file", "big", "link", "dir"] {
        let n = h.lookup(path, name).unwrap();
        if let Ok(fh) = h.open(opcode::OPEN, n) {
            let r = h.call(
                opcode::READ,
                n,
                &Harness::read_in(fh, 0, 1 << 20),
                16 + (1 << 20),
            );
            seen.extend_from_slice(&r.bytes);
        }
        let r = h.call(opcode::READLINK, n, &[], 16 + 4096);
        seen.extend_from_slice(&r.bytes);
    }
    assert!(!Harness::leaks(&seen));
    assert!(!seen
        .windows(OUTSIDE_PATH.len())
        .any(|w| w == OUTSIDE_PATH.as_bytes()));
}
