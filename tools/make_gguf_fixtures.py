"""GGUF fixtures for tests/gguf.rs, made with the `gguf` package (llama.cpp's own writer) and checked
against what the package and transformers read from them:

  quants.gguf / quants.safetensors
      one (4, 512) tensor of each ggml type the tool reads, its blocks random bytes with finite
      scales, and each as the `gguf` package dequantizes it (float32).
  llama.gguf / llama.safetensors, qwen2.gguf / qwen2.safetensors
      tests/fixtures/<arch>/base as llama.cpp's converter writes it (llama: q/k rows permuted for its rope;
      qwen2: q/k/v biases),
      tensors in Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16 and BF16, the byte-level BPE tokenizer as
      tokenizer.ggml.*; and what transformers reads from that file: token ids of SAMPLES
      ("ids.k", as float32) and the final hidden states of each ("hidden.k", float32 model).

    python3 tools/make_gguf_fixtures.py
Needs numpy, gguf, torch, transformers.
"""
import json
import os

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "gguf")
SAMPLES = ["The capital of France is Paris.", "def add(a, b):\n    return a + b  # 42"]


def quants():
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(os.path.join(OUT, "quants.gguf"), "llama")
    expected = {}
    for t in [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]:
        shape = (4, 512)
        if t in (T.F32, T.F16, T.BF16):
            raw = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), t)
        else:
            block, size = gguf.GGML_QUANT_SIZES[t]
            blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // block, size), dtype=np.uint8)
            # Every f16 scale finite and modest: where each block keeps its f16 fields.
            scale_at = {T.Q6_K: [208]}.get(t, [0, 2] if t in (T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K) else [0])
            for at in scale_at:
                scales = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16)
                blocks[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
            raw = blocks.reshape(shape[0], -1)
        w.add_tensor(t.name, raw, raw_dtype=t)
        expected[t.name] = gguf.quants.dequantize(raw, t).astype(np.float32).reshape(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(expected, os.path.join(OUT, "quants.safetensors"))


def permute(w, n_head):
    """llama.cpp's LlamaModel.permute: each head's two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def decoder(arch):
    """tests/fixtures/<arch>/base as llama.cpp's converter writes it (q/k permuted for llama)."""
    base = os.path.join(HERE, "..", "tests", "fixtures", arch, "base")
    cfg = json.load(open(os.path.join(base, "config.json")))
    tok = json.load(open(os.path.join(base, "tokenizer.json")))
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    path = os.path.join(OUT, f"{arch}.gguf")
    w = gguf.GGUFWriter(path, arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in special else 1 for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
    if cfg.get("eos_token_id") is not None:
        w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    modules = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
    types = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.F16, T.BF16]
    k = 0
    for name, v in sd.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # llama.cpp's converter leaves a tied head out
        if name in names:
            g = names[name]
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            mod, suffix = rest.rsplit(".", 1)
            g = f"blk.{layer}.{modules[mod]}.{suffix}"
        if arch == "llama" and g.endswith("attn_q.weight"):
            v = permute(v, heads)
        elif arch == "llama" and g.endswith("attn_k.weight"):
            v = permute(v, kv)
        if v.ndim == 1:
            w.add_tensor(g, v.astype(np.float32))
        else:
            t = types[k % len(types)]
            k += 1
            w.add_tensor(g, gguf.quants.quantize(v.astype(np.float32), t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # What transformers reads from the file.
    m = transformers.AutoModelForCausalLM.from_pretrained(OUT, gguf_file=f"{arch}.gguf", dtype=torch.float32).eval()
    t = transformers.AutoTokenizer.from_pretrained(OUT, gguf_file=f"{arch}.gguf")
    expected = {}
    with torch.no_grad():
        for i, s in enumerate(SAMPLES):
            ids = t(s).input_ids
            out = m(input_ids=torch.tensor([ids]), output_hidden_states=True)
            expected[f"ids.{i}"] = np.array(ids, dtype=np.float32)  # the tests read f32
            expected[f"hidden.{i}"] = out.hidden_states[-1][0].numpy().astype(np.float32)
    save_file(expected, os.path.join(OUT, f"{arch}.safetensors"))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    quants()
    decoder("llama")
    decoder("qwen2")
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))
