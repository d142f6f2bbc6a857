#!/usr/bin/env bash
# Build the page (dist/) and serve it on http://127.0.0.1:${PORT:-8080}/ . "Try the demo" there
# merges the bundled example with no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/build_web.sh
exec node tools/serve.mjs dist "${PORT:-8080}"
