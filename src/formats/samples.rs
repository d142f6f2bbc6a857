//! Sample files, one sample per non-blank line: calibration samples (`.txt`, or `.jsonl` with a
//! string `text` field) and held-out evaluation sets (`.txt`, or `.jsonl` with `prompt` and
//! `answer`, or `text`). Both are read by one line reader, so they agree on what a line is.

use crate::error::{bad_input, Result};
use serde_json::Value;

/// Characters of one sample kept (more than the longest `--max-len` can use: 65536 tokens of 64
/// characters each); the tokenizer cuts further to its own budget for `--max-len`. So a huge line
/// costs its bytes in the file, never a second copy.
pub const MAX_SAMPLE_CHARS: usize = 1 << 22;

/// `text` cut to `MAX_SAMPLE_CHARS` characters.
pub fn cut(text: &str) -> &str {
    match text.char_indices().nth(MAX_SAMPLE_CHARS) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// One non-blank line of a `.txt` file, or one JSON object of a `.jsonl` file.
enum Line<'a> {
    Text(&'a str),
    Json(serde_json::Map<String, Value>),
}

/// The non-blank lines of `bytes` with their line numbers (from 1); `.jsonl` (by the file name)
/// lines must be JSON objects.
fn lines<'a>(file: &str, bytes: &'a [u8]) -> Result<Vec<(usize, Line<'a>)>> {
    let text = std::str::from_utf8(bytes).map_err(|_| bad_input(file, "is not UTF-8 text"))?;
    let jsonl = file.to_ascii_lowercase().ends_with(".jsonl");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let n = i + 1;
        if !jsonl {
            out.push((n, Line::Text(line)));
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad_input(file, format!("line {n}: not valid JSON ({e})")))?;
        match v {
            Value::Object(o) => out.push((n, Line::Json(o))),
            other => return Err(bad_input(file, format!("line {n}: must be a JSON object, not {other}"))),
        }
    }
    Ok(out)
}

/// The string field `key` of a JSON line (None when absent), refused when it is another type.
fn string(file: &str, n: usize, o: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::String(t)) => Ok(Some(cut(t).to_string())),
        Some(other) => Err(bad_input(file, format!("line {n}: \"{key}\" must be a string, not {other}"))),
    }
}

/// Calibration samples.
pub fn parse(file: &str, bytes: &[u8]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (n, line) in lines(file, bytes)? {
        let text = match line {
            Line::Text(t) => cut(t).to_string(),
            Line::Json(o) => string(file, n, &o, "text")?
                .ok_or_else(|| bad_input(file, format!("line {n}: no string field \"text\"")))?,
        };
        if !text.trim().is_empty() {
            out.push(text);
        }
    }
    if out.is_empty() {
        return Err(bad_input(
            file,
            "holds no samples (expected one sample per line, or JSON lines with a \"text\" field)",
        ));
    }
    Ok(out)
}

/// Held-out samples of one task.
#[derive(Clone, Debug, Default)]
pub struct EvalSet {
    pub name: String,
    /// (prompt, answer); the answer is None for unlabeled samples.
    pub items: Vec<(String, Option<String>)>,
}

impl EvalSet {
    /// `.jsonl` with `{"prompt", "answer"}` (labeled) or `{"text"}` lines, or `.txt` (one sample
    /// per line, unlabeled).
    pub fn parse(name: &str, bytes: &[u8]) -> Result<EvalSet> {
        let mut items = Vec::new();
        for (n, line) in lines(name, bytes)? {
            let o = match line {
                Line::Text(t) => {
                    items.push((cut(t).to_string(), None));
                    continue;
                }
                Line::Json(o) => o,
            };
            let field = |k: &str| string(name, n, &o, k);
            match (field("prompt")?, field("answer")?, field("text")?) {
                (Some(p), Some(a), _) => items.push((p, Some(a))),
                (_, _, Some(t)) => items.push((t, None)),
                _ => return Err(bad_input(name, format!("line {n}: needs \"prompt\" and \"answer\", or \"text\""))),
            }
        }
        if items.is_empty() {
            return Err(bad_input(name, "holds no evaluation samples"));
        }
        Ok(EvalSet { name: name.to_string(), items })
    }

    /// The first `limit` samples (all when None).
    pub fn first(&self, limit: Option<usize>) -> EvalSet {
        let n = limit.unwrap_or(usize::MAX).min(self.items.len());
        EvalSet { name: self.name.clone(), items: self.items[..n].to_vec() }
    }

    pub fn labeled(&self) -> Vec<(&str, &str)> {
        self.items.iter().filter_map(|(p, a)| a.as_deref().map(|a| (p.as_str(), a))).collect()
    }
}
