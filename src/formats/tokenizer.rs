//! `tokenizer.json` through the `tokenizers` crate: `encode(text, add_special_tokens = true)` with the
//! tokenizer's own truncation at `max_len` (so special tokens a post-processor adds survive, as with
//! Hugging Face `tokenizer(text, truncation=True, max_length=max_len)`), and never any padding.

use crate::error::{bad_input, Result};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

pub struct TextTokenizer {
    file: String,
    inner: Tokenizer,
}

/// Token ids of one sample, and whether truncation cut it.
pub struct Encoded {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

impl TextTokenizer {
    pub fn parse(file: impl Into<String>, bytes: &[u8]) -> Result<TextTokenizer> {
        let file = file.into();
        let mut inner =
            Tokenizer::from_bytes(bytes).map_err(|e| bad_input(&file, format!("cannot load tokenizer ({e})")))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| bad_input(&file, format!("cannot configure tokenizer ({e})")))?;
        Ok(TextTokenizer { file, inner })
    }

    pub fn encode(&self, text: &str, max_len: usize) -> Result<Encoded> {
        let full = self
            .inner
            .encode(text, true)
            .map_err(|e| bad_input(&self.file, format!("cannot tokenize a sample ({e})")))?;
        if full.len() <= max_len {
            return Ok(Encoded { ids: full.get_ids().to_vec(), truncated: false });
        }
        let mut t = self.inner.clone();
        t.with_truncation(Some(TruncationParams {
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| bad_input(&self.file, format!("cannot truncate to {max_len} tokens ({e})")))?;
        let enc = t.encode(text, true).map_err(|e| bad_input(&self.file, format!("cannot tokenize a sample ({e})")))?;
        Ok(Encoded { ids: enc.get_ids().to_vec(), truncated: true })
    }

    /// Text of `ids`, special tokens skipped (the tokenizer's own decoder).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| bad_input(&self.file, format!("cannot decode tokens ({e})")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
