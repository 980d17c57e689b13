//! Kept-alive client connections that have waited idle for a while,
//! parked: the socket is watched by the worker's own epoll set and the
//! connection's task ends, until the client sends its next request (or
//! closes), the keep-alive deadline passes, or the worker drains.
//!
//! A waiting connection's task holds its future in a 512-byte tokio task
//! cell and its socket in a 256-byte tokio registration, both aligned to
//! 128 bytes, so with the allocator's padding about 1.4 KiB. A parked one
//! holds its socket, the client's address, its guards and its deadline
//! in the set's array (56 bytes) and its deadline in the set's heap (24
//! more). Parking and waking cost four `epoll_ctl` calls and a
//! task spawn, once per idle spell of at least [`PARK_AFTER`]; a connection
//! busier than that is never parked. Only plain connections are parked
//! (a TLS session's state would stay anyway).
//!
//! Every worker is one thread with its own event loop, so the set is
//! thread-local; one watcher task per worker, started when its first
//! connection is parked, waits for the set's epoll descriptor (registered
//! with the worker's event loop) and the earliest deadline.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use epoll_set::{EpollSet, Events, Interest, Registry, SourceFd, Token};
use prometheus_client::metrics::gauge::Gauge;

use super::downstream::{self, Client};
use super::idle;
use super::{Held, Shared};
use crate::transport::Stream;

/// How long a kept-alive connection waits idle before it may be parked;
/// it is parked at the worker's next sweep (once a second), so after one
/// to two seconds.
pub(super) const PARK_AFTER: Duration = Duration::from_secs(1);

/// Readiness events taken from the set's epoll descriptor per call.
const EVENTS: usize = 256;

/// Connections parked on a worker since the last trim after which the
/// worker's sweep has the allocator give free memory back (about 1.4 MiB
/// of tasks freed).
const TRIM_AFTER: usize = 1024;

/// A parked connection. The client's address is kept as a number, its
/// text made again when the connection is resumed: in the set's own
/// array, a parked connection then holds no allocation of its own, so
/// what its task held is wholly free for the allocator to reuse or give
/// back.
struct Entry {
    stream: std::net::TcpStream,
    ip: IpAddr,
    held: Held,
    deadline: Instant,
}

/// A worker's parked connections.
struct Parked {
    registry: Registry,
    shared: Arc<Shared>,
    gauge: Gauge,
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    /// Each parked connection's deadline and place (an entry may have left
    /// since, and its place been taken again: [`Parked::expire`] checks).
    deadlines: BinaryHeap<Reverse<(Instant, usize)>>,
    /// The watcher's waker and the deadline its timer is set to.
    watcher: Option<(Waker, Option<Instant>)>,
}

thread_local! {
    static PARKED: RefCell<Option<Parked>> = const { RefCell::new(None) };
    /// Connections parked on this worker since its last trim.
    static UNTRIMMED: Cell<usize> = const { Cell::new(0) };
}

/// Has the allocator give its free memory back to the system if this
/// worker parked many connections since the last time. The tasks of
/// parked connections are freed among memory still in use, which glibc
/// keeps resident until it is trimmed (see the `malloc-trim` crate):
/// measured with 10,000 connections parked, 1.0 KiB per connection stays
/// resident without the trim and 0.4 KiB with it. At most once per sweep
/// (a second) and only after a thousand parked connections; the trim
/// (0.1-5 ms, measured here) runs on tokio's blocking thread, not on the
/// worker's event loop, and one at a time in the process, since it covers
/// every thread's memory.
pub(super) fn trim_if_many_parked() {
    static TRIMMING: AtomicBool = AtomicBool::new(false);
    if UNTRIMMED.get() < TRIM_AFTER || TRIMMING.swap(true, Ordering::AcqRel) {
        return;
    }
    UNTRIMMED.set(0);
    tokio::task::spawn_blocking(|| {
        let started = Instant::now();
        let trimmed = malloc_trim::trim();
        TRIMMING.store(false, Ordering::Release);
        tracing::debug!(trimmed, took = ?started.elapsed(), "after parking idle connections, gave free memory back");
    });
}

/// Parks `tcp`, a kept-alive connection waiting idle on this worker, until
/// its next request, its close, `deadline` or the worker's drain. A
/// connection that cannot be parked (the system refuses a descriptor) is
/// closed, as its keep-alive deadline would have.
pub(super) fn park(
    tcp: tokio::net::TcpStream,
    client: Client,
    shared: Arc<Shared>,
    held: Held,
    deadline: Instant,
) {
    let stream = match tcp.into_std() {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(
                client = client.text(),
                "cannot park an idle connection: {error}"
            );
            return;
        }
    };
    PARKED.with(|parked| {
        let mut parked = parked.borrow_mut();
        if parked.is_none() {
            match Parked::start(&shared) {
                Ok(set) => *parked = Some(set),
                Err(error) => {
                    tracing::warn!("cannot park idle connections: {error}");
                    return;
                }
            }
        }
        let Some(parked) = parked.as_mut() else {
            return;
        };
        let key = parked.free.pop().unwrap_or_else(|| {
            parked.entries.push(None);
            parked.entries.len() - 1
        });
        let fd = stream.as_raw_fd();
        if let Err(error) =
            parked
                .registry
                .register(&mut SourceFd(&fd), Token(key), Interest::READABLE)
        {
            tracing::debug!(
                client = client.text(),
                "cannot park an idle connection: {error}"
            );
            parked.free.push(key);
            return;
        }
        parked.entries[key] = Some(Entry {
            stream,
            ip: client.ip(),
            held,
            deadline,
        });
        parked.deadlines.push(Reverse((deadline, key)));
        // Connections that left before their deadline leave theirs behind
        // until it comes; a set that parks and wakes its connections often
        // sheds them here.
        let live = parked.entries.len() - parked.free.len();
        if parked.deadlines.len() > 2 * live + 1024 {
            let entries = &parked.entries;
            parked.deadlines.retain(|&Reverse((deadline, key))| {
                entries[key]
                    .as_ref()
                    .is_some_and(|entry| entry.deadline == deadline)
            });
        }
        parked.gauge.inc();
        UNTRIMMED.set(UNTRIMMED.get() + 1);
        // The watcher's timer is moved only for a deadline earlier than
        // its own (a reload that shortened the keep-alive timeout).
        if let Some((waker, armed)) = &parked.watcher {
            if armed.is_none_or(|armed| deadline < armed) {
                waker.wake_by_ref();
            }
        }
    });
}

impl Parked {
    /// An empty set, and its watcher task on this worker's event loop.
    fn start(shared: &Arc<Shared>) -> io::Result<Parked> {
        let (set, registry) = EpollSet::new()?;
        tokio::spawn(watch(set));
        Ok(Parked {
            registry,
            shared: Arc::clone(shared),
            gauge: shared.metrics().parked_connections(),
            entries: Vec::new(),
            free: Vec::new(),
            deadlines: BinaryHeap::new(),
            watcher: None,
        })
    }

    /// Takes the entry at `key` out of the set.
    fn take(&mut self, key: usize) -> Option<Entry> {
        let entry = self.entries.get_mut(key)?.take()?;
        self.free.push(key);
        let _ = self
            .registry
            .deregister(&mut SourceFd(&entry.stream.as_raw_fd()));
        self.gauge.dec();
        Some(entry)
    }

    /// Closes the connections whose deadline is `now` or earlier; returns
    /// the earliest deadline left.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&Reverse((deadline, key))) = self.deadlines.peek() {
            let current = self.entries[key].as_ref().map(|entry| entry.deadline);
            if current != Some(deadline) {
                // Left before its deadline.
                self.deadlines.pop();
                continue;
            }
            if deadline > now {
                return Some(deadline);
            }
            self.deadlines.pop();
            // Dropped: the socket closes, and its guards count it gone.
            drop(self.take(key));
        }
        None
    }
}

/// Serves a parked connection again, from its idle wait, in a task of its
/// own.
fn resume(entry: Entry, shared: &Arc<Shared>) {
    let Entry {
        stream,
        ip,
        held,
        deadline,
    } = entry;
    let client = Client::new(ip, false);
    match tokio::net::TcpStream::from_std(stream) {
        Ok(tcp) => {
            tokio::spawn(downstream::resume(
                Stream::Plain(tcp),
                client,
                Arc::clone(shared),
                held,
                deadline,
            ));
        }
        Err(error) => {
            tracing::debug!(
                client = client.text(),
                "cannot resume a parked connection: {error}"
            )
        }
    }
}

/// Takes the entry at `key` and the worker's shared state out of the set.
fn take(key: usize) -> Option<(Entry, Arc<Shared>)> {
    PARKED.with(|parked| {
        let mut parked = parked.borrow_mut();
        let parked = parked.as_mut()?;
        Some((parked.take(key)?, Arc::clone(&parked.shared)))
    })
}

/// The worker's watcher: resumes each parked connection whose socket
/// becomes readable (bytes, or the client's close), closes those whose
/// deadline passes, and on the worker's drain resumes them all (they then
/// have a drain's grace, as any idle connection) and ends.
async fn watch(mut set: EpollSet) {
    let slot = idle::Slot::new();
    let mut events = Events::with_capacity(EVENTS);
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    poll_fn(|cx| loop {
        if slot.poll_drain(cx).is_ready() {
            resume_all();
            return Poll::Ready(());
        }
        while let Poll::Ready(ready) = set.poll_events(cx, &mut events) {
            if let Err(error) = ready {
                tracing::error!("parked connections: cannot wait for readiness: {error}");
                resume_all();
                return Poll::Ready(());
            }
            for event in events.iter() {
                if let Some((entry, shared)) = take(event.token().0) {
                    resume(entry, &shared);
                }
            }
        }
        let next = PARKED.with(|parked| {
            let mut parked = parked.borrow_mut();
            let parked = parked.as_mut()?;
            let next = parked.expire(Instant::now());
            parked.watcher = Some((cx.waker().clone(), next));
            next
        });
        let Some(next) = next else {
            return Poll::Pending;
        };
        let next = tokio::time::Instant::from_std(next);
        if timer.deadline() != next || timer.is_elapsed() {
            timer.as_mut().reset(next);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
    })
    .await
}

/// Resumes every parked connection of this worker and empties the set.
fn resume_all() {
    let Some(mut parked) = PARKED.with(|parked| parked.borrow_mut().take()) else {
        return;
    };
    let shared = Arc::clone(&parked.shared);
    for key in 0..parked.entries.len() {
        if let Some(entry) = parked.take(key) {
            resume(entry, &shared);
        }
    }
}
