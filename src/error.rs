//! One error type for the whole engine. Every message a user can cause names the file (or the
//! setting) it is about and says what is wrong with it, on one line.

use std::fmt::Display;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something wrong with a file or setting the user gave us.
    #[error("{source_name}: {problem}")]
    Input { source_name: String, problem: String },
    /// Something we cannot do (yet), said plainly.
    #[error("{0}")]
    Unsupported(String),
    /// A numerical failure (for example a Gram matrix that is singular even with the ridge).
    #[error("{0}")]
    Numeric(String),
    #[error("{0}")]
    Io(String),
    /// The forward pass produced NaN or ±∞ in the inputs of `module` (task `task`, from 0): raised
    /// by the merge, turned by the pipeline into an `Input` error naming config.json.
    #[error("the inputs of module {module} are not finite numbers (task {})", task + 1)]
    NonFinite { module: String, task: usize },
    /// The GPU failed while working (device lost, out of memory, a readback refused).
    #[error("{0}")]
    Gpu(String),
    /// Not a failure: a forward pass unwinds with this once its hook has seen every module it needs,
    /// so nothing downstream of the last targeted module is computed.
    #[error("forward pass stopped early")]
    Stop,
}

pub type Result<T> = std::result::Result<T, Error>;

/// `file: problem`.
pub fn bad_input(source_name: impl Display, problem: impl Display) -> Error {
    Error::Input { source_name: source_name.to_string(), problem: problem.to_string() }
}
