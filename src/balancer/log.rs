//! The `logging` interface a 0.2.0 module imports: its lines go to the
//! balancer's log (target `strategy`, field `module`), at most
//! [`MODULE_LOG_LINES_PER_SECOND`] a second per module; the rest are dropped
//! and counted.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most lines one module may log in any one second.
pub const MODULE_LOG_LINES_PER_SECOND: usize = 10;

/// Longest message kept, in bytes; longer ones are cut at a character
/// boundary and marked with `…`.
const MAX_MESSAGE_BYTES: usize = 1024;

/// The WIT enum `logging.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Detail for the module's author.
    Debug,
    /// Normal operation.
    Info,
    /// Something the operator should look at.
    Warn,
    /// Something failed.
    Error,
}

impl LogLevel {
    /// `debug`, `info`, `warn` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Where a module's log lines go once they passed the rate limit.
pub trait LogSink: Send + Sync {
    /// One line of `module` at `level`.
    fn line(&self, module: &str, level: LogLevel, message: &str);

    /// A line of `module` was dropped by the rate limit.
    fn dropped(&self, _module: &str) {}
}

/// The balancer's log: `tracing` events with target `strategy` and a
/// `module` field.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingLog;

impl LogSink for TracingLog {
    fn line(&self, module: &str, level: LogLevel, message: &str) {
        match level {
            LogLevel::Debug => tracing::debug!(target: "strategy", module, "{message}"),
            LogLevel::Info => tracing::info!(target: "strategy", module, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "strategy", module, "{message}"),
            LogLevel::Error => tracing::error!(target: "strategy", module, "{message}"),
        }
    }
}

/// One module's log: the rate limit, in front of a sink.
pub(super) struct ModuleLog {
    module: String,
    sink: std::sync::Arc<dyn LogSink>,
    /// When the last [`MODULE_LOG_LINES_PER_SECOND`] lines were let through,
    /// oldest first: a line may pass when the oldest is a second old. So no
    /// one-second span ever holds more, wherever a burst falls.
    recent: Mutex<std::collections::VecDeque<Instant>>,
}

impl ModuleLog {
    pub(super) fn new(module: String, sink: std::sync::Arc<dyn LogSink>) -> ModuleLog {
        ModuleLog {
            module,
            sink,
            recent: Mutex::new(std::collections::VecDeque::with_capacity(
                MODULE_LOG_LINES_PER_SECOND,
            )),
        }
    }

    /// Logs `message` unless the module has used its lines for this second.
    pub(super) fn log(&self, level: LogLevel, message: &str) {
        self.log_at(Instant::now(), level, message);
    }

    fn log_at(&self, now: Instant, level: LogLevel, message: &str) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() >= MODULE_LOG_LINES_PER_SECOND {
                let oldest = recent[0];
                if now.saturating_duration_since(oldest) < Duration::from_secs(1) {
                    drop(recent);
                    self.sink.dropped(&self.module);
                    return;
                }
                recent.pop_front();
            }
            recent.push_back(now);
        }
        self.sink.line(&self.module, level, &clean(message));
    }
}

/// The message as one log line: control characters (a newline could forge
/// a line of the balancer's own) become spaces, and it is cut to
/// [`MAX_MESSAGE_BYTES`].
fn clean(message: &str) -> std::borrow::Cow<'_, str> {
    let needs_cut = message.len() > MAX_MESSAGE_BYTES;
    if !needs_cut && !message.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(message);
    }
    let mut end = message.len().min(MAX_MESSAGE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut out: String = message[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if needs_cut {
        out.push('…');
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Default)]
    struct Capture {
        lines: Mutex<Vec<String>>,
        dropped: Mutex<u32>,
    }

    impl LogSink for Capture {
        fn line(&self, _module: &str, _level: LogLevel, message: &str) {
            self.lines.lock().unwrap().push(message.to_string());
        }
        fn dropped(&self, _module: &str) {
            *self.dropped.lock().unwrap() += 1;
        }
    }

    #[test]
    fn at_most_ten_lines_in_any_second() {
        let sink = Arc::new(Capture::default());
        let log = ModuleLog::new("m".into(), sink.clone());
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // A burst of 25 at 0 ms: 10 pass.
        for i in 0..25 {
            log.log_at(ms(0), LogLevel::Info, &format!("a{i}"));
        }
        assert_eq!(sink.lines.lock().unwrap().len(), 10);
        assert_eq!(*sink.dropped.lock().unwrap(), 15);
        // 999 ms later the second is not over: still dropped.
        log.log_at(ms(999), LogLevel::Info, "b");
        assert_eq!(sink.lines.lock().unwrap().len(), 10);
        // At 1000 ms the whole burst has aged out: 10 more, no more.
        for i in 0..12 {
            log.log_at(ms(1000), LogLevel::Info, &format!("c{i}"));
        }
        assert_eq!(sink.lines.lock().unwrap().len(), 20);
        assert_eq!(*sink.dropped.lock().unwrap(), 18);
        assert_eq!(sink.lines.lock().unwrap()[10], "c0");
    }

    #[test]
    fn control_characters_and_long_messages_are_cleaned() {
        assert_eq!(clean("plain"), "plain");
        assert_eq!(clean("two\nlines\r"), "two lines ");
        let long = "é".repeat(600); // 1200 bytes
        let cut = clean(&long);
        assert!(cut.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }
}
