//! A hostile guest as a fuzz target: arbitrary sequences of FUSE requests, on rings in
//! guest memory, served by the virtio-fs device over a real view of a small store. After
//! every request: no panic, every reply's header length equal to its used length (checked
//! by the harness), no byte of the path outside the closure in any reply, handles within
//! the session's limits and host descriptors within its caches. Each input ends with a
//! DESTROY, after which the session holds nothing.

#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use nixstorefs::session::SessionLimits;
use nixstorefs::transport::virtiofs::hostile::{opcode, Harness, CLOSURE_PATH, OUTSIDE_PATH, ROOT};

const LIMITS: SessionLimits = SessionLimits {
    max_open_files: 64,
    max_open_dirs: 16,
    max_dir_bytes: 64 << 10,
    max_cached_files: 8,
};

/// Opcodes worth sending most often; any other u32 is sent too.
const OPCODES: &[u32] = &[
    opcode::LOOKUP,
    opcode::FORGET,
    opcode::GETATTR,
    opcode::READLINK,
    opcode::OPEN,
    opcode::READ,
    opcode::STATFS,
    opcode::RELEASE,
    opcode::GETXATTR,
    opcode::LISTXATTR,
    opcode::INIT,
    opcode::OPENDIR,
    opcode::READDIR,
    opcode::RELEASEDIR,
    opcode::ACCESS,
    opcode::DESTROY,
    opcode::BATCH_FORGET,
    opcode::READDIRPLUS,
];

/// Names the requests use, so that lookups find things (and try to escape).
const NAMES: &[&str] = &[CLOSURE_PATH, "file", "big", "link", "dir", "f00000", "..", ".", OUTSIDE_PATH, ""];

struct State {
    h: Harness,
    fds: usize,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        let h = Harness::new(LIMITS, 4, 64);
        let fds = h.open_descriptors();
        Mutex::new(State { h, fds })
    })
}

/// Takes `n` bytes from the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, rest) = data.split_at(n);
    *data = rest;
    head
}

fn u64_from(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    u64::from_le_bytes(a)
}

fuzz_target!(|data: &[u8]| {
    let mut guard = state().lock().unwrap_or_else(|p| p.into_inner());
    let State { h, fds } = &mut *guard;
    let mut data = data;
    let mut nodes = vec![ROOT];
    let mut handles = vec![0u64];
    while data.len() >= 4 {
        let head = take(&mut data, 4);
        let op = match head[0] {
            0..=239 => OPCODES[head[0] as usize % OPCODES.len()],
            _ => u32::from(head[1]) | u32::from(head[2]) << 8,
        };
        let node = match head[1] % 4 {
            0 => nodes[head[2] as usize % nodes.len()],
            1 => ROOT,
            2 => u64_from(take(&mut data, 8)),
            _ => *nodes.last().unwrap(),
        };
        let reply_len = match head[3] % 4 {
            0 => 0,
            1 => u32::from(head[3]) / 4,
            2 => 16 + 4096,
            _ => 16 + (1 << 20),
        };
        let body: Vec<u8> = match op {
            opcode::LOOKUP => {
                let name = NAMES[head[2] as usize % NAMES.len()];
                let mut b = name.as_bytes().to_vec();
                b.push(0);
                b
            }
            opcode::READ | opcode::READDIR | opcode::READDIRPLUS => {
                let fh = handles[head[2] as usize % handles.len()];
                let raw = take(&mut data, 12);
                let offset = u64_from(&raw[..raw.len().min(8)]);
                let size = u64_from(raw.get(8..).unwrap_or(&[])) as u32;
                Harness::read_in(fh, offset, size)
            }
            opcode::RELEASE | opcode::RELEASEDIR => {
                Harness::release_in(handles[head[2] as usize % handles.len()])
            }
            _ => {
                let n = head[2] as usize % 48;
                take(&mut data, n).to_vec()
            }
        };
        let reply = h.call(op, node, &body, reply_len);
        assert!(!Harness::leaks(&reply.bytes), "a byte from outside the closure");
        assert!(
            !reply.bytes.windows(OUTSIDE_PATH.len()).any(|w| w == OUTSIDE_PATH.as_bytes()),
            "the name of a path outside the closure"
        );
        if reply.error() == Some(0) && reply.body().len() >= 8 {
            let id = reply.u64_at(0);
            match op {
                opcode::LOOKUP => nodes.push(id),
                opcode::OPEN | opcode::OPENDIR => handles.push(id),
                _ => {}
            }
        }
        let (files, dirs) = h.session.open_handles();
        assert!(files <= LIMITS.max_open_files && dirs <= LIMITS.max_open_dirs);
        let now = h.open_descriptors();
        assert!(
            now <= *fds + LIMITS.max_cached_files + 8,
            "{now} descriptors, {} at the start",
            fds
        );
    }
    // The guest goes away: nothing is left held.
    h.call(opcode::DESTROY, ROOT, &[], 0);
    assert_eq!(h.session.open_handles(), (0, 0));
});
