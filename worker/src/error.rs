//! The one error type of `trellis-worker` (the library). Every message says what was wrong and,
//! where it can, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input the user can fix: a spec, a checkpoint that does not fit, a refused growth…
    #[error("{0}")]
    Invalid(String),
    /// A step produced a NaN / infinite loss (the report says which batch). The trainer has
    /// advanced past the batch; its weights may be corrupt, so restore a checkpoint.
    #[error("training loss became {} at step {}; lower the learning rate or resume from an earlier checkpoint", .0.loss, .0.step)]
    NonFiniteLoss(Box<crate::report::StepReport>),
    #[error(transparent)]
    Core(#[from] trellis_core::Error),
    #[error("data: {0}")]
    Data(#[from] trellis_data::Error),
    #[error(transparent)]
    Comm(#[from] trellis_comm::Error),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
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

    /// Whether the error is about the caller's input (a bad spec, a corrupt or mismatched
    /// checkpoint, a refused growth): the CLI exits 2 for these, 1 otherwise.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Invalid(_) | Error::NonFiniteLoss(_) => true,
            Error::Core(e) => core_is_bad_input(e),
            Error::Data(e) => !matches!(e, trellis_data::Error::Io { .. }),
            Error::Comm(_) | Error::Torch(_) | Error::Io { .. } => false,
        }
    }
}

/// Which `trellis_core` errors are bad input (exit 2).
pub fn core_is_bad_input(e: &trellis_core::Error) -> bool {
    use trellis_core::Error as C;
    matches!(
        e,
        C::InvalidGrowth(_)
            | C::InvalidConfig(_)
            | C::InvalidJobSpec { .. }
            | C::Checkpoint { .. }
            | C::HashMismatch { .. }
            | C::Layout(_)
    )
}
