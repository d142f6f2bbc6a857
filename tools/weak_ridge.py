#!/usr/bin/env python3
"""How far an f32 forward pass puts IterIS from the float64 reference, per fixture and ridge:
the reference itself (tools/iteris_reference.py) with its forward passes in f32 and everything
else float64, against the float64 merges the tests compare the engine with
(tests/fixtures/*/expected_*.safetensors). The figure is the worst module's ‖ΔW − ΔW_ref‖/‖ΔW_ref‖,
as tests/merge_reference.rs measures it: what any f32 pipeline can be held to.

    python3 tools/weak_ridge.py [fixture ...]      (needs torch, transformers, peft)"""
import json, os, sys

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(__file__))
import iteris_reference as ref
from make_fixtures import ARCHS

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def samples(d, i):
    for ext in ("txt", "jsonl"):
        p = os.path.join(d, f"samples{i}.{ext}")
        if os.path.exists(p):
            lines = [l for l in open(p).read().splitlines() if l.strip()]
            return [json.loads(l)["text"] for l in lines] if ext == "jsonl" else lines
    raise FileNotFoundError(f"{d}: samples{i}")


def worst(deltas, expected):
    return max(((deltas[k].float() - v).norm() / v.norm()).item() for k, v in expected.items())


if __name__ == "__main__":
    names = sys.argv[1:] or list(ARCHS)
    print(f"{'fixture':10} {'ridge':>6} {'f32 forward vs float64':>24}")
    for name in names:
        d = os.path.join(FIXTURES, name)
        base = os.path.join(d, "base")
        tok = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
        texts = [samples(d, i) for i in range(3)]
        for alpha, key in [(1e-4, "sweep_a1e-4"), (1e-7, "sweep_a1e-7")]:
            deltas, _ = ref.iteris(ARCHS[name]["cls"], base, [os.path.join(d, f"adapter{i}") for i in range(3)], tok, texts,
                                   max_len=128, alpha1=alpha, alpha2=alpha, forward=torch.float32)
            print(f"{name:10} {alpha:6.0e} {worst(deltas, load_file(os.path.join(d, f'expected_{key}.safetensors'))):24.2e}",
                  flush=True)
