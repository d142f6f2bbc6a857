//! Calibration samples: `.txt` (one sample per non-blank line) or `.jsonl` (one object per line with
//! a string `text` field).

use crate::error::{bad_input, Result};

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

pub fn parse(file: &str, bytes: &[u8]) -> Result<Vec<String>> {
    let text = std::str::from_utf8(bytes).map_err(|_| bad_input(file, "is not UTF-8 text"))?;
    let jsonl = file.to_ascii_lowercase().ends_with(".jsonl");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if jsonl {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| bad_input(file, format!("line {}: not valid JSON ({e})", i + 1)))?;
            let t = v
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| bad_input(file, format!("line {}: no string field \"text\"", i + 1)))?;
            if !t.trim().is_empty() {
                out.push(cut(t).to_string());
            }
        } else {
            out.push(cut(line).to_string());
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
