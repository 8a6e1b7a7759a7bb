//! The one error type of the core crate.

/// Everything that can go wrong in the core. Messages are written for the
/// person at the R prompt: they name the argument or the data at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data handed in is not what the function accepts.
    #[error("{0}")]
    InvalidInput(String),
    /// A parameter is outside its valid range.
    #[error("`{name}` {reason}")]
    InvalidParameter { name: &'static str, reason: String },
    /// The user asked to stop (Ctrl-C in R).
    #[error("interrupted by the user")]
    Interrupted,
    /// A dense linear-algebra routine did not converge.
    #[error("linear algebra failed: {0}")]
    Linalg(String),
    /// A collective of data-parallel training failed: a rank died or timed
    /// out, or the ranks disagree on the data or the model.
    #[error("distributed training: {0}")]
    Distributed(String),
    /// An error raised inside libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for `Err(Error::InvalidInput(format!(...)))`.
macro_rules! invalid {
    ($($arg:tt)*) => { Err($crate::error::Error::InvalidInput(format!($($arg)*))) };
}
pub(crate) use invalid;

/// Shorthand for rejecting a parameter before any work starts.
pub(crate) fn check_param(ok: bool, name: &'static str, reason: impl Into<String>) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidParameter { name, reason: reason.into() })
    }
}
