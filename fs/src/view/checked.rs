//! What the request being served has already checked.
//!
//! A cached directory is used only while the kernel still places it where it was found,
//! which costs a read of its `/proc/self/fd` link. A listing answered with every entry's
//! attributes (READDIRPLUS) looks up each entry in the same directory, and would read the
//! same link once per entry: the directory was proved where it belongs by the first of
//! them, and the rest of the request relies on that proof, as any single request relies
//! on a check made a moment before its use. A transport marks the span of one request
//! with [`View::request`]; within it a directory checked (or opened from a checked one)
//! is not checked again. Outside a request, every use is checked.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use super::dircache::CachedDir;
use super::{NodeId, View};

/// How many directories a request remembers: a listing needs its directory, its parent
/// (`..`) and the ancestors opened on the way; more would only cost the search.
const REMEMBERED: usize = 8;

thread_local! {
    /// How deep this thread is in [`View::request`] spans (requests do not nest, but a
    /// transport's layers may both mark one).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The directories checked in the current request: the view (by address), the node,
    /// and the descriptor checked (the very one, by pointer).
    static CHECKED: RefCell<Vec<(usize, NodeId, Arc<CachedDir>)>> = const { RefCell::new(Vec::new()) };
}

/// Ends a request span, even when the request panics (the transports catch panics and
/// answer EIO, so the thread serves on).
struct Span;

impl Drop for Span {
    fn drop(&mut self) {
        let depth = DEPTH.with(|d| {
            let left = d.get().saturating_sub(1);
            d.set(left);
            left
        });
        if depth == 0 {
            CHECKED.with(|c| c.borrow_mut().clear());
        }
    }
}

impl View {
    /// Runs `f`, one request of a client: cached directories checked during it are not
    /// checked again within it.
    pub fn request<T>(&self, f: impl FnOnce() -> T) -> T {
        DEPTH.with(|d| d.set(d.get() + 1));
        let _span = Span;
        f()
    }

    fn key(&self) -> usize {
        self as *const View as usize
    }

    /// Whether `dir`, node `node`'s cached descriptor, was checked in the current request.
    pub(super) fn checked_in_request(&self, node: NodeId, dir: &Arc<CachedDir>) -> bool {
        if DEPTH.with(Cell::get) == 0 {
            return false;
        }
        let key = self.key();
        CHECKED.with(|c| {
            c.borrow()
                .iter()
                .any(|(v, n, d)| *v == key && *n == node && Arc::ptr_eq(d, dir))
        })
    }

    /// Remembers, for the rest of the current request, that `dir` was checked.
    pub(super) fn mark_checked(&self, node: NodeId, dir: &Arc<CachedDir>) {
        if DEPTH.with(Cell::get) == 0 {
            return;
        }
        let key = self.key();
        CHECKED.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= REMEMBERED {
                c.remove(0);
            }
            c.push((key, node, dir.clone()));
        });
    }
}
