//! What the benchmark binaries share.

/// The sizes after `--sizes` (comma-separated), else `default`.
pub fn sizes(args: &[String], default: &[usize]) -> Vec<usize> {
    args.iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}
