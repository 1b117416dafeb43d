//! Text to token batches with the model's own `tokenizer.json` (the `tokenizers` crate, no C).

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

pub struct TextEncoder {
    tokenizer: tokenizers::Tokenizer,
    /// Longer texts are cut to this many tokens (the special tokens included).
    pub max_len: usize,
    pad_id: u32,
}

/// A padded batch: ids and attention mask, both `[batch, longest]`.
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
}

impl TextEncoder {
    /// The tokenizer of the model directory `dir`. The file's own padding and truncation
    /// settings are replaced: batches are padded to their longest text, cut at `max_len`.
    pub fn from_model_dir(dir: &Path, max_len: usize) -> Result<TextEncoder> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::model(path.display().to_string(), e.to_string()))?;
        let pad_id = tokenizer.get_padding().map_or(0, |p| p.pad_id);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::model(path.display().to_string(), e.to_string()))?;
        Ok(TextEncoder {
            tokenizer,
            max_len,
            pad_id,
        })
    }

    /// Token ids of one text, special tokens added, cut at `max_len` (the last token kept, so
    /// a closing `[SEP]` survives the cut).
    pub fn ids(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::model("tokenizer", e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > self.max_len && self.max_len > 0 {
            let last = *ids.last().expect("non-empty");
            ids.truncate(self.max_len);
            *ids.last_mut().expect("non-empty") = last;
        }
        Ok(ids)
    }

    pub fn batch(&self, texts: &[&str], device: &Device) -> Result<Batch> {
        let encoded: Vec<Vec<u32>> = texts.iter().map(|t| self.ids(t)).collect::<Result<_>>()?;
        let longest = encoded.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(texts.len() * longest);
        let mut mask = Vec::with_capacity(texts.len() * longest);
        for e in &encoded {
            ids.extend(
                e.iter()
                    .copied()
                    .chain(std::iter::repeat(self.pad_id))
                    .take(longest),
            );
            mask.extend((0..longest).map(|i| u32::from(i < e.len())));
        }
        let shape = (texts.len(), longest);
        Ok(Batch {
            ids: Tensor::from_vec(ids, shape, device)?,
            mask: Tensor::from_vec(mask, shape, device)?,
        })
    }
}
