#!/usr/bin/env python3
"""Reference for distillation refinement's objective and gradient (`merge::refine`), by PyTorch's
autograd in float64, on three decoder fixtures (llama; gemma2: soft-caps, sliding windows,
out-norms; phi3: fused q/k/v and gate/up).

For each fixture: a student LoRA of rank 2 (random, seeded) at every module the fixture's
adapters target; the teachers are the three adapters, each on the first two samples of its task.

    L = Σ_i mean over task i's token rows of KL(p_i ‖ q) / 3      (λ_i = 1)

with p_i the next-token distribution of base + adapter i, q the student's (base + its LoRA).
Writes tests/fixtures/<arch>/refine.safetensors (the student's factors a.<module> (r, in) and
b.<module> (out, r), their gradients ga.<module>, gb.<module>, and loss (1, 1)) and
refine_ids.json (the token ids of each task's samples, as the tokenizer gives them).

    python3 tools/make_refine_fixture.py
Needs torch, transformers, peft, tokenizers (pip).
"""
import json, os

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
RANK = 2


def samples(d, i, n=2):
    txt = os.path.join(d, f"samples{i}.txt")
    if os.path.exists(txt):
        return [l.rstrip("\n") for l in open(txt) if l.strip()][:n]
    return [json.loads(l)["text"] for l in open(os.path.join(d, f"samples{i}.jsonl")) if l.strip()][:n]


def base_model(d):
    m = AutoModelForCausalLM.from_pretrained(os.path.join(d, "base"), attn_implementation="eager")
    return m.double().eval()


def logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0]


def main(arch):
    d = os.path.join(ROOT, arch)
    tok = Tokenizer.from_file(os.path.join(d, "base", "tokenizer.json"))
    ids = [[tok.encode(s).ids for s in samples(d, i)] for i in range(3)]
    # The teachers' log-probabilities, once.
    teachers = []
    for i in range(3):
        m = PeftModel.from_pretrained(base_model(d), os.path.join(d, f"adapter{i}")).double().eval()
        with torch.no_grad():
            teachers.append([torch.log_softmax(logits(m, s), -1) for s in ids[i]])
    kinds = sorted({k for i in range(3) for k in json.load(open(os.path.join(d, f"adapter{i}", "adapter_config.json")))["target_modules"]})
    student = get_peft_model(base_model(d), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=kinds, lora_dropout=0.0))
    student = student.double()
    rng = np.random.default_rng(7)
    params = {}
    for name, p in student.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.tensor(rng.uniform(-0.3, 0.3, p.shape)))
            p.requires_grad_(True)
            params[name] = p
    loss = 0.0
    for i in range(3):
        rows = sum(len(s) for s in ids[i])
        for s, lp in zip(ids[i], teachers[i]):
            lq = torch.log_softmax(logits(student, s), -1)
            loss = loss + (lp.exp() * (lp - lq)).sum() / (rows * 3)
    loss.backward()
    out = {"loss": loss.detach().reshape(1, 1).float()}
    prefix = "base_model.model.model."
    for name, p in params.items():
        module = name[len(prefix):].split(".lora_")[0]
        kind = "a" if ".lora_A." in name else "b"
        out[f"{kind}.{module}"] = p.detach().float().contiguous()
        out[f"g{kind}.{module}"] = p.grad.detach().float().contiguous()
    save_file(out, os.path.join(d, "refine.safetensors"))
    json.dump(ids, open(os.path.join(d, "refine_ids.json"), "w"))
    print(arch, "loss", float(loss), "tensors", len(out))


if __name__ == "__main__":
    torch.manual_seed(0)
    for arch in ["llama", "gemma2", "phi3"]:
        main(arch)
