#!/usr/bin/env python3
"""Independent float64 references of the data-free merges of 2024–25 (issue #30), written densely
from the papers' equations with numpy and sharing no code with the engine, on random LoRA modules:
tests/fixtures/data_free.safetensors, which tests/data_free.rs checks the engine against (1e-6).

Each case is one module (out, in) with adapters of different ranks and scales (some absent from
the module, some with Σr above min(out, in)) and per-adapter weights:
  case{k}.a{t} (r_t, in), case{k}.b{t} (out, r_t)   adapter t's LoRA factors (absent: not targeted)
  case{k}.scale, case{k}.weights                     per adapter (scale 0 where absent)
  case{k}.<method>                                   the merged delta (out, in), float64 → float32

PEFT itself (not numpy) gives peft-linear and peft-ties, on the cases of one rank: a module with
each adapter (lora_alpha 8, so scale 8 / r; an absent one targets another module) merged by
`add_weighted_adapter(..., combination_type="linear" | "ties", density=0.5)`, the merged adapter's
scale · B · A read back (so this script needs torch and peft too).

Methods (every SVD over the nonzero spectrum: a LoRA delta has no other directions of its own):
  iso-c   Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
          Task-Specific Subspaces", ICML 2025 (arXiv 2502.04959), eq. 6: with the task-arithmetic
          sum M = Σ_t w_t ΔW_t = U Σ Vᵀ, Δ = σ̄ U Vᵀ, σ̄ the mean singular value.
  iso-cts the same paper, §3.3 / Alg. 1: the top k = int(R · 0.8) of M's R directions, adjusted so
          the remainder splits evenly over the N tasks; each task's top directions of
          ΔW_t − U_k U_kᵀ ΔW_t; U and V stacked and replaced by their orthogonal polar factors;
          the spectrum of everything kept flattened to its mean.
  tsv     Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
          CVPR 2025 (arXiv 2412.00081), Alg. 1: each w_t ΔW_t's top int(min(out, in) / N)
          triplets, U and V stacked and replaced by their polar factors, Σ the tasks' own.
  knots-ties, knots-linear
          Stoica et al., "Model Merging with SVD to Tie the KnOTS", ICLR 2025 (arXiv
          2410.19735), §4: [ΔW_1 … ΔW_N] = U Σ [V_1ᵀ … V_Nᵀ]; Δ = U · merge(w_t Σ V_tᵀ), merge
          TIES (as the engine's `ties`: trim to round(density · size) entries, elect signs, mean
          of the agreeing) or the sum (w_t = 1/N).
  core-ties
          Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space",
          NeurIPS 2025 (arXiv 2509.17786), §3: U_B, V_A the singular vectors of [B_1 … B_N] and
          [A_1; …; A_N]; cores M_t = U_Bᵀ w_t ΔW_t V_A; Δ = U_B TIES(M_t) V_Aᵀ.

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
    # One rank, which PEFT's own linear and TIES merges need.
    (12, 10, [4, 4, 4], [1.0, 0.5, 2.0]),
    (16, 24, [6, None, 6], [0.7, 1.0, 1.3]),
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


ZERO = 1e-10


def nonzero_svd(m, floor=None):
    """U, σ, Vᵀ of m over the singular values above floor (default ZERO × the largest)."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    floor = ZERO * s[0] if floor is None else floor
    k = int((s > floor).sum())
    return u[:, :k], s[:k], vt[:k]


def polar(x):
    """The orthogonal polar factor P Qᵀ of x = P Σ Qᵀ."""
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def iso_c(case, factors, dense, weights):
    u, s, vt = nonzero_svd(sum(w * d for w, d in zip(weights, dense)))
    return s.mean() * u @ vt


def iso_cts(case, factors, dense, weights, common=0.8):
    n = len(dense)
    u, s, vt = nonzero_svd(sum(w * d for w, d in zip(weights, dense)))
    r = len(s)
    k = int(r * common)
    per_task = min(round((r - k) / n), r // n)  # Python's round: half to even
    k = r - per_task * n
    us, ss, vts = [], [], []
    for w, d in zip(weights, dense):
        if not d.any():
            continue
        residual = w * d - u[:, :k] @ (u[:, :k].T @ (w * d))
        ut, st, vtt = nonzero_svd(residual, floor=ZERO * s[0])
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vts.append(vtt[:per_task])
    us.append(u[:, :k]), ss.append(s[:k]), vts.append(vt[:k])
    U, S, Vt = np.concatenate(us, axis=1), np.concatenate(ss), np.concatenate(vts, axis=0)
    return S.mean() * polar(U) @ polar(Vt.T).T


def tsv(case, factors, dense, weights):
    out, inn = dense[0].shape
    share = min(out, inn) // len(dense)
    us, ss, vts = [], [], []
    for w, d in zip(weights, dense):
        if not d.any():
            continue
        u, s, vt = nonzero_svd(w * d)
        us.append(u[:, :share]), ss.append(s[:share]), vts.append(vt[:share])
    U, S, Vt = np.concatenate(us, axis=1), np.concatenate(ss), np.concatenate(vts, axis=0)
    return polar(U) @ np.diag(S) @ polar(Vt.T).T


def ties(tensors, density):
    """The engine's TIES: each tensor trimmed to its round(density · size) largest magnitudes
    (round half away from zero; ties at the threshold kept), signs elected by the trimmed sum (a
    zero sum counts as +), the agreeing nonzero entries averaged."""
    trimmed = []
    for t in tensors:
        keep = min(int(np.floor(t.size * density + 0.5)), t.size)
        if keep == 0:
            trimmed.append(np.zeros_like(t))
            continue
        threshold = np.sort(np.abs(t).ravel())[t.size - keep]
        trimmed.append(np.where(np.abs(t) >= threshold, t, 0.0))
    stacked = np.stack(trimmed)
    sign = np.where(stacked.sum(axis=0) >= 0, 1.0, -1.0)
    agree = (stacked != 0) & (np.sign(stacked) == sign)
    count = agree.sum(axis=0)
    return np.where(count > 0, (stacked * agree).sum(axis=0) / np.maximum(count, 1), 0.0)


def knots(case, factors, dense, weights, merge):
    inn = dense[0].shape[1]
    u, s, vt = nonzero_svd(np.concatenate(dense, axis=1))
    coordinates = [w * np.diag(s) @ vt[:, t * inn:(t + 1) * inn] for t, w in enumerate(weights)]
    return u @ merge(coordinates)


def knots_ties(case, factors, dense, weights):
    return knots(case, factors, dense, weights, lambda c: ties(c, 0.5))


def knots_linear(case, factors, dense, weights):
    return knots(case, factors, dense, weights, lambda c: sum(c))


def core_ties(case, factors, dense, weights):
    present = [(f, w, d) for f, w, d in zip(factors, weights, dense) if f is not None]
    u_b, _, _ = nonzero_svd(np.concatenate([f[1].astype(np.float64) for f, _, _ in present], axis=1))
    _, _, vt_a = nonzero_svd(np.concatenate([f[0].astype(np.float64) for f, _, _ in present], axis=0))
    cores = [u_b.T @ (w * d) @ vt_a.T for _, w, d in present]
    return u_b @ ties(cores, 0.5) @ vt_a


METHODS = {"iso-c": iso_c, "iso-cts": iso_cts, "tsv": tsv, "knots-ties": knots_ties,
           "knots-linear": knots_linear, "core-ties": core_ties}


def peft_merges(case, factors):
    """PEFT's add_weighted_adapter on this case: {"peft-linear": Δ, "peft-ties": Δ}."""
    import torch
    from peft import LoraConfig, get_peft_model

    out, inn, ranks, weights = case

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = torch.nn.Linear(inn, out, bias=False)
            self.other = torch.nn.Linear(inn, out, bias=False)

    names = [f"t{t}" for t in range(len(ranks))]
    model = None
    for t, (r, f) in enumerate(zip(ranks, factors)):
        config = LoraConfig(r=r or ranks[0] or 4, lora_alpha=8, target_modules=["m"] if f else ["other"])
        if model is None:
            model = get_peft_model(Module(), config, adapter_name=names[t])
        else:
            model.add_adapter(names[t], config)
        if f is not None:
            with torch.no_grad():
                model.base_model.model.m.lora_A[names[t]].weight.copy_(torch.from_numpy(f[0]))
                model.base_model.model.m.lora_B[names[t]].weight.copy_(torch.from_numpy(f[1]))
    merged = {}
    for kind in ["linear", "ties"]:
        model.add_weighted_adapter(names, [float(np.float32(w)) for w in weights], f"merged-{kind}",
                                   combination_type=kind, density=0.5)
        m = model.base_model.model.m
        a = m.lora_A[f"merged-{kind}"].weight.detach().double().numpy()
        b = m.lora_B[f"merged-{kind}"].weight.detach().double().numpy()
        merged[f"peft-{kind}"] = m.scaling[f"merged-{kind}"] * b @ a
    return merged


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
            tensors[f"case{k}.{name}"] = method(case, factors, dense, weights).astype(np.float32)
        if len({r for r in case[2] if r is not None}) == 1:
            for name, delta in peft_merges(case, factors).items():
                tensors[f"case{k}.{name}"] = delta.astype(np.float32)
    save_file(tensors, OUT)
    print(OUT, len(tensors), "tensors")


if __name__ == "__main__":
    main()
