#!/usr/bin/env bash
# Copy the bundled demo into $1 (default dist/demo) with a manifest.json the page reads: a base
# model folder, adapters with their calibration samples and held-out evaluation sets. The demo is
# demo/ (made by tools/make_demo.py: a tiny Llama trained on synthetic text and four task
# adapters).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist/demo}
src=demo
rm -rf "$out" && mkdir -p "$out"
cp -r $src/base $src/adapters $src/samples $src/eval $src/study.json "$out/"
rm -f "$out"/base/generation_config.json "$out"/adapters/*/README.md
tasks=""
for a in $src/adapters/*/; do
  t=$(basename "$a")
  tasks="$tasks${tasks:+,}{\"adapter\":\"adapters/$t\",\"files\":[\"adapter_config.json\",\"adapter_model.safetensors\"],\"samples\":\"samples/$t.txt\",\"eval\":\"eval/$t.jsonl\"}"
done
cat > "$out/manifest.json" <<JSON
{"title":"a tiny Llama and four LoRA adapters: reverse a word, sort digits, add two numbers, name a word's kind",
 "base":{"folder":"base","files":["config.json","tokenizer.json","model.safetensors"]},
 "settings":{"max-len":64},
 "tasks":[$tasks]}
JSON
