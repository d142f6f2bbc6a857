#!/usr/bin/env bash
# The CLI on a real PEFT fixture: build it and merge the bundled GPT-2 fixture (three real PEFT
# adapters of different ranks, with their samples) into ./demo-out, then show the report.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
F=tests/fixtures/gpt2
./target/release/iteris merge --backend cpu --force \
  --base $F/base \
  --adapter $F/adapter0 --samples $F/samples0.txt \
  --adapter $F/adapter1 --samples $F/samples1.jsonl \
  --adapter $F/adapter2 --samples $F/samples2.txt \
  --out demo-out "$@"
echo "merged adapter: demo-out/ (adapter_config.json, adapter_model.safetensors, merge_report.json)"
