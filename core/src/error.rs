use std::path::PathBuf;

/// The one error type of `trellis-core`. Every message says what was wrong and, where it can,
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid growth request: {0}")]
    InvalidGrowth(String),
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("invalid job spec {path}: {message}")]
    InvalidJobSpec { path: String, message: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("checkpoint file {path} is corrupt: sha256 {actual} does not match the manifest's {expected}; restore it or load an older checkpoint")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// `coordctl checkpoint import --hf` refused its input.
    #[error("cannot import {path}: {message}")]
    Import { path: PathBuf, message: String },
    #[error("layout: {0}")]
    Layout(String),
    #[error("plot: {0}")]
    Plot(String),
    /// A path outside the allowed roots (see `paths::confine`).
    #[error("path {path} {reason}; allowed roots: {roots}; use a path inside one of them")]
    PathNotAllowed {
        path: String,
        reason: String,
        roots: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
