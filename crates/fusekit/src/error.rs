//! One error type for the library. Every variant names what is at fault: a file, a tensor,
//! a model or a config key with its line, so a user can fix the input without reading code.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cause is part of the message, not a `source` as well: a report that prints the
    /// chain would say it twice.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("model `{model}` not found: {message}")]
    ModelNotFound { model: String, message: String },
    #[error("config: {0}")]
    Config(String),
    #[error("tensor `{tensor}`: {message}")]
    Tensor { tensor: String, message: String },
    #[error("output {path}: {message}")]
    Output { path: PathBuf, message: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }

    pub fn bad_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn tensor(tensor: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Tensor {
            tensor: tensor.into(),
            message: message.into(),
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Error::Config(message.into())
    }

    /// A config error prefixed with where it applies (`modules.vision_tower: …`); other errors
    /// already name their file, tensor or model.
    pub fn context(self, at: &str) -> Self {
        match self {
            Error::Config(message) => Error::Config(format!("{at}: {message}")),
            other => other,
        }
    }
}
