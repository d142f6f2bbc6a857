#!/usr/bin/env bash
# Build the page into dist/: the engine compiled to wasm32 (profile `web`), bound to JS by the
# wasm-bindgen CLI of the exact version Cargo.lock pins, optimised by wasm-opt (npm binaryen),
# next to the static files of www/ and the bundled demo. dist/ can be hosted anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh web

cargo build --profile web --lib --target wasm32-unknown-unknown
rm -rf dist
mkdir -p dist/pkg
wasm-bindgen --target web --no-typescript --out-dir dist/pkg target/wasm32-unknown-unknown/web/iteris.wasm
# wasm-opt must know the features rustc enabled (bulk memory, sign extension, non-trapping
# float-to-int, multi-value, reference types, and SIMD from .cargo/config.toml), or it refuses the
# module.
node_modules/.bin/wasm-opt -O3 --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
  --enable-mutable-globals --enable-multivalue --enable-reference-types --enable-simd \
  dist/pkg/iteris_bg.wasm -o dist/pkg/iteris_bg.wasm
cp -r www/. dist/
# The demo: files the page fetches from its own origin when "Try the demo" is pressed.
bash tools/pack_demo.sh dist/demo
raw=$(stat -c %s dist/pkg/iteris_bg.wasm)
gz=$(gzip -9 -c dist/pkg/iteris_bg.wasm | wc -c)
echo "dist/ ready: iteris_bg.wasm $((raw / 1024)) KiB raw, $((gz / 1024)) KiB gzip"
