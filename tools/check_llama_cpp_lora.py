#!/usr/bin/env python3
"""llama.cpp itself runs a merged adapter written with `--gguf`: loads an F32 GGUF of the base with
OUT/adapter.gguf (llama-cpp-python, which builds llama.cpp from source) and compares its logits with
transformers + PEFT running the merge's PEFT adapter from the same OUT on the same base.

    python3 tools/real_gguf.py                      # the base (target/real/smollm2-gguf)
    python3 tools/check_llama_cpp_lora.py [DIR]     # DIR: default target/real/smollm2-gguf

It writes DIR/model-f32.gguf (the GGUF's tensors dequantized, its metadata as it is), merges the
adapters of DIR with `target/release/iteris merge --gguf` into DIR/merged, and prints each
sample's relative logit error of llama.cpp against transformers, with and without the adapter (the
adapter's own effect, for scale). Needs torch, transformers, peft, gguf, llama-cpp-python
(`pip install llama-cpp-python`) and target/release/iteris.
"""
import os
import subprocess
import sys

import gguf
import numpy as np
import torch
import transformers
from llama_cpp import Llama
from peft import PeftModel

HERE = os.path.dirname(os.path.abspath(__file__))
D = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "target", "real", "smollm2-gguf"))


def f32_copy(src, dst):
    """The GGUF at src with every tensor dequantized to F32 and the same metadata."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        t = field.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            w.add_array(key, field.contents())
        else:
            w.add_key_value(key, field.contents(), t)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    f32 = os.path.join(D, "model-f32.gguf")
    if not os.path.exists(f32):
        f32_copy(os.path.join(D, "model.gguf"), f32)
    out = os.path.join(D, "merged")
    iteris = os.path.join(HERE, "..", "target", "release", "iteris")
    args = [iteris, "merge", "--base", os.path.join(D, "hf"), "--out", out, "--force", "--gguf", "--backend", "cpu"]
    for i in range(2):
        args += ["--adapter", os.path.join(D, f"adapter{i}"), "--samples", os.path.join(D, f"samples{i}.txt")]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)

    hf = os.path.join(D, "hf")
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    base = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), out).eval()
    plain = Llama(model_path=f32, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    lora = Llama(model_path=f32, lora_path=os.path.join(out, "adapter.gguf"), n_ctx=256, logits_all=True,
                 verbose=False, n_threads=2)
    worst = 0.0
    for line in open(os.path.join(D, "samples1.txt")).read().splitlines()[:3]:
        ids = tok(line).input_ids
        with torch.no_grad():
            want_base = base(torch.tensor([ids])).logits[0].numpy()
            want = peft(torch.tensor([ids])).logits[0].numpy()
        got = []
        for llm in (plain, lora):
            llm.reset()
            llm.eval(ids)
            got.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        e_base, e = rel(got[0], want_base), rel(got[1], want)
        effect = rel(want, want_base)
        worst = max(worst, e)
        print(f"{len(ids):3d} tokens: llama.cpp vs transformers, base {e_base:.1e}, with the merged LoRA {e:.1e} "
              f"(the LoRA moves the logits by {effect:.1e})")
    print(f"worst with the LoRA: {worst:.1e}")
    if worst > 1e-3:
        raise SystemExit("llama.cpp's logits with adapter.gguf differ from transformers + PEFT")


if __name__ == "__main__":
    main()
