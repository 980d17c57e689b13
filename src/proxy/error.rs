//! The one place where a failed request becomes an HTTP status.

use http::StatusCode;

/// Why the proxy answered a request itself. Each variant maps to one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No backend is healthy: 503, without calling the strategy.
    #[error("no healthy backend")]
    NoHealthyBackend,
    /// The strategy answered `none`: 503.
    #[error("the strategy refused the request")]
    Refused,
    /// Connecting to or talking with the backend failed: 502.
    #[error("the backend could not be reached")]
    Upstream,
    /// The backend did not answer in time: 504.
    #[error("the backend did not answer in time")]
    Timeout,
    /// The request could not be forwarded as given: 400.
    #[error("malformed request")]
    BadRequest,
}

impl ProxyError {
    /// The status code sent to the client.
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::NoHealthyBackend | ProxyError::Refused => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
        }
    }
}

pub use crate::describe::describe;
