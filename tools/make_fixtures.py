#!/usr/bin/env python3
"""Make the test fixtures: tiny random models of every supported architecture (saved with
`save_pretrained`), real PEFT LoRA adapters of mixed ranks and targets, calibration samples, and
the expected outputs the Rust tests compare against:

  forward.safetensors   the inputs of every linear module and the final output of the base model
                        with adapter 0 applied (PEFT `merge_and_unload`), float64 forward
  expected_*.safetensors  ΔW* per targeted module from an independent float64 IterIS reference
                        (forward hooks on the targeted modules; ARCHITECTURE.md's algorithm, densely)

Needs torch, transformers, peft, tokenizers (pip). Seeded; rerun to regenerate.
    python3 tools/make_fixtures.py [out_dir]   (default tests/fixtures)
"""
import json, os, random, shutil, sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, processors, decoders, normalizers
import transformers
from peft import LoraConfig, get_peft_model, PeftModel

sys.path.insert(0, os.path.dirname(__file__))
import iteris_reference as ref

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
WORDS = ("the a cat dog sat on mat red blue green fast slow jump run over under big small one two three "
         "four five six seven eight nine ten sun moon star tree house river stone bird fish eat sleep "
         "sing read write alpha beta gamma delta apple pear plum").split()


def corpus(rng, n, lo, hi):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def make_tokenizer(kind, texts):
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tr = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tok.train_from_iterator(texts, tr)
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        tok.decoder = decoders.WordPiece()
        return tok
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"] if kind == "gpt2" else ["<s>", "</s>", "<unk>"]
    tr = trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, tr)
    if kind == "bos":  # Llama style: BOS prepended by the post-processor
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


ARCHS = {
    "gpt2": dict(
        tok="gpt2",
        config=lambda v: transformers.GPT2Config(vocab_size=v, n_embd=32, n_head=4, n_layer=2, n_positions=64),
        cls=transformers.GPT2LMHeadModel,
        adapters=[dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
                  dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]),
                  dict(r=3, lora_alpha=6, target_modules=["c_proj"], use_rslora=True)],
        fan_in_fan_out=True),
    "llama": dict(
        tok="bos",
        config=lambda v: transformers.LlamaConfig(vocab_size=v, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
                                                  tie_word_embeddings=False, rope_theta=10000.0),
        cls=transformers.LlamaForCausalLM,
        shard=True,
        adapters=[dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                  dict(r=2, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                       rank_pattern={"o_proj": 5}, alpha_pattern={"layers.1.self_attn.q_proj": 3}),
                  dict(r=3, lora_alpha=6, target_modules=["gate_proj", "up_proj", "v_proj"], use_rslora=True)]),
    "qwen2": dict(
        tok="bos",
        config=lambda v: transformers.Qwen2Config(vocab_size=v, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                                  intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
                                                  tie_word_embeddings=True),
        cls=transformers.Qwen2ForCausalLM,
        adapters=[dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
                  dict(r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"]),
                  dict(r=6, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_rslora=True)]),
    "mistral": dict(
        tok="bos",
        config=lambda v: transformers.MistralConfig(vocab_size=v, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                    intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
                                                    sliding_window=6, tie_word_embeddings=False),
        cls=transformers.MistralForCausalLM,
        adapters=[dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                  dict(r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj"]),
                  dict(r=3, lora_alpha=6, target_modules=["v_proj", "down_proj"], use_rslora=True)]),
    # Qwen3: per-head q/k RMSNorm, an explicit head_dim (24, not 64 / 4).
    "qwen3": dict(
        tok="bos",
        config=lambda v: transformers.Qwen3Config(vocab_size=v, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=24, intermediate_size=96, num_hidden_layers=2,
                                                  max_position_embeddings=64, tie_word_embeddings=False),
        cls=transformers.Qwen3ForCausalLM,
        adapters=[dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
                  dict(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj"]),
                  dict(r=3, lora_alpha=6, target_modules=["k_proj", "down_proj"], use_rslora=True)]),
    # SmolLM3: a NoPE layer (no rotary positions) between two rope layers; it is also the sliding one.
    "smollm3": dict(
        tok="bos",
        config=lambda v: transformers.SmolLM3Config(vocab_size=v, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                    intermediate_size=96, num_hidden_layers=3, max_position_embeddings=64,
                                                    no_rope_layers=[1, 0, 1], use_sliding_window=True, sliding_window=6,
                                                    tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=1),
        cls=transformers.SmolLM3ForCausalLM,
        adapters=[dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                  dict(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"]),
                  dict(r=3, lora_alpha=6, target_modules=["o_proj", "down_proj"], use_rslora=True)]),
    # Gemma 2: (1 + w) norms before and after attention and MLP, √d embeddings, GeGLU, alternating
    # sliding/full layers, attention and final-logit soft-capping set low enough to bite.
    "gemma2": dict(
        tok="bos",
        config=lambda v: transformers.Gemma2Config(vocab_size=v, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=16, intermediate_size=96, num_hidden_layers=3,
                                                   max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=24,
                                                   attn_logit_softcapping=0.03, final_logit_softcapping=0.1),
        cls=transformers.Gemma2ForCausalLM,
        adapters=[dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                  dict(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj", "up_proj"]),
                  dict(r=3, lora_alpha=6, target_modules=["k_proj", "down_proj"], use_rslora=True)]),
    # Gemma 3: Gemma 2's layout plus per-head (1 + w) q/k norms, layer_types, local and global rope
    # bases with linear scaling on the global layers, query_pre_attn_scalar ≠ head_dim.
    "gemma3": dict(
        tok="bos",
        config=lambda v: transformers.Gemma3TextConfig(
            vocab_size=v, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
            intermediate_size=96, num_hidden_layers=4, max_position_embeddings=64, sliding_window=6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=20,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        cls=transformers.Gemma3ForCausalLM,
        adapters=[dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
                  dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
                  dict(r=3, lora_alpha=6, target_modules=["q_proj", "gate_proj", "up_proj"], use_rslora=True)]),
    # Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj, 3/4 of each head rotary, longrope whose
    # original context (32) some samples pass (so both factor sets run), a sliding window.
    "phi3": dict(
        tok="bos",
        config=lambda v: transformers.Phi3Config(
            vocab_size=v, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            num_hidden_layers=2, max_position_embeddings=128, original_max_position_embeddings=32,
            partial_rotary_factor=0.75, sliding_window=24, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=1,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 8.0]}),
        cls=transformers.Phi3ForCausalLM,
        adapters=[dict(r=4, lora_alpha=8, target_modules=["qkv_proj"]),
                  dict(r=2, lora_alpha=4, target_modules=["o_proj", "gate_up_proj"]),
                  dict(r=3, lora_alpha=6, target_modules=["qkv_proj", "down_proj"], use_rslora=True)]),
    "bert": dict(
        tok="wordpiece",
        config=lambda v: transformers.BertConfig(vocab_size=v, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                                 intermediate_size=64, max_position_embeddings=64),
        cls=transformers.BertModel,
        adapters=[dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
                  dict(r=2, lora_alpha=4, target_modules=["dense"]),
                  dict(r=3, lora_alpha=6, target_modules=["key", "query", "pooler.dense"], use_rslora=True)]),
}


def build(name, spec, seed=0):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    tok = make_tokenizer(spec["tok"], corpus(rng, 400, 3, 12))
    base_dir = os.path.join(d, "base")
    os.makedirs(base_dir)
    tok.save(os.path.join(base_dir, "tokenizer.json"))
    cfg = spec["config"](tok.get_vocab_size())
    cfg._attn_implementation = "eager"
    model = spec["cls"](cfg).eval()
    with torch.no_grad():  # random, non-trivial norms and biases
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n.lower() or "ln_" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(base_dir, max_shard_size="40KB" if spec.get("shard") else "2GB")

    # Adapters: real PEFT, then random A and B (B starts at zero) so every delta matters.
    samples = []
    for i, acfg in enumerate(spec["adapters"]):
        torch.manual_seed(100 + i)
        m = spec["cls"].from_pretrained(base_dir).eval()
        lc = LoraConfig(lora_dropout=0.0, fan_in_fan_out=spec.get("fan_in_fan_out", False), **acfg)
        pm = get_peft_model(m, lc)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_A" in n:
                    p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
                elif "lora_B" in n:
                    p.copy_(0.15 * torch.randn_like(p) / p.shape[1] ** 0.5)
        pm.save_pretrained(os.path.join(d, f"adapter{i}"))
        texts = corpus(rng, 5 + i, 4, 20)
        if i == 1:
            path = os.path.join(d, f"samples{i}.jsonl")
            with open(path, "w") as f:
                for t in texts:
                    f.write(json.dumps({"text": t}) + "\n")
        else:
            path = os.path.join(d, f"samples{i}.txt")
            with open(path, "w") as f:
                f.write("\n".join(texts) + "\n")
        samples.append(texts)

    # Forward check: base + adapter 0, every linear input and the final output, float64.
    m = spec["cls"].from_pretrained(base_dir, attn_implementation="eager").eval()
    m = PeftModel.from_pretrained(m, os.path.join(d, "adapter0")).merge_and_unload().double().eval()
    ids = [torch.tensor([tok.encode(t).ids]) for t in samples[0][:3]]
    print(name, "forward check on samples of", [x.shape[1] for x in ids], "tokens")
    expected = {}
    recorded = {}
    hooks = []
    for mn, mod in m.named_modules():
        if isinstance(mod, (torch.nn.Linear, transformers.pytorch_utils.Conv1D)):
            hooks.append(mod.register_forward_hook(lambda mod, inp, out, mn=mn: recorded.setdefault(mn, []).append(inp[0].reshape(-1, inp[0].shape[-1]))))
    outs = []
    with torch.no_grad():
        for x in ids:
            o = m(input_ids=x)
            outs.append((o.logits if hasattr(o, "logits") else o.last_hidden_state)[0])
    for h in hooks:
        h.remove()
    for mn, xs in recorded.items():
        expected["in." + ref.canonical(mn)] = torch.cat(xs).float().contiguous()
    expected["output"] = torch.cat(outs).float().contiguous()
    save_file(expected, os.path.join(d, "forward.safetensors"))

    # IterIS references, float64.
    merges = {"sweep_a1e-4": dict(alpha=1e-4, iters=None), "jacobi3_a1e-4": dict(alpha=1e-4, iters=3),
              "sweep_a1e-7": dict(alpha=1e-7, iters=None)}
    for key, mcfg in merges.items():
        deltas, info = ref.iteris(spec["cls"], base_dir, [os.path.join(d, f"adapter{i}") for i in range(3)],
                                  tok, samples, max_len=128, alpha1=mcfg["alpha"], alpha2=mcfg["alpha"], iters=mcfg["iters"])
        save_file({k: v.float().contiguous() for k, v in deltas.items()}, os.path.join(d, f"expected_{key}.safetensors"))
        print(name, key, info)


if __name__ == "__main__":
    only = sys.argv[2:] or list(ARCHS)
    for n in only:
        build(n, ARCHS[n])
