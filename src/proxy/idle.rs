//! A worker's client connections that can wait idle, so that a drain (a
//! shutdown or an upgrade) can wake them, and whether the worker is
//! draining; and which of them have waited long enough to be parked (see
//! [`super::parked`]).
//!
//! Each worker is one thread with its own event loop, and a connection's
//! task never leaves it, so this is thread-local state: an idle wait reads a
//! flag and leaves its waker in its connection's slot (no lock, no waiter
//! list to join and leave as a channel subscription would cost on every
//! wait), and the worker wakes every slot once when the drain begins.

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Registry {
    /// Set when the worker starts to drain: the longest an idle connection
    /// may still wait (the shutdown timeout).
    draining: Option<Duration>,
    slots: Vec<Waiting>,
    free: Vec<usize>,
}

/// One connection's place: how to wake it, and whether and since when it
/// waits idle in a way that may end in parking.
#[derive(Default)]
struct Waiting {
    waker: Option<Waker>,
    since: Option<Instant>,
    park: bool,
}

/// Why an idle wait is to end.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// The worker drains; the drain's timeout.
    Drain(Duration),
    /// The connection has waited long enough to be parked.
    Park,
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
            .slots
            .iter_mut()
            .filter_map(|slot| slot.waker.take())
            .collect()
    });
    // Woken outside the borrow: a waker may run code that looks at the
    // registry.
    for waker in wakers {
        waker.wake();
    }
}

/// Marks each connection that has waited idle (and parkable) since
/// `before` or earlier to be parked, and wakes it; returns how many.
pub fn mark_long_idle(before: Instant) -> usize {
    let wakers: Vec<Waker> = REGISTRY.with(|registry| {
        let mut registry = registry.borrow_mut();
        registry
            .slots
            .iter_mut()
            .filter(|slot| !slot.park && slot.since.is_some_and(|since| since <= before))
            .filter_map(|slot| {
                slot.park = true;
                slot.waker.clone()
            })
            .collect()
    });
    for waker in &wakers {
        waker.wake_by_ref();
    }
    wakers.len()
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
                    registry.slots.push(Waiting::default());
                    Slot(registry.slots.len() - 1)
                }
            }
        })
    }

    /// Ready with the drain's timeout once the worker drains; until then
    /// the drain's start wakes `cx`.
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<Duration> {
        self.poll_idle(cx).map(|wake| match wake {
            Wake::Drain(timeout) => timeout,
            // Not parkable: never marked.
            Wake::Park => Duration::ZERO,
        })
    }

    /// The connection's next idle wait, which began at `since`, may end in
    /// parking.
    pub fn parkable_since(&self, since: Instant) {
        REGISTRY.with(|registry| registry.borrow_mut().slots[self.0].since = Some(since))
    }

    /// Ready once the worker drains or, for a wait that may end in
    /// parking, once [`mark_long_idle`] marked it; until then either wakes
    /// `cx`. [`Slot::busy`] ends the wait.
    pub fn poll_idle(&self, cx: &mut Context<'_>) -> Poll<Wake> {
        REGISTRY.with(|registry| {
            let mut registry = registry.borrow_mut();
            if let Some(timeout) = registry.draining {
                return Poll::Ready(Wake::Drain(timeout));
            }
            let slot = &mut registry.slots[self.0];
            if slot.park {
                return Poll::Ready(Wake::Park);
            }
            match &slot.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => slot.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }

    /// The connection's idle wait is over: it is not to be parked.
    pub fn busy(&self) {
        REGISTRY.with(|registry| {
            let slot = &mut registry.borrow_mut().slots[self.0];
            slot.since = None;
            slot.park = false;
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // At thread exit the registry may be gone first: nothing to give
        // back then.
        let _ = REGISTRY.try_with(|registry| {
            let mut registry = registry.borrow_mut();
            registry.slots[self.0] = Waiting::default();
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

    #[test]
    fn a_long_idle_parkable_wait_is_marked_and_woken_once_others_are_not() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let start = Instant::now();
        let long = Slot::new();
        let recent = Slot::new();
        let plain = Slot::new();
        let ended = Slot::new();
        long.parkable_since(start);
        recent.parkable_since(start + Duration::from_secs(5));
        ended.parkable_since(start);
        for slot in [&long, &recent, &plain, &ended] {
            assert!(slot.poll_idle(&mut cx).is_pending());
        }
        // Bytes came: its wait is over.
        ended.busy();

        assert_eq!(mark_long_idle(start + Duration::from_secs(1)), 1);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(long.poll_idle(&mut cx), Poll::Ready(super::Wake::Park));
        assert!(recent.poll_idle(&mut cx).is_pending());
        assert!(plain.poll_idle(&mut cx).is_pending());
        assert!(ended.poll_idle(&mut cx).is_pending());
        // Marked once only.
        assert_eq!(mark_long_idle(start + Duration::from_secs(1)), 0);
        // A wait after `busy` starts unmarked.
        long.busy();
        assert!(long.poll_idle(&mut cx).is_pending());
        // A drain wins over parking.
        assert_eq!(mark_long_idle(start + Duration::from_secs(10)), 1);
        begin_drain(Duration::from_secs(1));
        assert_eq!(
            recent.poll_idle(&mut cx),
            Poll::Ready(super::Wake::Drain(Duration::from_secs(1)))
        );
    }
}
