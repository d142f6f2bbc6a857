//! `tokenizer.json` through the `tokenizers` crate: `encode(text, add_special_tokens = true)` with the
//! tokenizer's own truncation at `max_len` (so special tokens a post-processor adds survive, as with
//! Hugging Face `tokenizer(text, truncation=True, max_length=max_len)`), and never any padding.
//!
//! The crate panics on some malformed files, so every call into it is `contained` (natively a
//! caught unwind, in the page a trap that names the file), the structures known to panic are checked
//! first, and a probe text is encoded and decoded at load, so a tokenizer that would fail does so
//! before any work. A sample is cut to a character budget before tokenization: a 50 MB line costs
//! what a normal sample costs.

use super::contain::contained;
use crate::error::{bad_input, Result};
use serde_json::Value;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

pub struct TextTokenizer {
    file: String,
    inner: Tokenizer,
    /// The most characters one token's vocabulary string has (at least 4): a sample's first
    /// `max_len` tokens lie within its first `char_budget(max_len)` characters.
    token_chars: usize,
}

/// Token ids of one sample, and whether truncation cut it.
pub struct Encoded {
    pub ids: Vec<u32>,
    pub truncated: bool,
}

/// What a contained panic names as having failed.
const LIBRARY: &str = "the tokenizer library";

/// The text the load-time probe encodes and decodes.
const PROBE: &str = "Hello, world! 0123 ÄÖü — 漢字 \t end.";

/// Refuse what the crate would index out of bounds on: a `TemplateProcessing` post-processor
/// (also inside a `Sequence`) whose template names a special token it does not define, or whose
/// special token has no ids or a different number of ids and tokens.
fn check_templates(file: &str, v: &Value) -> Result<()> {
    let Some(o) = v.as_object() else { return Ok(()) };
    // The crate reads any object of this shape as a template (its "type" is not required to say
    // so), so the check goes by shape.
    let templated = o.get("type").and_then(Value::as_str) == Some("TemplateProcessing")
        || ["single", "pair", "special_tokens"].iter().any(|k| o.contains_key(*k));
    if templated {
        let specials = o.get("special_tokens").and_then(Value::as_object);
        for part in ["single", "pair"] {
            for piece in o.get(part).and_then(Value::as_array).into_iter().flatten() {
                let Some(id) = piece.get("SpecialToken").and_then(|s| s.get("id")).and_then(Value::as_str) else {
                    continue;
                };
                let tok = specials.and_then(|s| s.get(id)).ok_or_else(|| {
                    bad_input(file, format!("post_processor template '{part}' uses the special token '{id}', which special_tokens does not define"))
                })?;
                let n = |k: &str| tok.get(k).and_then(Value::as_array).map(Vec::len);
                if n("ids").unwrap_or(0) == 0 || n("ids") != n("tokens") {
                    return Err(bad_input(
                        file,
                        format!("post_processor special token '{id}' needs as many ids as tokens (at least one)"),
                    ));
                }
            }
        }
    }
    for p in o.get("processors").and_then(Value::as_array).into_iter().flatten() {
        check_templates(file, p)?;
    }
    Ok(())
}

/// Refuse a BPE model whose `continuing_subword_prefix` does not begin the second token of every
/// merge: the crate cuts the prefix off by length without looking (a panic, or text that is not
/// UTF-8).
fn check_bpe(file: &str, model: &Value) -> Result<()> {
    // By shape, as the crate reads it: a model with merges is a BPE model whatever its "type".
    let bpe = match model.get("type").and_then(Value::as_str) {
        Some(t) => t == "BPE",
        None => model.get("merges").is_some(),
    };
    if !bpe {
        return Ok(());
    }
    let Some(prefix) = model.get("continuing_subword_prefix").and_then(Value::as_str) else { return Ok(()) };
    for m in model.get("merges").and_then(Value::as_array).into_iter().flatten() {
        let second = match m {
            Value::String(s) => s.split_once(' ').map(|(_, b)| b),
            Value::Array(p) => p.get(1).and_then(Value::as_str),
            _ => None,
        };
        if let Some(b) = second.filter(|b| !b.starts_with(prefix)) {
            return Err(bad_input(
                file,
                format!("model.merges has the token '{b}', which does not begin with the continuing_subword_prefix '{prefix}'"),
            ));
        }
    }
    Ok(())
}

impl TextTokenizer {
    pub fn parse(file: impl Into<String>, bytes: &[u8]) -> Result<TextTokenizer> {
        let file = file.into();
        let json: Value =
            serde_json::from_slice(bytes).map_err(|e| bad_input(&file, format!("not valid JSON ({e})")))?;
        if let Some(p) = json.get("post_processor") {
            check_templates(&file, p)?;
        }
        if let Some(m) = json.get("model") {
            check_bpe(&file, m)?;
        }
        // The checked JSON becomes the tokenizer: the file is parsed once.
        let t = contained(&file, LIBRARY, || {
            let mut inner: Tokenizer =
                serde_json::from_value(json).map_err(|e| bad_input(&file, format!("cannot load tokenizer ({e})")))?;
            inner.with_padding(None);
            inner.with_truncation(None).map_err(|e| bad_input(&file, format!("cannot configure tokenizer ({e})")))?;
            let token_chars = inner.get_vocab(true).keys().map(|k| k.chars().count()).max().unwrap_or(0).max(4);
            Ok(TextTokenizer { file: file.clone(), inner, token_chars })
        })?;
        // Only a panic counts: a tokenizer may refuse the probe's characters and be fine for text.
        contained(&t.file, LIBRARY, || {
            if let Ok(e) = t.inner.encode(PROBE, true) {
                let _ = t.inner.decode(e.get_ids(), true);
            }
            Ok(())
        })?;
        Ok(t)
    }

    /// Characters of a sample kept before tokenizing it to at most `max_len` tokens: enough for
    /// `max_len` tokens of the longest vocabulary string, with room for special tokens.
    pub fn char_budget(&self, max_len: usize) -> usize {
        max_len.saturating_add(16).saturating_mul(self.token_chars).saturating_add(256)
    }

    pub fn encode(&self, text: &str, max_len: usize) -> Result<Encoded> {
        let budget = self.char_budget(max_len);
        let (text, cut) = match text.char_indices().nth(budget) {
            Some((at, _)) => (&text[..at], true),
            None => (text, false),
        };
        let full = self.encode_raw(text, None)?;
        if full.len() <= max_len {
            return Ok(Encoded { ids: full, truncated: cut });
        }
        Ok(Encoded { ids: self.encode_raw(text, Some(max_len))?, truncated: true })
    }

    fn encode_raw(&self, text: &str, max_len: Option<usize>) -> Result<Vec<u32>> {
        contained(&self.file, LIBRARY, || {
            let mut t = std::borrow::Cow::Borrowed(&self.inner);
            if let Some(max_length) = max_len {
                t.to_mut()
                    .with_truncation(Some(TruncationParams {
                        max_length,
                        strategy: TruncationStrategy::LongestFirst,
                        stride: 0,
                        direction: TruncationDirection::Right,
                    }))
                    .map_err(|e| bad_input(&self.file, format!("cannot truncate to {max_length} tokens ({e})")))?;
            }
            let enc =
                t.encode(text, true).map_err(|e| bad_input(&self.file, format!("cannot tokenize a sample ({e})")))?;
            Ok(enc.get_ids().to_vec())
        })
    }

    /// Text of `ids`, special tokens skipped (the tokenizer's own decoder).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        contained(&self.file, LIBRARY, || {
            self.inner.decode(ids, true).map_err(|e| bad_input(&self.file, format!("cannot decode tokens ({e})")))
        })
    }

    /// The tokenizer as tokenizer.json (for a merged model's folder; a GGUF base's, rebuilt).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| bad_input(&self.file, format!("cannot write tokenizer.json ({e})")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
