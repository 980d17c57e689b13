//! Listener hand-over, for a binary upgrade without downtime and for
//! systemd socket activation.
//!
//! On `SIGUSR2` a running balancer starts the binary it was started from
//! (its path read at start-up, so a binary replaced on disk is the one that
//! runs; the same arguments) and hands it its listening sockets by
//! inheritance: the descriptors are left open across `exec`, and the
//! variable [`FDS_VAR`] says which is which (`plain:7,plain:8,tls:9,admin:10`).
//! They are the *same* sockets, not new ones bound beside them, so each
//! keeps its one accept queue: a connection waiting in it when the old
//! process stops accepting is accepted by the new one, never lost. The new
//! process builds its first config generation, starts serving on the
//! inherited sockets, then writes `ready` to a pipe named by [`READY_VAR`];
//! only then does the old one stop accepting and drain as on `SIGTERM`. If
//! the new process exits first, or is not ready within the deadline (it is
//! then killed), the old one keeps serving and logs why.
//!
//! The same code reads systemd's convention (`sd_listen_fds(3)`):
//! `LISTEN_FDS` descriptors from 3 up, named by `LISTEN_FDNAMES`, when
//! `LISTEN_PID` is this process's. A socket named `plain`, `tls` or `admin`
//! serves that listener if its address matches the config's (a config port
//! of 0 takes the inherited socket's port); one with another name serves
//! whichever listener has its address. A listener with no matching socket is
//! bound as usual. [`notify_systemd`] speaks `sd_notify(3)`, so that a
//! `Type=notify` unit follows the main PID across an upgrade.

use std::ffi::OsString;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use rustix::io::{fcntl_setfd, FdFlags};
use tokio::io::AsyncReadExt;

/// Names the listening sockets a balancer hands to the binary it
/// re-executes: `ROLE:FD` pairs, comma-separated, the role `plain`, `tls` or
/// `admin` (one entry per socket: a listener has one socket per worker).
pub const FDS_VAR: &str = "RUST_LOAD_BALANCER_FDS";

/// The descriptor of the pipe on which the new process of an upgrade says
/// it is serving (it writes `ready` and closes it).
pub const READY_VAR: &str = "RUST_LOAD_BALANCER_READY";

/// How long the old process waits for the new one to be serving: building
/// the first generation compiles the strategy module, seconds for a large
/// one.
pub const UPGRADE_DEADLINE: Duration = Duration::from_secs(60);

/// What a listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `listen_address`.
    Plain,
    /// `tls_listen_address`.
    Tls,
    /// `admin_address`.
    Admin,
}

impl Role {
    /// Its name in [`FDS_VAR`] and `LISTEN_FDNAMES`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Plain => "plain",
            Role::Tls => "tls",
            Role::Admin => "admin",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        match name {
            "plain" => Some(Role::Plain),
            "tls" => Some(Role::Tls),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// One inherited listening socket.
#[derive(Debug)]
struct Socket {
    /// The role its name gives, if it is one of ours.
    role: Option<Role>,
    name: String,
    address: SocketAddr,
    listener: TcpListener,
}

/// The listening sockets (and the readiness pipe) this process inherited
/// from the one that started it: a balancer upgrading itself, or systemd.
/// Empty when it inherited none, which is the usual start.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<Socket>,
    ready: Option<std::fs::File>,
}

impl Inherited {
    /// Takes what the environment names ([`FDS_VAR`] and [`READY_VAR`], or
    /// systemd's `LISTEN_FDS` when `LISTEN_PID` is this process). Call it
    /// once, early. A descriptor that is not open or not a listening TCP
    /// socket is skipped with a warning.
    pub fn from_env() -> Inherited {
        let mut inherited = Inherited::default();
        let mut named: Vec<(String, RawFd)> = Vec::new();
        if let Some(list) = std::env::var_os(FDS_VAR) {
            for entry in list.to_string_lossy().split(',').filter(|e| !e.is_empty()) {
                match entry
                    .split_once(':')
                    .and_then(|(name, fd)| Some((name.to_string(), fd.parse().ok()?)))
                {
                    Some(pair) => named.push(pair),
                    None => tracing::warn!("{FDS_VAR}: {entry:?} is not NAME:FD; ignored"),
                }
            }
        }
        named.extend(systemd_fds());
        for (name, fd) in named {
            match listening_socket(fd) {
                Ok((listener, address)) => inherited.sockets.push(Socket {
                    role: Role::parse(&name),
                    name,
                    address,
                    listener,
                }),
                Err(error) => {
                    tracing::warn!("inherited descriptor {fd} ({name}) not used: {error}")
                }
            }
        }
        if let Some(fd) = std::env::var_os(READY_VAR) {
            match fd.to_string_lossy().parse() {
                Ok(fd) => match listen_fds::take(fd) {
                    Ok(fd) => inherited.ready = Some(std::fs::File::from(fd)),
                    Err(error) => tracing::warn!("{READY_VAR}: {error}"),
                },
                Err(_) => tracing::warn!("{READY_VAR}: {fd:?} is not a descriptor number"),
            }
        }
        inherited
    }

    /// Whether this process was started by a balancer upgrading itself.
    pub fn is_upgrade(&self) -> bool {
        self.ready.is_some()
    }

    /// Takes the inherited sockets that serve `role` on `address`, in the
    /// order they came: those named for `role` on that IP and port (a port
    /// of 0 matches any), and those with another name on exactly that
    /// address.
    pub fn take(&mut self, role: Role, address: SocketAddr) -> Vec<TcpListener> {
        // A socket named for another role never matches; one without a
        // role of ours only by its exact address (port 0 could be any).
        let matches = |socket: &Socket| match socket.role {
            Some(r) => {
                r == role
                    && socket.address.ip() == address.ip()
                    && (address.port() == 0 || socket.address.port() == address.port())
            }
            None => socket.address == address,
        };
        let (taken, kept) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition::<Vec<_>, _>(matches);
        self.sockets = kept;
        taken.into_iter().map(|socket| socket.listener).collect()
    }

    /// Closes the inherited sockets nothing took (a listener whose address
    /// the config changed), and says which they were.
    pub fn close_unused(&mut self) -> Vec<String> {
        std::mem::take(&mut self.sockets)
            .into_iter()
            .map(|socket| format!("{} ({})", socket.address, socket.name))
            .collect()
    }

    /// Tells the process that started this one that it is serving (an
    /// upgrade's readiness pipe; nothing otherwise).
    pub fn signal_ready(&mut self) {
        if let Some(mut pipe) = self.ready.take() {
            if let Err(error) = io::Write::write_all(&mut pipe, b"ready\n") {
                tracing::warn!("cannot tell the old process this one is serving: {error}");
            }
        }
    }
}

/// The descriptors systemd passed, with their names, if they are for this
/// process.
fn systemd_fds() -> Vec<(String, RawFd)> {
    let pid = std::env::var("LISTEN_PID").ok();
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Vec::new();
    }
    let count: RawFd = match std::env::var("LISTEN_FDS").ok().map(|n| n.parse()) {
        Some(Ok(n)) => n,
        _ => return Vec::new(),
    };
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    (0..count.clamp(0, 1024))
        .map(|i| {
            let name = names.next().unwrap_or("unknown").to_string();
            (name, 3 + i)
        })
        .collect()
}

/// Owns the inherited `fd` as a non-blocking listening TCP socket.
fn listening_socket(fd: RawFd) -> io::Result<(TcpListener, SocketAddr)> {
    let owned: OwnedFd = listen_fds::take(fd)?;
    if !rustix::net::sockopt::socket_acceptconn(&owned)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening socket",
        ));
    }
    if rustix::net::sockopt::socket_type(&owned)? != rustix::net::SocketType::STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a stream socket",
        ));
    }
    let listener = TcpListener::from(owned);
    // A Unix socket has no IP address: this fails for it.
    let address = listener.local_addr()?;
    // Event loops need it; systemd passes blocking sockets.
    listener.set_nonblocking(true)?;
    Ok((listener, address))
}

/// Why an upgrade did not happen; the old process keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The binary's path could not be read at start-up.
    #[error("the path of this binary is unknown: {0}")]
    NoBinary(String),
    /// The descriptors or the pipe could not be prepared.
    #[error("cannot prepare the hand-over: {0}")]
    Prepare(io::Error),
    /// The binary did not start.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The binary.
        path: String,
        /// What the OS said.
        source: io::Error,
    },
    /// The new process exited before it was serving (its own log says why).
    #[error("the new process (pid {pid}) exited before it was serving ({status})")]
    Exited {
        /// Its PID.
        pid: u32,
        /// How it ended (`exit status: 1`).
        status: String,
    },
    /// The new process was not serving by the deadline, and was killed.
    #[error("the new process (pid {pid}) was not serving within {deadline:?}: killed it")]
    NotReady {
        /// Its PID.
        pid: u32,
        /// [`UPGRADE_DEADLINE`].
        deadline: Duration,
    },
}

/// Starts the binary this process was started from, as the new process of
/// an upgrade.
#[derive(Debug)]
pub struct Upgrader {
    binary: Result<PathBuf, String>,
    args: Vec<OsString>,
}

impl Upgrader {
    /// Remembers the binary's path and the arguments. Call it at start-up:
    /// once the binary is replaced on disk, the running process's own
    /// image is no longer the file at that path, and the path is what names
    /// the new binary.
    pub fn at_start() -> Upgrader {
        Upgrader {
            binary: std::env::current_exe().map_err(|error| error.to_string()),
            args: std::env::args_os().skip(1).collect(),
        }
    }

    /// The binary it starts.
    pub fn binary(&self) -> Result<&std::path::Path, UpgradeError> {
        self.binary
            .as_deref()
            .map_err(|why| UpgradeError::NoBinary(why.clone()))
    }

    /// Starts the new process with `sockets` (every listening socket of
    /// this one) and waits, for at most `deadline`, until it says it is
    /// serving; returns its PID. On an error the new process is gone
    /// (killed if it was still running). Dropping the future before it
    /// completes kills the new process too.
    pub async fn upgrade(
        &self,
        sockets: Vec<(Role, BorrowedFd<'_>)>,
        deadline: Duration,
    ) -> Result<u32, UpgradeError> {
        let binary = self.binary()?;
        let (reader, writer) = io::pipe().map_err(UpgradeError::Prepare)?;
        let writer = OwnedFd::from(writer);
        let list: Vec<String> = sockets
            .iter()
            .map(|(role, fd)| format!("{}:{}", role.as_str(), fd.as_raw_fd()))
            .collect();
        let mut command = Command::new(binary);
        command
            .args(&self.args)
            .env(FDS_VAR, list.join(","))
            .env(READY_VAR, writer.as_raw_fd().to_string())
            // What systemd passed was for this process, not the new one.
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES");
        // Inherited across exec only while the child is started: nothing
        // else in the balancer starts processes, and close-on-exec is a
        // flag of this descriptor, not of the socket it shares.
        let inheritable = sockets
            .iter()
            .map(|(_, fd)| *fd)
            .chain(std::iter::once(std::os::fd::AsFd::as_fd(&writer)));
        let mut cleared = Vec::new();
        let mut prepared = Ok(());
        for fd in inheritable {
            match fcntl_setfd(fd, FdFlags::empty()) {
                Ok(()) => cleared.push(fd),
                Err(error) => {
                    prepared = Err(io::Error::from(error));
                    break;
                }
            }
        }
        let spawned = prepared.map_err(UpgradeError::Prepare).and_then(|()| {
            command.spawn().map_err(|source| UpgradeError::Spawn {
                path: binary.display().to_string(),
                source,
            })
        });
        for fd in cleared {
            let _ = fcntl_setfd(fd, FdFlags::CLOEXEC);
        }
        // Only the child holds the write end now: its exit ends the pipe.
        drop(writer);
        let mut child = NewProcess(Some(spawned?));
        let pid = child.pid();
        let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
            .map_err(UpgradeError::Prepare)?;
        let wait = async {
            let mut said = Vec::new();
            let mut chunk = [0u8; 16];
            loop {
                match pipe.read(&mut chunk).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => said.extend_from_slice(&chunk[..n]),
                }
                if said.starts_with(b"ready") {
                    return true;
                }
            }
        };
        match tokio::time::timeout(deadline, wait).await {
            Ok(true) => {
                child.keep();
                Ok(pid)
            }
            // The pipe closed: the new process exited (or is about to).
            Ok(false) => Err(UpgradeError::Exited {
                pid,
                status: child.end(Duration::from_secs(5)).await,
            }),
            Err(_) => {
                child.end(Duration::ZERO).await;
                Err(UpgradeError::NotReady { pid, deadline })
            }
        }
    }
}

/// The new process of an upgrade in progress: killed if dropped before it
/// is kept.
struct NewProcess(Option<Child>);

impl NewProcess {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// Lets it run on its own.
    fn keep(&mut self) {
        self.0 = None;
    }

    /// Waits up to `grace` for it to exit, kills it if it has not, and
    /// reaps it; says how it ended.
    async fn end(&mut self, grace: Duration) -> String {
        let Some(mut child) = self.0.take() else {
            return "gone".into();
        };
        let started = std::time::Instant::now();
        let mut killed = false;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if killed => return format!("killed: {status}"),
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if !killed && started.elapsed() >= grace => {
                    let _ = child.kill();
                    killed = true;
                }
                // Killed, it exits at once; bounded all the same.
                Ok(None) if started.elapsed() < grace + Duration::from_secs(5) => {}
                Ok(None) => return "did not exit when killed".into(),
                Err(error) => return format!("cannot wait for it: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NewProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.try_wait();
        }
    }
}

/// Sends `state` (`READY=1`, `STOPPING=1`, `MAINPID=...`) to the service
/// manager, as `sd_notify(3)` does, when it listens (`NOTIFY_SOCKET`);
/// nothing otherwise.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let path = path.to_string_lossy();
        if let Some(name) = path.strip_prefix('@') {
            // An abstract socket (`@name`).
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &address)?;
        } else {
            socket.send_to(state.as_bytes(), &*path)?;
        }
        Ok(())
    })();
    if let Err(error) = sent {
        tracing::warn!("cannot notify the service manager ({state}): {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(role: Option<Role>, address: &str) -> Socket {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Socket {
            role,
            name: role.map_or("other", Role::as_str).to_string(),
            address: address.parse().unwrap(),
            listener,
        }
    }

    #[test]
    fn sockets_are_taken_by_role_and_address() {
        let mut inherited = Inherited {
            sockets: vec![
                socket(Some(Role::Plain), "127.0.0.1:8080"),
                socket(Some(Role::Plain), "127.0.0.1:8080"),
                socket(Some(Role::Admin), "127.0.0.1:9090"),
                socket(None, "127.0.0.1:8443"),
                socket(Some(Role::Tls), "127.0.0.1:7443"),
            ],
            ready: None,
        };
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        // The wrong role on the right address, the right role elsewhere.
        assert!(inherited.take(Role::Tls, at("127.0.0.1:8080")).is_empty());
        assert!(inherited.take(Role::Plain, at("127.0.0.2:8080")).is_empty());
        assert_eq!(inherited.take(Role::Plain, at("127.0.0.1:8080")).len(), 2);
        // Port 0 in the config: the inherited socket's port.
        assert_eq!(inherited.take(Role::Admin, at("127.0.0.1:0")).len(), 1);
        // A socket without one of our names serves the listener on its
        // address.
        assert_eq!(inherited.take(Role::Tls, at("127.0.0.1:8443")).len(), 1);
        assert_eq!(inherited.close_unused(), ["127.0.0.1:7443 (tls)"]);
        assert!(inherited.close_unused().is_empty());
    }
}
