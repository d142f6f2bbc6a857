"""An independent float64 IterIS reference (ARCHITECTURE.md, "The algorithm"), written densely and plainly: PEFT merges
each adapter into its own copy of the base model, forward hooks collect the inputs of the targeted
modules, and the solve is a dense float64 `torch.linalg.solve`. Shares no code with the Rust engine.

The Jacobi schedule is `iters` solves; `iters=None` iterates to the fixed point (what the sweep
computes in one pass). `forward=torch.float32` runs the forward passes in f32 (statistics and
solves stay float64, the deltas exact): the engine's precision, for tools/weak_ridge.py."""
import json, os

import torch
import transformers
from peft import PeftModel
from safetensors import safe_open

PREFIXES = ("transformer.", "model.", "bert.")


def canonical(name):
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def weight(mod):
    """Weight in linear orientation (out, in)."""
    if isinstance(mod, transformers.pytorch_utils.Conv1D):
        return mod.weight.T
    return mod.weight


def set_weight(mod, w):
    with torch.no_grad():
        if isinstance(mod, transformers.pytorch_utils.Conv1D):
            mod.weight.copy_(w.T)
        else:
            mod.weight.copy_(w)


def adapter_targets(ad):
    with safe_open(os.path.join(ad, "adapter_model.safetensors"), "pt") as f:
        return {k[len("base_model.model."):-len(".lora_A.weight")] for k in f.keys() if k.endswith("lora_A.weight")}


def collect(model, targets, ids):
    """Inputs of each target module, rows = every token of every sample (run one by one: no padding)."""
    rec = {t: [] for t in targets}
    mods = dict(model.named_modules())
    hooks = [mods[t].register_forward_hook(lambda m, inp, out, t=t: rec[t].append(inp[0].reshape(-1, inp[0].shape[-1])))
             for t in targets]
    with torch.no_grad():
        for x in ids:
            model(input_ids=torch.tensor([x]))
    for h in hooks:
        h.remove()
    return {t: torch.cat(v) for t, v in rec.items()}


def load(cls, base_dir, dtype=torch.float64):
    m = cls.from_pretrained(base_dir, attn_implementation="eager").to(dtype).eval()
    return m


def iteris(cls, base_dir, adapter_dirs, tok, samples, max_len=128, alpha1=1e-4, alpha2=1e-4, iters=None, max_iters=60,
           forward=torch.float64):
    base = load(cls, base_dir)
    # Samples longer than the model's positions are cut there too.
    positions = getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions")
    tok.enable_truncation(min(max_len, positions))
    ids = [[tok.encode(t).ids for t in task] for task in samples]
    bmods = dict(base.named_modules())
    per_adapter = [adapter_targets(a) for a in adapter_dirs]
    targets = sorted(set().union(*per_adapter))
    W0 = {t: weight(bmods[t]).detach().clone() for t in targets}

    X, dW = [], []
    for i, ad in enumerate(adapter_dirs):
        m = PeftModel.from_pretrained(load(cls, base_dir), ad).merge_and_unload().double().eval()
        mm = dict(m.named_modules())
        dW.append({t: weight(mm[t]).detach() - W0[t] for t in targets})
        if forward != torch.float64:
            m = PeftModel.from_pretrained(load(cls, base_dir, forward), ad).merge_and_unload().eval()
        X.append({t: x.double() for t, x in collect(m, targets, ids[i]).items()})
    c = [{t: (torch.linalg.norm(W0[t] + dW[i][t]) ** 2 / torch.linalg.norm(X[i][t] @ (W0[t] + dW[i][t]).T) ** 2).item()
          for t in targets} for i in range(len(adapter_dirs))]

    merged = load(cls, base_dir, forward)
    mmods = dict(merged.named_modules())
    Xt = X
    prev = None
    n = iters if iters is not None else max_iters
    change = float("nan")
    for it in range(n):
        delta = {}
        for t in targets:
            d = W0[t].shape[1]
            M = torch.zeros(d, d, dtype=torch.float64)
            N = torch.zeros_like(W0[t])
            for i in range(len(adapter_dirs)):
                C = X[i][t].T @ Xt[i][t]
                G = Xt[i][t].T @ Xt[i][t]
                C = C + alpha1 * torch.linalg.norm(C) * torch.eye(d, dtype=torch.float64)
                G = G + alpha2 * torch.linalg.norm(G) * torch.eye(d, dtype=torch.float64)
                M += c[i][t] * G
                N += c[i][t] * dW[i][t] @ C
            delta[t] = torch.linalg.solve(M.T, N.T).T
        if prev is not None:
            num = sum(torch.linalg.norm(delta[t] - prev[t]) ** 2 for t in targets)
            den = sum(torch.linalg.norm(delta[t]) ** 2 for t in targets)
            change = (num / den).sqrt().item()
        prev = delta
        if iters is None and change < 1e-13:
            break
        for t in targets:
            set_weight(mmods[t], (W0[t] + delta[t]).to(forward))
        Xt = [{t: x.double() for t, x in collect(merged, targets, ids[i]).items()} for i in range(len(adapter_dirs))]
    return {canonical(t): delta[t] for t in targets}, dict(solves=it + 1, last_change=change)


def sweep_inputs(cls, base_dir, adapter_dirs, tok, samples, max_len, every_module=False):
    """What a module-by-module sweep starts from: each task's token ids (cut at the model's
    positions), the modules in forward order (the adapters' targets, or with `every_module` every
    linear module of the layers but the LM head), W0 and each adapter's ΔW_i per module, and each
    adapter's merged model (`models[i]`)."""
    base = load(cls, base_dir)
    positions = getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions")
    tok.enable_truncation(min(max_len, positions))
    ids = [[tok.encode(t).ids for t in task] for task in samples]
    per_adapter = [adapter_targets(a) for a in adapter_dirs]
    linear = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    order = [n for n, m in base.named_modules() if isinstance(m, linear) and not n.endswith("lm_head")]
    targets = [n for n in order if every_module or any(n in p for p in per_adapter)]
    bmods = dict(base.named_modules())
    W0 = {t: weight(bmods[t]).detach().clone() for t in targets}
    dW, models = [], []
    for ad in adapter_dirs:
        m = PeftModel.from_pretrained(load(cls, base_dir), ad).merge_and_unload().double().eval()
        mm = dict(m.named_modules())
        dW.append({t: weight(mm[t]).detach() - W0[t] for t in targets})
        models.append(m)
    return ids, targets, W0, dW, models


def regmean_plus_plus(cls, base_dir, adapter_dirs, tok, samples, max_len=128, scale=0.9):
    """RegMean++ (Nguyen, Tran, Than, Nguyen, "RegMean++: Enhancing Effectiveness and
    Generalization of Regression Mean for Model Merging", 2025, arXiv 2508.03121, eq. 6–7),
    float64, dense and plain: RegMean's closed form, but each module's Grams come from the merged
    model itself, the modules before it already merged, on each task's samples: in forward order,
        G̃_i = S(X̃_iᵀ X̃_i),  ΔW = (Σ_i ΔW_i G̃_i)(Σ_i G̃_i)⁻¹,
    S scaling the off-diagonal entries by `scale` (RegMean's α; 1: none). Every merged model's
    weights are W0 + ΔW with ΔW_i each adapter's (merge_and_unload), as RegMean merges fine-tuned
    weights W_i = W0 + ΔW_i: Σ G̃_i W_i (Σ G̃_i)⁻¹ − W0 is the same ΔW."""
    ids, targets, W0, dW, _ = sweep_inputs(cls, base_dir, adapter_dirs, tok, samples, max_len)

    def S(g):
        return scale * g + (1 - scale) * torch.diag(torch.diagonal(g))

    merged = load(cls, base_dir)
    mmods = dict(merged.named_modules())
    delta = {}
    for t in targets:
        G = [S(x.T @ x) for x in (collect(merged, [t], ids[i])[t] for i in range(len(adapter_dirs)))]
        M = sum(G)
        N = sum(dW[i][t] @ G[i] for i in range(len(adapter_dirs)))
        delta[t] = torch.linalg.solve(M.T, N.T).T
        set_weight(mmods[t], W0[t] + delta[t])
    return {canonical(t): delta[t] for t in targets}


def output_sweep(cls, base_dir, adapter_dirs, tok, samples, max_len=128, alpha1=1e-4, alpha2=1e-4, every_module=False):
    """IterIS with the output objective (`--objective output`), float64, dense and plain: the
    modules are solved one at a time in forward order, each from a full forward pass of the
    merged model with every earlier module's delta in place, minimising
        Σ_i c_i ‖X̃_i (W0 + ΔW)ᵀ − X_i (W0 + ΔW_i)ᵀ‖² + ridges,
    i.e. ΔW = Σ_i c_i [(X_i (W0 + ΔW_i)ᵀ − X̃_i W0ᵀ)ᵀ X̃_i + α1 ‖X_iᵀ X̃_i‖ ΔW_i] · (Σ_i c_i (G_i + α2 ‖G_i‖ I))⁻¹.
    Modules that read one input (q, k, v) see the same X̃ whichever is solved first, so this is
    the engine's stage-by-stage sweep. `every_module`: also every other linear module of the
    layers (not the LM head), whose ΔW_i are 0 (`--modules all`). Returns full-rank deltas."""
    ids, targets, W0, dW, models = sweep_inputs(cls, base_dir, adapter_dirs, tok, samples, max_len, every_module)
    X = [collect(m, targets, ids[i]) for i, m in enumerate(models)]
    c = [{t: (torch.linalg.norm(W0[t] + dW[i][t]) ** 2 / torch.linalg.norm(X[i][t] @ (W0[t] + dW[i][t]).T) ** 2).item()
          for t in targets} for i in range(len(adapter_dirs))]
    merged = load(cls, base_dir)
    mmods = dict(merged.named_modules())
    delta = {}
    for t in targets:
        Xt = [collect(merged, [t], ids[i])[t] for i in range(len(adapter_dirs))]
        d = W0[t].shape[1]
        M = torch.zeros(d, d, dtype=torch.float64)
        N = torch.zeros_like(W0[t])
        for i in range(len(adapter_dirs)):
            G = Xt[i].T @ Xt[i]
            C = X[i][t].T @ Xt[i]
            M += c[i][t] * (G + alpha2 * torch.linalg.norm(G) * torch.eye(d, dtype=torch.float64))
            target = X[i][t] @ (W0[t] + dW[i][t]).T - Xt[i] @ W0[t].T
            N += c[i][t] * (target.T @ Xt[i] + alpha1 * torch.linalg.norm(C) * dW[i][t])
        delta[t] = torch.linalg.solve(M.T, N.T).T
        set_weight(mmods[t], W0[t] + delta[t])
    return {canonical(t): delta[t] for t in targets}
