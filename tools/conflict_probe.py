#!/usr/bin/env python3
"""IterIS++'s conflict-aware sample reweighting (DCS), probed at sample granularity on a merge's
inputs: each calibration sample s (prompt + its own adapter's greedy answer, as self-calibration
makes it) gets the conflict V_s = mean over its tokens of the variance, across all adapters, of
the next-token log-probabilities (each adapter applied alone to the same tokens); DCS weighs a
sample exp(-V_s / sigma^2). Weights of 0 or 1 need no engine change: this writes, per task, the
samples with the `--drop` most conflicting fraction removed, for `iteris compare` to merge.

    python3 tools/conflict_probe.py BASE OUT_DIR --drop 0.2 ADAPTER:SAMPLES.txt ...

Needs torch, transformers, peft.
"""
import argparse, os

import torch
import transformers
from peft import PeftModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("tasks", nargs="+", help="ADAPTER_DIR:SAMPLES.txt")
    ap.add_argument("--drop", type=float, default=0.2)
    ap.add_argument("--max-new", type=int, default=32)
    a = ap.parse_args()
    tok = transformers.AutoTokenizer.from_pretrained(a.base)
    eos = tok.eos_token_id
    pairs = [t.split(":") for t in a.tasks]
    models = [PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32), d).eval()
              for d, _ in pairs]
    os.makedirs(a.out, exist_ok=True)
    nl = {i for i in range(len(tok)) if "\n" in tok.decode([i])}
    for k, (adapter, samples) in enumerate(pairs):
        prompts = [l for l in open(samples).read().splitlines() if l.strip()]
        scored = []
        with torch.no_grad():
            for p in prompts:
                ids = tok(p, return_tensors="pt").input_ids
                for _ in range(a.max_new):  # self-calibration: the task's adapter's greedy answer
                    nxt = models[k](input_ids=ids).logits[0, -1].argmax().item()
                    if nxt == eos or nxt in nl:
                        break
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
                lp = torch.stack([m(input_ids=ids).logits[0].log_softmax(-1) for m in models])  # (N, T, V)
                v = lp.var(dim=0).sum(-1).mean().item()
                scored.append((v, p))
        keep = sorted(scored)[: max(1, round(len(scored) * (1 - a.drop)))]
        kept = set(p for _, p in keep)
        name = os.path.basename(samples)
        with open(os.path.join(a.out, name), "w") as f:
            f.write("".join(p + "\n" for p in prompts if p in kept))
        vs = sorted(v for v, _ in scored)
        print(f"{name}: conflict V_s from {vs[0]:.3g} to {vs[-1]:.3g}; kept {len(kept)} of {len(prompts)}")


if __name__ == "__main__":
    main()
