#!/usr/bin/env python3
"""PyTorch reference of the same work as `cargo bench --bench merge`: the released IterIS pipeline
(f32 features and Grams, f64 solve, Jacobi schedule with full forward passes including the LM head)
on the GPT-2-small shape: random weights, d=768, 12 layers, LoRA r=8 on c_attn, 3 tasks × 32
samples × 128 tokens.   python3 tools/bench_reference.py [iters=5] [device=cpu]"""
import sys, time
import torch, transformers

iters = int(sys.argv[1]) if len(sys.argv) > 1 else 5
dev = sys.argv[2] if len(sys.argv) > 2 else "cpu"
torch.manual_seed(0)
T, S, L, R, D = 3, 32, 128, 8, 768
cfg = transformers.GPT2Config(n_embd=D, n_layer=12, n_head=12)
model = transformers.GPT2LMHeadModel(cfg).eval().to(dev)
mods = [b.attn.c_attn for b in model.transformer.h]
W0 = [m.weight.detach().T.clone() for m in mods]  # (out, in)
dW = [[(2.0 * torch.randn(3 * D, R, device=dev) * 0.05) @ (torch.randn(R, D, device=dev) * 0.05) for _ in mods] for _ in range(T)]
ids = [torch.randint(0, cfg.vocab_size, (S, L), device=dev) for _ in range(T)]


def set_weights(deltas):
    with torch.no_grad():
        for m, w, d in zip(mods, W0, deltas):
            m.weight.copy_((w + d).T)


def features(x):
    rec = [None] * len(mods)
    hs = [m.register_forward_hook(lambda m, i, o, k=k: rec.__setitem__(k, i[0].reshape(-1, D))) for k, m in enumerate(mods)]
    with torch.no_grad():
        model(input_ids=x)
    for h in hs:
        h.remove()
    return rec


def sync():
    if dev != "cpu":
        torch.cuda.synchronize()


sync()
t0 = time.time()
X = []
for i in range(T):
    set_weights(dW[i])
    X.append(features(ids[i]))
c = [[(torch.linalg.norm(W0[k] + dW[i][k]) ** 2 / torch.linalg.norm(X[i][k] @ (W0[k] + dW[i][k]).T) ** 2).item() for k in range(len(mods))] for i in range(T)]
Xt = X
a = 1e-4
for it in range(iters):
    merged = []
    for k in range(len(mods)):
        M = torch.zeros(D, D, dtype=torch.float64, device=dev)
        N = torch.zeros(3 * D, D, dtype=torch.float64, device=dev)
        for i in range(T):
            C = (X[i][k].T @ Xt[i][k]).double()
            G = (Xt[i][k].T @ Xt[i][k]).double()
            C += a * torch.linalg.norm(C) * torch.eye(D, dtype=torch.float64, device=dev)
            G += a * torch.linalg.norm(G) * torch.eye(D, dtype=torch.float64, device=dev)
            M += c[i][k] * G
            N += c[i][k] * dW[i][k].double() @ C
        merged.append(torch.linalg.solve(M.T, N.T).T.float())
    if it + 1 < iters:
        set_weights(merged)
        Xt = [features(ids[i]) for i in range(T)]
sync()
print(f"pytorch {dev} jacobi{iters}: {time.time() - t0:.2f} s (threads {torch.get_num_threads()})")
