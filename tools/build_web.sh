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
# The threaded engine (dist/pkg-threads/, feature `threads`): shared memory and atomics, which
# need std rebuilt by a pinned nightly (-Z build-std) and its own target dir (other RUSTFLAGS).
# The page loads it only where it is cross-origin isolated (SharedArrayBuffer); wasm32's 4 GiB
# is its memory's maximum, as the single-thread build's.
# The linker arguments make the memory shared and imported (each pool worker instantiates the
# module over the same memory) and export what wasm-bindgen's thread start-up calls.
link="--shared-memory --max-memory=4294967296 --import-memory --export=__wasm_init_tls --export=__tls_size --export=__tls_align --export=__tls_base"
# threaded_engine DIR FEATURES TARGET_DIR: the threaded engine with these target features into
# dist/DIR.
threaded_engine() {
  local dir=$1 features=$2 target=$3
  RUSTFLAGS="-C target-feature=+atomics,+bulk-memory,+mutable-globals,$features $(printf -- '-C link-arg=%s ' $link)" \
    cargo "+$(cat tools/nightly-toolchain)" build --profile web --lib --target wasm32-unknown-unknown --features threads \
    --target-dir "$target" -Z build-std=panic_abort,std
  wasm-bindgen --target web --no-typescript --out-dir "dist/$dir" "$target/wasm32-unknown-unknown/web/iteris.wasm"
  # wasm-bindgen-rayon's pool workers import the engine as '../../..', a bundler's package path;
  # without a bundler that is a folder URL, so name the module. (Its `no-bundler` variant starts
  # the workers from blob: URLs instead, which cannot receive a shared memory under COEP.) Goes if
  # the crate imports the module by its file name.
  local helpers
  helpers=$(ls "dist/$dir"/snippets/wasm-bindgen-rayon-*/src/workerHelpers.js)
  grep -q "import('../../..')" "$helpers"
  sed -i "s|import('../../..')|import('../../../iteris.js')|" "$helpers"
  node_modules/.bin/wasm-opt -O3 --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
    --enable-mutable-globals --enable-multivalue --enable-reference-types --enable-simd --enable-threads \
    $([[ $features == *relaxed-simd* ]] && echo --enable-relaxed-simd) "dist/$dir/iteris_bg.wasm" -o "dist/$dir/iteris_bg.wasm"
}
threaded_engine pkg-threads +simd128 target/threads
# The same with relaxed SIMD (dist/pkg-threads-relaxed/): the f32 product's microkernel then runs
# on fused multiply-adds (f32x4.relaxed_madd), twice the arithmetic per instruction where the CPU
# has FMA. A module with those instructions does not validate in a browser without relaxed SIMD
# (Chrome and Edge have it since version 114), so the worker loads
# it only where WebAssembly.validate accepts one such instruction, else pkg-threads/.
threaded_engine pkg-threads-relaxed +simd128,+relaxed-simd target/threads-relaxed
cp -r www/. dist/
# The demo: files the page fetches from its own origin when "Try the demo" is pressed.
bash tools/pack_demo.sh dist/demo
# The service worker's offline copy: every file above, under a version that is their hash.
node tools/precache.mjs dist
for pkg in pkg pkg-threads pkg-threads-relaxed; do
  raw=$(stat -c %s dist/$pkg/iteris_bg.wasm)
  gz=$(gzip -9 -c dist/$pkg/iteris_bg.wasm | wc -c)
  echo "dist/$pkg/iteris_bg.wasm: $((raw / 1024)) KiB raw, $((gz / 1024)) KiB gzip"
done
