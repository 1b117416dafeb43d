//! One file per model family, each a plain forward pass over [`crate::weights::Weights`].

pub mod bert;
pub mod llama;
pub mod mlp;
