//! Differentiable models over the checkpoints fusekit merges: forward and backward passes with
//! `candle`, for evaluating merged models and for the merges that need data (Fisher, RegMean,
//! AdaMerging, aTLAS, Expert Merging).
//!
//! The models are our own, one file each in [`models`], built only from candle operations that
//! have a backward pass: `candle-transformers` uses fused RmsNorm, softmax and rotary kernels that
//! silently stop gradients. [`ops`] holds the differentiable building blocks, [`weights`] loads a
//! checkpoint (through fusekit's reader, so LoRA references and validation come for free).

pub mod coefficients;
pub mod datasets;
pub mod eval;
pub mod fisher;
pub mod memory;
pub mod models;
pub mod ops;
pub mod regmean;
pub mod text;
pub mod train;
pub mod weights;

pub use candle_core::{DType, Device, Tensor, Var};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Fusekit(#[from] fusekit::Error),
    #[error("{model}: {message}")]
    Model { model: String, message: String },
}

impl Error {
    pub fn model(model: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Model {
            model: model.into(),
            message: message.into(),
        }
    }
}
