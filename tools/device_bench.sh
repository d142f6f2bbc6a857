#!/usr/bin/env bash
# GPU measurements on a real GPU machine (the project's device machine: an NVIDIA H200, Vulkan),
# as one prepared run. Two halves:
#
#   bash tools/device_bench.sh prepare   here: build the bench binaries (x86-64, stripped) into
#                                        .device/ and download the Vulkan loader into .gl/
#   bash tools/device_bench.sh run       there, with .device and .gl carried: matmul GFLOP/s at
#                                        1024–4096 and the GPT-2-small-shaped merge (sweep, Jacobi-5)
#                                        on the GPU and the CPU backend, then the PyTorch reference
#                                        of the same work on CUDA; everything also written to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    mkdir -p .device .gl
    for bench in matmul merge; do
        exe=$(cargo bench --bench "$bench" --no-run --message-format=json 2>/dev/null |
            sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
        strip -o ".device/$bench" "$exe"
    done
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    mkdir -p /tmp/amd64/partial
    apt-get $o update -qq
    (cd .gl && apt-get $o download libvulkan1 >/dev/null)
    cp tools/bench_reference.py .device/
    du -sh .device .gl
    ;;
run)
    out=${OUT:-target/device}
    mkdir -p "$out"
    if ! ldconfig -p | grep -q libvulkan; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
    export XDG_RUNTIME_DIR=/tmp/xdg && mkdir -p "$XDG_RUNTIME_DIR"
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt" || true
    ./.device/matmul gpu --sizes 1024,2048,4096 2>&1 | tee "$out/matmul.txt"
    ./.device/merge gpu sweep jacobi5 2>&1 | tee "$out/merge_gpu.txt"
    ./.device/merge sweep jacobi5 2>&1 | tee "$out/merge_cpu.txt"
    python3 .device/bench_reference.py 5 cuda 2>&1 | tee "$out/pytorch.txt"
    ./.device/matmul cpu --sizes 1024,4096 2>&1 | tee -a "$out/matmul.txt"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
