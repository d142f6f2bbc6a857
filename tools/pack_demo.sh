#!/usr/bin/env bash
# Copy the bundled demo into $1 (default dist/demo) with a manifest.json the page reads: a base
# model folder, adapters and their calibration samples. Until the trained demo of tools/ exists,
# the demo is the GPT-2 test fixture (tiny random model, three real PEFT adapters).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist/demo}
src=tests/fixtures/gpt2
rm -rf "$out" && mkdir -p "$out/base"
cp $src/base/config.json $src/base/tokenizer.json $src/base/model.safetensors "$out/base/"
tasks=""
for i in 0 1 2; do
  mkdir -p "$out/adapter$i"
  cp $src/adapter$i/adapter_config.json $src/adapter$i/adapter_model.safetensors "$out/adapter$i/"
  s=$(cd $src && ls samples$i.*)
  cp $src/$s "$out/"
  tasks="$tasks${tasks:+,}{\"adapter\":\"adapter$i\",\"files\":[\"adapter_config.json\",\"adapter_model.safetensors\"],\"samples\":\"$s\"}"
done
cat > "$out/manifest.json" <<JSON
{"title":"tiny GPT-2 with three LoRA adapters (test fixture)",
 "base":{"folder":"base","files":["config.json","tokenizer.json","model.safetensors"]},
 "tasks":[$tasks]}
JSON
