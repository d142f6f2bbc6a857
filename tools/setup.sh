#!/usr/bin/env bash
# Install, where missing, what building the page and running the tests need. Idempotent.
#   setup.sh web   the page's build tools: the wasm32 Rust target, the wasm-bindgen CLI of the exact
#                  version Cargo.lock pins, and the npm packages (binaryen's wasm-opt, playwright-core)
#   setup.sh       (all) also Debian's Chromium (browser tests) and Mesa's software Vulkan driver
#                  (the GPU backend's tests without a GPU); these need apt and root (or sudo)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (install Rust with rustup)"; exit 1; }
command -v npm >/dev/null || { echo "Node.js and npm are required"; exit 1; }

rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
# The threaded engine needs std rebuilt with atomics (-Z build-std): a pinned nightly and its source.
nightly=$(cat tools/nightly-toolchain)
if ! rustup run "$nightly" rustc --version >/dev/null 2>&1 || [ ! -d "$(rustup run "$nightly" rustc --print sysroot)/lib/rustlib/src/rust/library" ]; then
  rustup toolchain install "$nightly" --profile minimal -c rust-src -t wasm32-unknown-unknown
fi
want=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
have=$(wasm-bindgen --version 2>/dev/null | cut -d' ' -f2 || true)
if [ "$have" != "$want" ]; then
  echo "installing wasm-bindgen-cli $want (Cargo.lock's wasm-bindgen; found: ${have:-none})"
  cargo install --quiet wasm-bindgen-cli --version "$want"
fi
if [ ! -x node_modules/.bin/wasm-opt ] || [ ! -f node_modules/playwright-core/package.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

if [ "${1:-all}" = all ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  pkgs=""
  [ -x /usr/bin/chromium ] || pkgs="$pkgs chromium"
  ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || pkgs="$pkgs mesa-vulkan-drivers libvulkan1"
  if [ -n "$pkgs" ]; then
    $SUDO apt-get update -qq || true
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
  fi
fi
