//! Rate limiting for log lines that could otherwise repeat once per request
//! (strategy faults, "no healthy backend"): at most one line per interval,
//! with a count of the ones left out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one log line through per interval and counts the rest.
#[derive(Debug)]
pub struct LogThrottle {
    origin: Instant,
    interval: Duration,
    /// Nanoseconds since `origin` before which lines are suppressed.
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// A throttle letting one line through per `interval`.
    pub fn new(interval: Duration) -> LogThrottle {
        LogThrottle {
            origin: Instant::now(),
            interval,
            next: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be written now, `n` being how many were
    /// suppressed since the last one; `None` if this one is suppressed.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(self.origin.elapsed())
    }

    /// [`LogThrottle::allow`] at `elapsed` since the throttle was made.
    fn allow_at(&self, elapsed: Duration) -> Option<u64> {
        let now = elapsed.as_nanos() as u64;
        let next = self.next.load(Ordering::Relaxed);
        let until = now + self.interval.as_nanos() as u64;
        if now >= next
            && self
                .next
                .compare_exchange(next, until, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_a_count_of_the_rest() {
        let throttle = LogThrottle::new(Duration::from_millis(50));
        let ms = Duration::from_millis;
        assert_eq!(throttle.allow_at(ms(0)), Some(0));
        assert_eq!(throttle.allow_at(ms(1)), None);
        assert_eq!(throttle.allow_at(ms(49)), None);
        assert_eq!(throttle.allow_at(ms(50)), Some(2));
        assert_eq!(throttle.allow_at(ms(60)), None);
        assert_eq!(throttle.allow_at(ms(500)), Some(1));
        // The real clock drives `allow`: a fresh throttle lets one through.
        assert_eq!(LogThrottle::new(Duration::from_secs(3600)).allow(), Some(0));
    }
}
