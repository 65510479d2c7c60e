//! The one error type of the coordinator library, and the one place it becomes a `tonic::Status`.

/// Every message says what was wrong and, where it can, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong (bad factor, unknown operator, bad spec).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is fine but the job is not in a state to do it now.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Retryable: the store or the workers are not reachable right now.
    #[error("{0}")]
    Unavailable(String),
    /// Retryable in a moment: a short transaction (a checkpoint commit) is in the way.
    #[error("{0}")]
    Busy(String),
    /// A configured limit (docs/security.md#limits) is reached; the message names it.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("state store: {0}")]
    Store(#[from] trellis_store::Error),
    #[error("{0}")]
    Core(#[from] trellis_core::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Unavailable(_) | Error::Busy(_) | Error::Store(_) => Code::Unavailable,
            Error::Core(c) => match c {
                trellis_core::Error::InvalidGrowth(_)
                | trellis_core::Error::PathNotAllowed { .. }
                | trellis_core::Error::InvalidConfig(_)
                | trellis_core::Error::InvalidJobSpec { .. } => Code::InvalidArgument,
                trellis_core::Error::Layout(_) => Code::FailedPrecondition,
                _ => Code::Internal,
            },
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

impl Error {
    pub(crate) fn json(what: &str, e: serde_json::Error) -> Error {
        Error::Internal(format!("cannot (de)serialise {what}: {e}"))
    }
}
