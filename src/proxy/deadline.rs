//! One timer per client connection, moved from phase to phase (waiting for
//! a request, reading its head, waiting for the backend's answer) instead
//! of a timer created, registered and cancelled for each phase of each
//! request.
//!
//! The connection's deadline is a plain value; the timer under it (a tokio
//! [`Sleep`]) only has to fire no later than it. Setting a later deadline,
//! the usual case (each phase's deadline is "now plus its timeout"), costs
//! no timer operation at all. When the timer fires early it is moved on by
//! at most `step`, the shortest phase timeout, and since every deadline set
//! afterwards lies at least `step` after its own setting, the timer never
//! has to be moved earlier in the usual course of a connection. A deadline
//! earlier than the timer (the short drain grace, or a config reload that
//! shortened a timeout) moves the timer at once. A connection busy
//! for a long time so wakes once per `step` (10 s by default) at most.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use std::time::Instant;

use tokio::time::Sleep;

use crate::config::ClientLimits;

/// A connection's current deadline and the timer that watches it.
#[derive(Debug)]
pub struct Deadline<'a> {
    timer: Pin<&'a mut Sleep>,
    at: Instant,
    /// In milliseconds: a `Duration` would take 12 bytes more of every
    /// connection's task.
    step: u32,
}

impl<'a> Deadline<'a> {
    /// A deadline at the timer's own deadline, moved by at most the
    /// shortest timeout of `limits` when it fires early.
    pub fn new(timer: Pin<&'a mut Sleep>, limits: &ClientLimits) -> Deadline<'a> {
        Deadline {
            at: timer.deadline().into_std(),
            timer,
            step: step(limits),
        }
    }

    /// Follows the timeouts of a new config generation.
    pub fn set_limits(&mut self, limits: &ClientLimits) {
        self.step = step(limits);
    }

    /// The deadline.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Moves the deadline to `at`, earlier or later.
    pub fn set(&mut self, at: Instant) {
        self.at = at;
        let at = tokio::time::Instant::from_std(at);
        if at < self.timer.deadline() {
            self.timer.as_mut().reset(at);
        }
    }

    /// Ready once the deadline has passed.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let fired = self.timer.deadline();
            let at = tokio::time::Instant::from_std(self.at);
            if fired >= at {
                return Poll::Ready(());
            }
            let step = Duration::from_millis(u64::from(self.step));
            self.timer.as_mut().reset(at.min(fired + step));
        }
    }

    /// Waits until the deadline has passed.
    pub async fn expired(&mut self) {
        poll_fn(|cx| self.poll_expired(cx)).await
    }
}

/// The shortest timeout a connection's deadline is set with, in
/// milliseconds (at least one, tokio's timer resolution).
fn step(limits: &ClientLimits) -> u32 {
    let shortest = limits
        .header_timeout
        .min(limits.keepalive_timeout)
        .min(limits.request_timeout);
    u32::try_from(shortest.as_millis())
        .unwrap_or(u32::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn limits(seconds: u64) -> ClientLimits {
        let timeout = Duration::from_secs(seconds);
        ClientLimits {
            header_timeout: timeout,
            keepalive_timeout: timeout,
            request_timeout: timeout,
            ..ClientLimits::default()
        }
    }

    /// tokio's timer on its paused clock (which jumps to the next timer's
    /// deadline): a later deadline leaves the timer where it was (it fires
    /// early, and is moved on without the deadline passing), an earlier one
    /// moves it at once.
    #[tokio::test(start_paused = true)]
    async fn fires_at_the_deadline_it_was_last_moved_to() {
        let start = Instant::now();
        let timer = tokio::time::sleep_until(start + Duration::from_millis(50));
        tokio::pin!(timer);
        // A step of 50 ms: the timer fires at 50 ms, is moved to 100 ms,
        // then to the deadline at 120 ms.
        let mut deadline = Deadline::new(timer, &limits(0));
        deadline.step = 50;
        deadline.set((start + Duration::from_millis(120)).into_std());
        assert_eq!(deadline.timer.deadline(), start + Duration::from_millis(50));
        deadline.expired().await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(120), "{waited:?}");
        assert!(waited < Duration::from_millis(125), "{waited:?}");

        // Earlier than a timer still to fire: moved at once.
        let now = Instant::now();
        let timer = tokio::time::sleep_until(now + Duration::from_secs(60));
        tokio::pin!(timer);
        let mut deadline = Deadline::new(timer, &limits(60));
        deadline.set((now + Duration::from_millis(20)).into_std());
        assert_eq!(deadline.timer.deadline(), now + Duration::from_millis(20));
        deadline.expired().await;
        let waited = now.elapsed();
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        assert!(waited < Duration::from_millis(25), "{waited:?}");
    }

    #[test]
    fn the_step_is_the_shortest_timeout() {
        let limits = ClientLimits {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(75),
            request_timeout: Duration::from_secs(3),
            ..ClientLimits::default()
        };
        assert_eq!(step(&limits), 3_000);
        assert_eq!(step(&self::limits(0)), 1);
    }
}
