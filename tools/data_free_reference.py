#!/usr/bin/env python3
"""Independent float64 references of the data-free merges of 2024–25 (issue #30), written densely
from the papers' equations with numpy and sharing no code with the engine, on random LoRA modules:
tests/fixtures/data_free.safetensors, which tests/data_free.rs checks the engine against (1e-6).

Each case is one module (out, in) with adapters of different ranks and scales (some absent from
the module, some with Σr above min(out, in)) and per-adapter weights:
  case{k}.a{t} (r_t, in), case{k}.b{t} (out, r_t)   adapter t's LoRA factors (absent: not targeted)
  case{k}.scale, case{k}.weights                     per adapter (scale 0 where absent)
  case{k}.<method>                                   the merged delta (out, in), float64 → float32

Methods:
  iso-c   Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
          Task-Specific Subspaces", ICML 2025 (arXiv 2502.04959), eq. 6: with the task-arithmetic
          sum M = Σ_t w_t ΔW_t = U Σ Vᵀ, Δ = σ̄ U Vᵀ, σ̄ the mean singular value; over M's nonzero
          spectrum (rank ≤ Σr), as a LoRA sum has no other directions of its own.

    python3 tools/data_free_reference.py
Needs numpy and safetensors.
"""
import os

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "data_free.safetensors")

# (out, in, ranks (None: the adapter does not target the module), weights)
CASES = [
    (12, 10, [2, 3, 4], [1.0, 1.0, 1.0]),
    (16, 24, [4, None, 8], [0.7, 1.3, 1.0]),
    (8, 10, [4, 5, 6], [1.0, 0.5, 2.0]),
]


def deltas(case, rng):
    out, inn, ranks, weights = case
    factors, scales, dense = [], [], []
    for t, r in enumerate(ranks):
        if r is None:
            factors.append(None)
            scales.append(0.0)
            dense.append(np.zeros((out, inn)))
            continue
        a = rng.standard_normal((r, inn)).astype(np.float32)
        b = (rng.standard_normal((out, r)) * (0.5 + t)).astype(np.float32)
        s = float(np.float32(8.0 / r))
        factors.append((a, b))
        scales.append(s)
        dense.append(s * b.astype(np.float64) @ a.astype(np.float64))
    return factors, np.array(scales), dense


def iso_c(dense, weights):
    m = sum(w * d for w, d in zip(weights, dense))
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    k = int((s > 1e-12 * s[0]).sum())
    return s[:k].mean() * u[:, :k] @ vt[:k]


METHODS = {"iso-c": iso_c}


def main():
    rng = np.random.default_rng(30)
    tensors = {}
    for k, case in enumerate(CASES):
        factors, scales, dense = deltas(case, rng)
        weights = np.array(case[3], dtype=np.float32).astype(np.float64)
        for t, f in enumerate(factors):
            if f is not None:
                tensors[f"case{k}.a{t}"], tensors[f"case{k}.b{t}"] = f
        tensors[f"case{k}.scale"] = scales.astype(np.float32)
        tensors[f"case{k}.weights"] = weights.astype(np.float32)
        for name, method in METHODS.items():
            tensors[f"case{k}.{name}"] = method(dense, weights).astype(np.float32)
    save_file(tensors, OUT)
    print(OUT, len(tensors), "tensors")


if __name__ == "__main__":
    main()
