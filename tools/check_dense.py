#!/usr/bin/env python3
"""transformers loads a merged model written with `--dense` and it computes what the base with the
merge's PEFT adapter computes:

    python3 tools/check_dense.py BASE_DIR OUT [TEXT ...]

BASE_DIR: the Hugging Face folder of the base (for a GGUF base, the folder transformers writes from
it, e.g. target/real/smollm2-gguf/hf); OUT: the merge's --out (OUT/dense and the PEFT adapter in
OUT). Prints each text's relative logit difference and the adapter's own effect, for scale.
Needs torch, transformers, peft.
"""
import sys

import numpy as np
import torch
import transformers
from peft import PeftModel

base_dir, out = sys.argv[1], sys.argv[2]
texts = sys.argv[3:] or ["The capital of France is Paris.", "def add(a, b):\n    return a + b"]
tok = transformers.AutoTokenizer.from_pretrained(base_dir)
dense_tok = transformers.AutoTokenizer.from_pretrained(f"{out}/dense")
base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
peft = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out).eval()
dense = transformers.AutoModelForCausalLM.from_pretrained(f"{out}/dense", dtype=torch.float32).eval()
worst = 0.0
for t in texts:
    ids = tok(t).input_ids
    assert dense_tok(t).input_ids == ids, "the dense folder's tokenizer differs"
    with torch.no_grad():
        x = torch.tensor([ids])
        b, p, d = (m(x).logits[0].numpy() for m in (base, peft, dense))
    e = float(np.linalg.norm(d - p) / np.linalg.norm(p))
    worst = max(worst, e)
    print(f"{len(ids):3d} tokens: dense vs base + PEFT adapter {e:.1e} (the adapter moves the logits by "
          f"{np.linalg.norm(p - b) / np.linalg.norm(p):.1e})")
if worst > 1e-4:
    raise SystemExit("the dense model differs from the base with the adapter")
