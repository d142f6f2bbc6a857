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
  llama3.gguf / llama3.safetensors
      the llama fixture with Llama 3's rope scaling, which llama.cpp's converter stores as the tensor
      rope_freqs.weight (one divisor per frequency), not as metadata. transformers' GGUF loading drops
      that tensor, so the reference is transformers' LlamaForCausalLM with the llama3 rope_parameters
      and the file's dequantized weights.
  phi3.gguf / phi3.safetensors
      tests/fixtures/phi3/base as llama.cpp's Phi3MiniModel converter writes it: fused attn_qkv and
      ffn_up (gate and up), rope.dimension_count for the partial rotary, longrope's factors as the
      tensors rope_factors_long/short with rope.scaling.attn_factor and original_context_length, the
      sliding window. transformers' GGUF loading keeps none of the rope keys, so the reference is again
      the folder's own Phi3ForCausalLM config with the file's dequantized weights; the third sample
      runs past the trained context of 32, so the long factors and the window of 24 are in play.
  spm-llama.gguf, spm-phi3.gguf / spm.safetensors, spm_texts.json
      tokenizer-only files: a SentencePiece BPE vocabulary (byte fallback, scores, control and
      user-defined pieces) trained by the `sentencepiece` package on this repository's documents, as
      llama.cpp stores it (tokenizer.ggml.model "llama"), under architectures llama (transformers'
      LlamaTokenizer: Metaspace) and phi3 (its prefix space from a normalizer); "<arch>.k" holds
      transformers' token ids of TEXTS[k], which spm_texts.json lists for the test.

    python3 tools/make_gguf_fixtures.py
Needs numpy, gguf, torch, transformers, sentencepiece.
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
# Past Phi-3's trained context of 32 tokens: the long factors and the window.
LONG = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen."
# Texts for the SentencePiece tokenizers: leading, repeated and trailing spaces, tabs and newlines,
# accents, CJK and emoji (byte fallback), digits, the control and user-defined pieces.
TEXTS = [
    "The capital of France is Paris.",
    " leading space and  two  spaces ",
    "tabs\tand\nnew\n\nlines",
    "Café naïve façade über",
    "日本語のテキスト 🤖🚀",
    "3.14159 + 2718 = 28.3",
    "<s>a</s> <|user|>hi<|end|>",
    "",
    "merge the adapters with iteris",
]


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


def write_decoder(path, arch, cfg, sd, tok, extra=None):
    """A GGUF as llama.cpp's converter writes the checkpoint `sd` (llama: q/k permuted; phi3's
    fused projections as they are), matrices quantized in turn to seven types."""
    w = gguf.GGUFWriter(path, arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg["rope_parameters"]
    if arch != "phi3":  # Phi3MiniModel writes neither
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
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
    for key, value in (extra or {}).items():
        getattr(w, key)(value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    modules = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    types = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.F16, T.BF16]
    k = 0
    for name, v in sd.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # llama.cpp's converter leaves a tied head out
        if name in names:
            g = names[name]
        elif name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            mod, suffix = rest.rsplit(".", 1)
            g = f"blk.{layer}.{modules[mod]}.{suffix}"
        else:
            g = name  # rope_freqs.weight, rope_factors_*.weight: f32 as they are
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


def dequantized(path, arch, cfg):
    """The checkpoint a GGUF written by write_decoder holds, dequantized by the `gguf` package."""
    back = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    modules = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.gate_up_proj" if arch == "phi3" else "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in gguf.GGUFReader(path).tensors:
        v = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        module, suffix = t.name.rsplit(".", 1)
        mod = None
        if module.startswith("blk."):
            _, layer, mod = module.split(".")
            name = f"model.layers.{layer}.{modules[mod]}.{suffix}"
        elif module in back:
            name = f"{back[module]}.{suffix}"
        else:
            continue
        if arch == "llama" and mod in ("attn_q", "attn_k"):
            n = cfg["num_attention_heads"] if mod == "attn_q" else cfg["num_key_value_heads"]
            v = v.reshape(n, v.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(v.shape)
        sd[name] = torch.from_numpy(v.copy())
    return sd


def reference(name, config, sd, tokenizer, samples):
    """Token ids of `samples` (the file's tokenizer as transformers reads it) and their final hidden
    states in transformers' model of `config` holding `sd`."""
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing), (missing, unexpected)
    if missing:
        model.tie_weights()
    expected = {}
    with torch.no_grad():
        for i, s in enumerate(samples):
            ids = tokenizer(s).input_ids
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            expected[f"ids.{i}"] = np.array(ids, dtype=np.float32)
            expected[f"hidden.{i}"] = out.hidden_states[-1][0].numpy().astype(np.float32)
    save_file(expected, os.path.join(OUT, f"{name}.safetensors"))
    return expected


def llama3():
    """The llama fixture with Llama 3's rope scaling: rope_freqs.weight as the converter computes it
    (LlamaModel.generate_extra_tensors), frequencies chosen so two fall in the smoothed band."""
    base = os.path.join(HERE, "..", "tests", "fixtures", "llama", "base")
    cfg = json.load(open(os.path.join(base, "config.json")))
    tok = json.load(open(os.path.join(base, "tokenizer.json")))
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 8.0, "original_max_position_embeddings": 256}
    cfg["rope_parameters"] = rope
    head_dim = cfg["head_dim"]
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    lo_wave = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    hi_wave = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for f in freqs:
        wave = 2 * np.pi / f
        if wave < hi_wave:
            factors.append(1.0)
        elif wave > lo_wave:
            factors.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wave - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    sd["rope_freqs.weight"] = np.array(factors, dtype=np.float32)
    path = os.path.join(OUT, "llama3.gguf")
    write_decoder(path, "llama", cfg, sd, tok)
    config = transformers.AutoConfig.from_pretrained(base)
    config.rope_parameters = rope
    tokenizer = transformers.AutoTokenizer.from_pretrained(OUT, gguf_file="llama3.gguf")
    want = reference("llama3", config, dequantized(path, "llama", cfg), tokenizer, SAMPLES + [LONG])
    # The scaling shows: without it the hidden states move.
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plain.load_state_dict(dequantized(path, "llama", cfg))
    with torch.no_grad():
        h = plain(input_ids=torch.tensor([want["ids.2"].astype(int)]), output_hidden_states=True).hidden_states[-1][0]
    moved = np.abs(h.numpy() - want["hidden.2"]).max() / np.abs(want["hidden.2"]).max()
    assert moved > 1e-3, moved
    print("llama3: the rope scaling moves the long sample's hidden states by", moved)


def phi3():
    """tests/fixtures/phi3/base as Phi3MiniModel's converter writes it."""
    base = os.path.join(HERE, "..", "tests", "fixtures", "phi3", "base")
    cfg = json.load(open(os.path.join(base, "config.json")))
    tok = json.load(open(os.path.join(base, "tokenizer.json")))
    rope = cfg["rope_parameters"]
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    sd["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
    sd["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    orig = cfg["original_max_position_embeddings"]
    scale = cfg["max_position_embeddings"] / orig
    extra = {"add_rope_scaling_orig_ctx_len": orig,
             "add_rope_scaling_attn_factors": float(np.sqrt(1 + np.log(scale) / np.log(orig))),
             "add_sliding_window": cfg["sliding_window"]}
    path = os.path.join(OUT, "phi3.gguf")
    write_decoder(path, "phi3", cfg, sd, tok, extra)
    config = transformers.AutoConfig.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(OUT, gguf_file="phi3.gguf")
    want = reference("phi3", config, dequantized(path, "phi3", cfg), tokenizer, SAMPLES + [LONG])
    assert len(want["ids.2"]) > orig, len(want["ids.2"])


def spm():
    """Tokenizer-only GGUFs of a SentencePiece BPE vocabulary, as llama.cpp's converter stores one
    (`_create_vocab_sentencepiece`: pieces, scores, token types), and transformers' ids of TEXTS."""
    import io
    import sentencepiece as sp
    root = os.path.join(HERE, "..")
    corpus = []
    for f in ["README.md", "ARCHITECTURE.md"]:
        corpus += [l for l in open(os.path.join(root, f), encoding="utf-8").read().splitlines() if l.strip()]
    proto = io.BytesIO()
    sp.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=proto, vocab_size=1200,
                                  model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                  control_symbols=["<|end|>"], user_defined_symbols=["<|user|>"],
                                  minloglevel=2)
    m = sp.SentencePieceProcessor(model_proto=proto.getvalue())
    pieces = [m.id_to_piece(i) for i in range(m.get_piece_size())]
    scores = [m.get_score(i) for i in range(m.get_piece_size())]
    # llama.cpp's SentencePieceTokenTypes: normal 1, unknown 2, control 3, user-defined 4, byte 6.
    def kind(i):
        if m.is_unknown(i):
            return 2
        if m.is_control(i):
            return 3
        if m.is_byte(i):
            return 6
        return 4 if pieces[i] == "<|user|>" else 1
    expected = {}
    for arch in ["llama", "phi3"]:
        path = os.path.join(OUT, f"spm-{arch}.gguf")
        w = gguf.GGUFWriter(path, arch)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types([kind(i) for i in range(len(pieces))])
        w.add_bos_token_id(m.bos_id())
        w.add_eos_token_id(m.eos_id())
        w.add_unk_token_id(m.unk_id())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        t = transformers.AutoTokenizer.from_pretrained(OUT, gguf_file=f"spm-{arch}.gguf")
        for k, text in enumerate(TEXTS):
            expected[f"{arch}.{k}"] = np.array(t(text).input_ids, dtype=np.float32).reshape(-1)
    save_file(expected, os.path.join(OUT, "spm.safetensors"))
    with open(os.path.join(OUT, "spm_texts.json"), "w", encoding="utf-8") as f:
        json.dump(TEXTS, f, ensure_ascii=False, indent=1)


def decoder(arch):
    """tests/fixtures/<arch>/base as llama.cpp's converter writes it (q/k permuted for llama), and
    what transformers' own GGUF loading reads from the file."""
    base = os.path.join(HERE, "..", "tests", "fixtures", arch, "base")
    cfg = json.load(open(os.path.join(base, "config.json")))
    tok = json.load(open(os.path.join(base, "tokenizer.json")))
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    write_decoder(os.path.join(OUT, f"{arch}.gguf"), arch, cfg, sd, tok)

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
    llama3()
    phi3()
    spm()
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))
