//! An epoll set of its own (a [`mio::Poll`]), waited for on the current
//! tokio event loop: descriptors registered in it cost the process only
//! the kernel's entry, not a tokio registration each, and one task learns
//! which of them are ready.
//!
//! Waiting for the set's descriptor through tokio takes an
//! [`AsyncFd`], whose constructors are `unsafe` (tokio 1.54): the
//! descriptor must stay open and the same for the `AsyncFd`'s life. A
//! `mio::Poll` owns its epoll descriptor, never replaces it and closes it
//! only when dropped, which the `AsyncFd` owning it makes come after the
//! deregistration. The host crate keeps `#![forbid(unsafe_code)]`; this
//! crate is the whole of that exception.

use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

pub use mio::unix::SourceFd;
pub use mio::{Events, Interest, Registry, Token};
use tokio::io::unix::AsyncFd;

/// An epoll set, registered with the current tokio event loop.
#[derive(Debug)]
pub struct EpollSet {
    poll: AsyncFd<mio::Poll>,
}

impl EpollSet {
    /// A new, empty set and the registry that adds descriptors to it. Must
    /// be called within a tokio runtime with I/O enabled.
    pub fn new() -> io::Result<(EpollSet, Registry)> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: the mio::Poll owns its epoll descriptor, which stays open
        // and the same until the Poll is dropped, and the AsyncFd owns the
        // Poll, so the descriptor outlives the registration (see the crate
        // documentation).
        let poll = unsafe {
            AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE)
                .map_err(io::Error::from)?
        };
        Ok((EpollSet { poll }, registry))
    }

    /// Ready with `events` filled (cleared first, at least one event) once
    /// any registered descriptor is ready; until then wakes `cx` when one
    /// becomes ready.
    pub fn poll_events(
        &mut self,
        cx: &mut Context<'_>,
        events: &mut Events,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = match self.poll.poll_read_ready_mut(cx) {
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            };
            events.clear();
            match guard.get_inner_mut().poll(events, Some(Duration::ZERO)) {
                Ok(()) if !events.is_empty() => return Poll::Ready(Ok(())),
                // Nothing more: wait for the set's next readiness.
                Ok(()) => guard.clear_ready(),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// A real socket pair: the set reports the readable end, with its
    /// token, only once bytes are there.
    #[tokio::test]
    async fn reports_a_registered_socket_once_it_is_readable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let (mut set, registry) = EpollSet::new().unwrap();
        registry
            .register(
                &mut SourceFd(&server.as_raw_fd()),
                Token(7),
                Interest::READABLE,
            )
            .unwrap();
        let mut events = Events::with_capacity(8);
        let quiet = tokio::time::timeout(
            Duration::from_millis(100),
            std::future::poll_fn(|cx| set.poll_events(cx, &mut events)),
        )
        .await;
        assert!(quiet.is_err(), "reported ready with nothing sent");
        client.write_all(b"x").unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| set.poll_events(cx, &mut events)),
        )
        .await
        .expect("not reported within 10 s")
        .unwrap();
        let tokens: Vec<Token> = events.iter().map(|event| event.token()).collect();
        assert_eq!(tokens, [Token(7)]);
        registry
            .deregister(&mut SourceFd(&server.as_raw_fd()))
            .unwrap();
    }
}
