#!/usr/bin/env python3
"""A SmolLM2-135M-shaped Llama (random weights) in two forms, for the forward-pass peer benchmark
(benches/peer_forward.mjs): a Hugging Face folder the page's engine reads (config.json,
model.safetensors, a tokenizer.json) and model.onnx, the same network as an ONNX graph that
onnxruntime-web (the engine transformers.js runs on) executes. Both stop at the final norm's
hidden states, which is what a merge's calibration pass computes (no LM head). Beside them, one
small ONNX graph per matrix-product shape of a merge at that batch (matmul_K.onnx).

The graph is written op by op with `onnx.helper` (opset 17, standard ops only, shapes fixed at
SEQUENCES x TOKENS) so that it is exactly the engine's Llama: RMSNorm, rotary positions in the
rotate-half convention, grouped-query causal attention, SiLU-gated MLP. onnxruntime fuses what
it recognises itself (its graph optimisations run at session creation).

    python3 tools/make_peer_model.py OUT [--layers 30] [--sequences 8] [--tokens 64]

Needs numpy, onnx and safetensors (pip); nothing here is committed (the weights are 540 MB).
"""
import argparse, json, os, shutil
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
# SmolLM2-135M-Instruct's shape.
D, FF, HEADS, KV, HD, VOCAB, THETA, EPS = 576, 1536, 9, 3, 64, 49152, 100000.0, 1e-5


def weights(layers, rng):
    def w(out, inp):
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    t = {"model.embed_tokens.weight": (rng.standard_normal((VOCAB, D)) * 0.5).astype(np.float32),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        t[p + "self_attn.q_proj.weight"] = w(HEADS * HD, D)
        t[p + "self_attn.k_proj.weight"] = w(KV * HD, D)
        t[p + "self_attn.v_proj.weight"] = w(KV * HD, D)
        t[p + "self_attn.o_proj.weight"] = w(D, HEADS * HD)
        t[p + "mlp.gate_proj.weight"] = w(FF, D)
        t[p + "mlp.up_proj.weight"] = w(FF, D)
        t[p + "mlp.down_proj.weight"] = w(D, FF)
    return t


class Graph:
    def __init__(self):
        self.nodes, self.inits, self.k = [], [], 0

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, kind, inputs, **attrs):
        self.k += 1
        out = f"{kind.lower()}_{self.k}"
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out


def onnx_model(t, layers, b, n):
    g = Graph()
    shape = lambda *s: g.const(f"shape_{g.k}_{len(g.inits)}", np.array(s, dtype=np.int64))
    eps = g.const("eps", np.array(EPS, dtype=np.float32))
    scale = g.const("attn_scale", np.array(1 / np.sqrt(HD), dtype=np.float32))
    # Rotary tables (n, HD) in the rotate-half convention, and the causal mask (n, n).
    inv = 1.0 / THETA ** (np.arange(0, HD, 2) / HD)
    ang = np.outer(np.arange(n), inv)
    ang = np.concatenate([ang, ang], axis=1)
    cos, sin = g.const("cos", np.cos(ang).astype(np.float32)), g.const("sin", np.sin(ang).astype(np.float32))
    mask = g.const("mask", np.triu(np.full((n, n), -1e9, dtype=np.float32), 1))
    half = [g.const("h0", np.array([0], np.int64)), g.const("h1", np.array([HD // 2], np.int64)),
            g.const("h2", np.array([HD], np.int64)), g.const("ax3", np.array([3], np.int64))]

    def rms(x, weight):
        ms = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
        return g.op("Mul", [g.op("Div", [x, g.op("Sqrt", [g.op("Add", [ms, eps])])]), g.const(weight + ".onnx", t[weight])])

    def linear(x, weight):
        return g.op("MatMul", [x, g.const(weight + ".T", np.ascontiguousarray(t[weight].T))])

    def heads(x, h):  # (b, n, h·HD) -> (b, h, n, HD)
        return g.op("Transpose", [g.op("Reshape", [x, shape(b, n, h, HD)])], perm=[0, 2, 1, 3])

    def rope(x):
        x1 = g.op("Slice", [x, half[0], half[1], half[3]])
        x2 = g.op("Slice", [x, half[1], half[2], half[3]])
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=3)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])

    def repeat_kv(x):  # (b, KV, n, HD) -> (b, HEADS, n, HD)
        x = g.op("Reshape", [x, shape(b, KV, 1, n, HD)])
        x = g.op("Expand", [x, shape(b, KV, HEADS // KV, n, HD)])
        return g.op("Reshape", [x, shape(b, HEADS, n, HD)])

    ids = "input_ids"
    h = g.op("Gather", [g.const("embed", t["model.embed_tokens.weight"]), ids], axis=0)
    for i in range(layers):
        p = f"model.layers.{i}."
        x = rms(h, p + "input_layernorm.weight")
        q = rope(heads(linear(x, p + "self_attn.q_proj.weight"), HEADS))
        k = repeat_kv(rope(heads(linear(x, p + "self_attn.k_proj.weight"), KV)))
        v = repeat_kv(heads(linear(x, p + "self_attn.v_proj.weight"), KV))
        s = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale]), mask])
        a = g.op("MatMul", [g.op("Softmax", [s], axis=-1), v])
        a = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), shape(b, n, HEADS * HD)])
        h = g.op("Add", [h, linear(a, p + "self_attn.o_proj.weight")])
        x = rms(h, p + "post_attention_layernorm.weight")
        gate = linear(x, p + "mlp.gate_proj.weight")
        z = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), linear(x, p + "mlp.up_proj.weight")])
        h = g.op("Add", [h, linear(z, p + "mlp.down_proj.weight")])
    out = rms(h, "model.norm.weight")
    g.nodes.append(helper.make_node("Identity", [out], ["hidden"]))
    graph = helper.make_graph(g.nodes, "smollm2_shaped_llama", [helper.make_tensor_value_info(ids, TensorProto.INT64, [b, n])],
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [b, n, D])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="iteris make_peer_model")
    model.ir_version = 8
    return model


def matmul_models(out, rows):
    """One ONNX graph per matrix product a merge runs at this shape (rows: the batch's tokens):
    each projection x · Wᵀ (W an initializer, as a weight), and the Gram matrices Xᵀ·Y of a
    stage's inputs. Returns their list for shape.json."""
    shapes = [("q, o", "project", rows, D, D), ("k, v", "project", rows, D, KV * HD), ("gate, up", "project", rows, D, FF),
              ("down", "project", rows, FF, D), ("gram, attention input", "gram", rows, D, D), ("gram, down input", "gram", rows, FF, FF)]
    listed = []
    rng = np.random.default_rng(1)
    for k, (name, kind, m, kk, n) in enumerate(shapes):
        if kind == "project":
            w = numpy_helper.from_array((rng.standard_normal((kk, n)) / np.sqrt(kk)).astype(np.float32), "w")
            nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
            inputs, inits = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, kk])], [w]
            out_shape = [m, n]
        else:
            nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]), helper.make_node("MatMul", ["xt", "x2"], ["y"])]
            inputs = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [m, kk]) for v in ("x", "x2")]
            inits, out_shape = [], [kk, n]
        graph = helper.make_graph(nodes, name, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        file = f"matmul_{k}.onnx"
        onnx.save(model, os.path.join(out, file))
        listed.append({"name": name, "kind": kind, "m": m, "k": kk, "n": n, "file": file})
    return listed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t = weights(a.layers, np.random.default_rng(0))
    save_file(t, os.path.join(a.out, "model.safetensors"))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": D, "intermediate_size": FF,
              "num_hidden_layers": a.layers, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
              "vocab_size": VOCAB, "max_position_embeddings": 8192, "rms_norm_eps": EPS, "rope_theta": THETA,
              "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "float32"}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    # The engine reads a tokenizer with every model; the benchmark gives token ids directly.
    shutil.copy(os.path.join(os.path.dirname(HERE), "demo", "base", "tokenizer.json"), os.path.join(a.out, "tokenizer.json"))
    onnx.save(onnx_model(t, a.layers, a.sequences, a.tokens), os.path.join(a.out, "model.onnx"))
    with open(os.path.join(a.out, "shape.json"), "w") as f:
        json.dump({"sequences": a.sequences, "tokens": a.tokens, "layers": a.layers, "vocab": VOCAB,
                   "matmuls": matmul_models(a.out, a.sequences * a.tokens)}, f)
    print(f"{a.out}: {a.layers} layers, {sum(v.size for v in t.values()) / 1e6:.0f}M parameters, ONNX for {a.sequences} x {a.tokens} tokens")


if __name__ == "__main__":
    main()
