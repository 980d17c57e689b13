//! Takes ownership of a descriptor this process inherited from the process
//! that started it: the listening sockets (and a readiness pipe) a running
//! balancer hands to the binary it re-executes on `SIGUSR2`, or the sockets
//! systemd passes by socket activation (`LISTEN_FDS`).
//!
//! Turning a raw descriptor number into an owned one is the one thing safe
//! Rust cannot do, since nothing proves the number is open and owned by no
//! one else. It is sound here because of two facts: by the convention that
//! names these descriptors (`sd_listen_fds(3)`), a descriptor the
//! environment names belongs to this process and nothing else in it uses it;
//! and [`take`] hands each number out at most once per process, after
//! checking that it is open. The host crate keeps `#![forbid(unsafe_code)]`;
//! this crate is the whole of the exception.

use std::collections::HashSet;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// The numbers [`take`] has handed out.
static TAKEN: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

/// Takes ownership of the inherited descriptor `fd`, and marks it
/// close-on-exec so that it goes to no further child unless handed on on
/// purpose. Fails for the standard streams (0-2), a number already taken,
/// and a descriptor that is not open.
///
/// Call it only for a number the environment names as inherited for this
/// process (`LISTEN_FDS` with a `LISTEN_PID` equal to its own, or a
/// variable its parent set for it): that is what makes the descriptor this
/// process's to own.
pub fn take(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is a standard stream, not an inherited one"),
        ));
    }
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    if taken.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("descriptor {fd} was already taken"),
        ));
    }
    // Whether the number is open, asked without touching it (a borrowed
    // descriptor would already have to be open): Linux lists each open
    // descriptor of the process in /proc/self/fd.
    std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!("descriptor {fd} is not open (/proc/self/fd/{fd}: {error})"),
        )
    })?;
    // SAFETY: `fd` is open (checked just above, under the lock), is named
    // as inherited for this process by its environment, which by the
    // LISTEN_FDS convention means nothing else in the process owns it, and
    // `TAKEN` guarantees no second `OwnedFd` is ever made of it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    taken.insert(fd);
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(io::Error::from)?;
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    #[test]
    fn standard_streams_and_closed_numbers_are_refused() {
        assert_eq!(take(0).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(take(2).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // Far above anything a test process opens.
        assert!(take(1_000_000).is_err());
    }

    #[test]
    fn an_open_descriptor_is_taken_once_and_made_close_on_exec() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        // Inherited descriptors arrive without close-on-exec.
        rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty()).unwrap();
        let fd = listener.into_raw_fd();
        let owned = take(fd).unwrap();
        assert_eq!(owned.as_raw_fd(), fd);
        assert_eq!(
            rustix::io::fcntl_getfd(&owned).unwrap(),
            rustix::io::FdFlags::CLOEXEC
        );
        assert_eq!(take(fd).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        let listener = std::net::TcpListener::from(owned);
        assert_eq!(listener.local_addr().unwrap(), address);
    }
}
