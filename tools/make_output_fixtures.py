#!/usr/bin/env python3
"""float64 references of IterIS with the output objective for tests/merge_reference.rs:
tests/fixtures/ARCH/expected_output_a1e-4.safetensors (the adapters' modules) and
expected_output_all_a1e-4.safetensors (every linear module of the layers), full-rank deltas
from `iteris_reference.output_sweep`, on the fixtures tools/make_fixtures.py made; and of
RegMean++ (`iteris_reference.regmean_plus_plus`, off-diagonal scale 0.9):
expected_regmeanpp.safetensors.

    python3 tools/make_output_fixtures.py [ARCH ...]     # default: gpt2 llama qwen2

Needs torch, transformers, peft."""
import json, os, sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import iteris_reference as ref  # noqa: E402
import make_fixtures  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(HERE), "tests", "fixtures")


def read_samples(path):
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    return [json.loads(l)["text"] for l in lines] if path.endswith(".jsonl") else lines


def build(arch):
    d = os.path.join(FIXTURES, arch)
    cls = make_fixtures.ARCHS[arch]["cls"]
    adapters = [os.path.join(d, f"adapter{i}") for i in range(3)]
    samples = []
    for i in range(3):
        name = next(f for f in os.listdir(d) if f.startswith(f"samples{i}."))
        samples.append(read_samples(os.path.join(d, name)))
    for key, every in [("output_a1e-4", False), ("output_all_a1e-4", True)]:
        tok = Tokenizer.from_file(os.path.join(d, "base", "tokenizer.json"))
        deltas = ref.output_sweep(cls, os.path.join(d, "base"), adapters, tok, samples, every_module=every)
        save_file({k: v.float().contiguous() for k, v in deltas.items()}, os.path.join(d, f"expected_{key}.safetensors"))
        print(arch, key, len(deltas), "modules")
    tok = Tokenizer.from_file(os.path.join(d, "base", "tokenizer.json"))
    deltas = ref.regmean_plus_plus(cls, os.path.join(d, "base"), adapters, tok, samples)
    save_file({k: v.float().contiguous() for k, v in deltas.items()}, os.path.join(d, "expected_regmeanpp.safetensors"))
    print(arch, "regmeanpp", len(deltas), "modules")


if __name__ == "__main__":
    for a in sys.argv[1:] or ["gpt2", "llama", "qwen2"]:
        build(a)
