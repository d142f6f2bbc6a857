#!/usr/bin/env python3
"""mlx-lm itself reads the MLX adapters iteris reads and writes (`formats::mlx`), on a real model.

    python3 tools/real_gguf.py              # the base: target/real/smollm2-gguf/hf (SmolLM2-135M)
    pip install "mlx[cpu]" mlx-lm            # MLX runs on Linux's CPU too
    python3 tools/check_mlx.py [DIR]         # DIR: default target/real/smollm2-gguf

In: mlx-lm makes two LoRAs on DIR/hf its own way (`linear_to_lora_layers`: lora_a (in, r), lora_b
(r, out), a plain `scale`, the last `num_layers` layers), of different ranks and scales, random B,
and saves them as mlx-lm does (`adapters.safetensors` + `adapter_config.json`); a third holds both
side by side (rank r1 + r2, each B times its scale over the common one), which mlx-lm computes as
their sum. iteris merges the two MLX folders with `--method cat` (the exact sum) into a PEFT adapter
and, with `--mlx`, an MLX one. transformers + PEFT on the PEFT output, and mlx-lm on the MLX output,
must give mlx-lm's logits with the side-by-side adapter within f32 noise: the adapters were read as
mlx-lm reads them and written as it reads them.

Out: the IterIS merge of DIR's PEFT adapters written with `--mlx`: mlx-lm with OUT/mlx against
transformers + PEFT with OUT.

Prints each relative logit error and the adapters' own effect, for scale. Needs mlx, mlx-lm,
torch, transformers, peft and target/release/iteris.
"""
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import torch
import transformers
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
from peft import PeftModel

HERE = os.path.dirname(os.path.abspath(__file__))
D = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "target", "real", "smollm2-gguf"))
ITERIS = os.path.join(HERE, "..", "target", "release", "iteris")
KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
NUM_LAYERS = 8


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def mlx_logits(hf, adapter, ids):
    model, _ = mlx_load(hf)
    if adapter is not None:
        model = load_adapters(model, adapter)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def torch_logits(hf, peft_dir, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    if peft_dir is not None:
        model = PeftModel.from_pretrained(model, peft_dir)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def save_mlx(folder, weights, rank, scale):
    """An MLX adapter folder as mlx-lm's trainer writes one."""
    os.makedirs(folder, exist_ok=True)
    mx.save_safetensors(os.path.join(folder, "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": NUM_LAYERS,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": KEYS}}
    json.dump(config, open(os.path.join(folder, "adapter_config.json"), "w"), indent=2)


def make_mlx_adapters(hf, out):
    """Two mlx-lm LoRAs (ranks 4 and 8, scales 20 and 5) and the one holding both side by side."""
    made = []
    for k, (rank, scale) in enumerate([(4, 20.0), (8, 5.0)]):
        mx.random.seed(11 + k)
        model, _ = mlx_load(hf)
        model.freeze()
        linear_to_lora_layers(model, NUM_LAYERS, {"rank": rank, "scale": scale, "dropout": 0.0, "keys": KEYS})
        weights = dict(tree_flatten(model.trainable_parameters()))
        for name in list(weights):
            if name.endswith("lora_b"):  # mlx-lm starts B at zero; give it a trained-looking one
                weights[name] = mx.random.normal(weights[name].shape) * 0.02
        mx.eval(weights)
        save_mlx(os.path.join(out, f"mlx{k}"), weights, rank, scale)
        made.append((weights, scale))
    common = 1.0
    both = {}
    for name in made[0][0]:
        parts = [w[name] * (s / common if name.endswith("lora_b") else 1.0) for w, s in made]
        both[name] = mx.concatenate(parts, axis=1 if name.endswith("lora_a") else 0)
    mx.eval(both)
    save_mlx(os.path.join(out, "mlx-both"), both, 12, common)


def mlx_readable(src, dst):
    """src with config.json's rope base also at top level (`rope_theta`): transformers 5 writes it
    only inside `rope_parameters`, which mlx-lm's llama does not read (it would turn at 10000)."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f != "config.json" and not os.path.exists(os.path.join(dst, f)):
            os.symlink(os.path.join(os.path.abspath(src), f), os.path.join(dst, f))
    config = json.load(open(os.path.join(src, "config.json")))
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    json.dump(config, open(os.path.join(dst, "config.json"), "w"), indent=2)


def main():
    work = os.path.join(D, "mlx-check")
    hf = os.path.join(work, "hf")
    mlx_readable(os.path.join(D, "hf"), hf)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    lines = open(os.path.join(D, "samples1.txt")).read().splitlines()[:3]
    worst = 0.0

    # In: mlx-lm's own adapters, summed exactly by iteris.
    make_mlx_adapters(hf, work)
    out = os.path.join(work, "cat")
    args = [ITERIS, "merge", "--base", hf, "--out", out, "--force", "--mlx", "--method", "cat", "--backend", "cpu"]
    for k in range(2):
        args += ["--adapter", os.path.join(work, f"mlx{k}"), "--samples", os.path.join(D, f"samples{k}.txt")]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    for line in lines:
        ids = tok(line).input_ids
        want = mlx_logits(hf, os.path.join(work, "mlx-both"), ids)
        base = mlx_logits(hf, None, ids)
        e_peft = rel(torch_logits(hf, out, ids), want)
        e_mlx = rel(mlx_logits(hf, os.path.join(out, "mlx"), ids), want)
        worst = max(worst, e_peft, e_mlx)
        print(f"in  {len(ids):3d} tokens: mlx-lm's two adapters summed by iteris: transformers + PEFT {e_peft:.1e}, "
              f"mlx-lm with OUT/mlx {e_mlx:.1e} (the adapters move the logits by {rel(want, base):.1e})")

    # Out: the IterIS merge of DIR's PEFT adapters, run by mlx-lm.
    out = os.path.join(work, "iteris")
    args = [ITERIS, "merge", "--base", hf, "--out", out, "--force", "--mlx", "--backend", "cpu"]
    for k in range(2):
        args += ["--adapter", os.path.join(D, f"adapter{k}"), "--samples", os.path.join(D, f"samples{k}.txt")]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    for line in lines:
        ids = tok(line).input_ids
        want = torch_logits(hf, out, ids)
        e = rel(mlx_logits(hf, os.path.join(out, "mlx"), ids), want)
        effect = rel(want, torch_logits(hf, None, ids))
        worst = max(worst, e)
        print(f"out {len(ids):3d} tokens: mlx-lm with OUT/mlx against transformers + PEFT with OUT {e:.1e} "
              f"(the merge moves the logits by {effect:.1e})")
    print(f"worst: {worst:.1e}")
    if worst > 1e-4:
        raise SystemExit("mlx-lm's logits differ from what the adapters compute")


if __name__ == "__main__":
    main()
