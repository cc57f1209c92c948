//! Rate limiting for warnings that a request can trigger.
//!
//! A host store under attack (or a client retrying) can make the same warning fire for
//! every request; logging each would fill the disk and slow the daemon. A [`Limiter`] lets a
//! few through per window and counts the rest, which the next warning let through reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Warnings let through per window.
const BURST: u64 = 10;
/// The window, in seconds.
const WINDOW_SECS: u64 = 10;

/// Lets at most a few events through per window.
#[derive(Debug)]
pub struct Limiter {
    start: Instant,
    /// The window (seconds since `start`, divided by the window length) being counted.
    window: AtomicU64,
    /// Events seen in that window.
    seen: AtomicU64,
    /// Events held back since the last one let through.
    suppressed: AtomicU64,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            start: Instant::now(),
            window: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }
}

impl Limiter {
    /// Counts one event: `Some(n)` when it may be logged, `n` being how many were held back
    /// before it; `None` when it is to be dropped.
    pub fn allow(&self) -> Option<u64> {
        let window = self.start.elapsed().as_secs() / WINDOW_SECS;
        let current = self.window.load(Ordering::Relaxed);
        if window != current
            && self
                .window
                .compare_exchange(current, window, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.seen.store(0, Ordering::Relaxed);
        }
        if self.seen.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Logs a warning through `limiter`: `warn_limited!(limiter, fields..., "message")`.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limiter.allow() {
            if suppressed > 0 {
                tracing::warn!(suppressed, "{suppressed} similar warnings suppressed");
            }
            tracing::warn!($($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_is_counted() {
        let l = Limiter::default();
        for _ in 0..BURST {
            assert_eq!(l.allow(), Some(0));
        }
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        assert_eq!(l.suppressed.load(Ordering::Relaxed), 2);
    }
}
