#!/usr/bin/env python3
"""Check that Hugging Face PEFT loads a merged adapter unmodified and that base + adapter gives the
same outputs as base weights + ΔW* (ΔW* = lora_B @ lora_A read straight from the safetensors, scale 1).

    python3 tools/check_peft_load.py BASE_DIR MERGED_ADAPTER_DIR [text ...]"""
import json, os, sys
import torch, transformers
from peft import PeftModel
from safetensors.torch import load_file

base_dir, ad = sys.argv[1], sys.argv[2]
texts = sys.argv[3:] or ["the cat sat on the mat", "one two three four"]
cfg = json.load(open(os.path.join(base_dir, "config.json")))
cls = transformers.AutoModel if cfg["model_type"] == "bert" else transformers.AutoModelForCausalLM
tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(base_dir, "tokenizer.json"))


def out(m, ids):
    o = m(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


with torch.no_grad():
    peft_model = PeftModel.from_pretrained(cls.from_pretrained(base_dir).double(), ad).eval()
    dense = cls.from_pretrained(base_dir).double().eval()
    mods = dict(dense.named_modules())
    w = load_file(os.path.join(ad, "adapter_model.safetensors"))
    n = 0
    for k in w:
        if k.endswith("lora_A.weight"):
            path = k[len("base_model.model."):-len(".lora_A.weight")]
            delta = w[k.replace("lora_A", "lora_B")].double() @ w[k].double()
            m = mods[path]
            if isinstance(m, transformers.pytorch_utils.Conv1D):
                delta = delta.T
            m.weight += delta
            n += 1
    worst = 0.0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        a, b = out(peft_model, ids), out(dense, ids)
        worst = max(worst, ((a - b).norm() / b.norm()).item())
print(f"PEFT loaded {n} LoRA modules; base+adapter vs base+ΔW*: max relative difference {worst:.2e}")
sys.exit(0 if worst < 1e-6 else 1)
