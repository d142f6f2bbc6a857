#!/usr/bin/env bash
# Every test: installs what is missing (tools/setup.sh: wasm target, wasm-bindgen CLI, npm
# packages, Chromium, Mesa's software Vulkan driver), then runs the Rust tests, which include the
# GPU backend on the software driver and the page end to end in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# Vulkan loaders want a runtime directory; CI machines may not set one.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cargo test --release "$@"
