//! A worker's client connections that can wait idle, so that a drain (a
//! shutdown or an upgrade) can wake them, and whether the worker is
//! draining.
//!
//! Each worker is one thread with its own event loop, and a connection's
//! task never leaves it, so this is thread-local state: an idle wait reads a
//! flag and leaves its waker in its connection's slot (no lock, no waiter
//! list to join and leave as a channel subscription would cost on every
//! wait), and the worker wakes every slot once when the drain begins.

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

#[derive(Default)]
struct Registry {
    /// Set when the worker starts to drain: the longest an idle connection
    /// may still wait (the shutdown timeout).
    draining: Option<Duration>,
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::new(Registry::default());
}

/// Whether this worker is draining, and if so for how long at most.
pub fn draining() -> Option<Duration> {
    REGISTRY.with(|registry| registry.borrow().draining)
}

/// Starts this worker's drain: every connection waiting idle is woken, and
/// sees [`draining`] from now on.
pub fn begin_drain(timeout: Duration) {
    let wakers: Vec<Waker> = REGISTRY.with(|registry| {
        let mut registry = registry.borrow_mut();
        registry.draining = Some(timeout);
        registry
            .wakers
            .iter_mut()
            .filter_map(Option::take)
            .collect()
    });
    // Woken outside the borrow: a waker may run code that looks at the
    // registry.
    for waker in wakers {
        waker.wake();
    }
}

/// A connection's place in its worker's registry; given back when dropped.
#[derive(Debug)]
pub struct Slot(usize);

impl Slot {
    /// A place in the current thread's registry.
    pub fn new() -> Slot {
        REGISTRY.with(|registry| {
            let mut registry = registry.borrow_mut();
            match registry.free.pop() {
                Some(index) => Slot(index),
                None => {
                    registry.wakers.push(None);
                    Slot(registry.wakers.len() - 1)
                }
            }
        })
    }

    /// Ready with the drain's timeout once the worker drains; until then
    /// the drain's start wakes `cx`.
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<Duration> {
        REGISTRY.with(|registry| {
            let mut registry = registry.borrow_mut();
            if let Some(timeout) = registry.draining {
                return Poll::Ready(timeout);
            }
            let slot = &mut registry.wakers[self.0];
            match slot {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // At thread exit the registry may be gone first: nothing to give
        // back then.
        let _ = REGISTRY.try_with(|registry| {
            let mut registry = registry.borrow_mut();
            registry.wakers[self.0] = None;
            registry.free.push(self.0);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Each test runs on its own thread, so its registry is its own.
    #[test]
    fn a_drain_wakes_each_waiting_connection_once_and_is_seen_after() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let first = Slot::new();
        let second = Slot::new();
        let gone = Slot::new();
        assert!(first.poll_drain(&mut cx).is_pending());
        // Polled again with the same waker: still one waker kept.
        assert!(first.poll_drain(&mut cx).is_pending());
        assert!(second.poll_drain(&mut cx).is_pending());
        assert!(gone.poll_drain(&mut cx).is_pending());
        drop(gone);
        // Its place is reused.
        let again = Slot::new();
        assert_eq!(again.0, 2);
        assert_eq!(draining(), None);

        begin_drain(Duration::from_secs(3));
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert_eq!(draining(), Some(Duration::from_secs(3)));
        assert_eq!(
            first.poll_drain(&mut cx),
            Poll::Ready(Duration::from_secs(3))
        );
        assert_eq!(
            again.poll_drain(&mut cx),
            Poll::Ready(Duration::from_secs(3))
        );
    }
}
