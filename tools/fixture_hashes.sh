#!/usr/bin/env bash
# Hashes of the merged adapters of every fixture in tests/fixtures, merged on the CPU by the CLI with
# several settings (IterIS's defaults, the output objective, the published Jacobi schedule, two
# baselines, refinement): the check that a refactor changed no byte of a merge. Run it before and
# after, and compare:
#   bash tools/fixture_hashes.sh > before.txt; ...; bash tools/fixture_hashes.sh | diff before.txt -
# Needs target/release/iteris (cargo build --release). merge_report.json holds timings and is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/iteris
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
settings=(
  "default|"
  "output|--objective output"
  "jacobi|--schedule jacobi --balance off --self-calibrate 0"
  "ties|--method ties"
  "svd|--method svd --rank 4"
  "refine|--refine-steps 3"
)
for fixture in tests/fixtures/*/; do
  [ -d "$fixture/base" ] || continue  # gguf/ and other non-model fixtures
  name=$(basename "$fixture")
  args=(--base "$fixture/base")
  for i in 0 1 2; do
    samples=$(ls "$fixture" | grep "^samples$i\." | head -1)
    args+=(--adapter "$fixture/adapter$i" --samples "$fixture/$samples")
  done
  for s in "${settings[@]}"; do
    label=${s%%|*}
    extra=${s#*|}
    # Refinement runs on decoder families only; other settings a family lacks report their error.
    if "$bin" merge "${args[@]}" $extra --backend cpu --out "$out/m" >"$out/log" 2>&1; then
      echo "$name $label $(cat "$out/m/adapter_model.safetensors" "$out/m/adapter_config.json" | sha256sum | cut -c1-16)"
    else
      echo "$name $label error: $(tail -1 "$out/log" | cut -c1-80)"
    fi
    rm -rf "$out/m"
  done
done
