"""transformers' defaults for the config.json keys each model family here reads, for every model_type
the tool loads: what transformers uses where a config leaves a key out. tests/configs.rs checks that
each family file declares exactly these (`models::defaults`).

    python3 tools/config_defaults.py > tests/fixtures/config_defaults.json

Needs transformers (5.x). A default of None (a value derived from others, such as head_dim from
hidden_size, or no value, such as no sliding window) is left out: the family derives it.
"""
import inspect
import json

from transformers import CONFIG_MAPPING

# The keys the family structs read (DecoderConfig and each family's own; rope keys from RopeConfig).
DECODER = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"]
KEYS = {
    "llama": DECODER + ["hidden_act"],
    "mistral": DECODER + ["hidden_act", "sliding_window"],
    "qwen2": DECODER + ["hidden_act", "sliding_window", "use_sliding_window", "max_window_layers"],
    "qwen3": DECODER + ["hidden_act", "sliding_window", "use_sliding_window", "max_window_layers"],
    "smollm3": DECODER + ["hidden_act", "sliding_window", "use_sliding_window", "max_window_layers",
                          "no_rope_layer_interval"],
    "gemma2": DECODER + ["hidden_activation", "sliding_window", "query_pre_attn_scalar",
                         "attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention"],
    "gemma3_text": DECODER + ["hidden_activation", "sliding_window", "query_pre_attn_scalar",
                              "attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention"],
    "phi3": DECODER + ["hidden_act", "sliding_window"],
    "gpt2": ["vocab_size", "n_embd", "n_head", "n_layer", "n_positions", "n_inner", "activation_function",
             "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx"],
    "bert": ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "type_vocab_size", "position_embedding_type", "hidden_act",
             "layer_norm_eps"],
}

out = {}
for model_type, keys in KEYS.items():
    cls = CONFIG_MAPPING[model_type]
    params = inspect.signature(cls.__init__).parameters
    d = {k: params[k].default for k in keys if k in params and params[k].default is not None}
    theta = getattr(cls, "default_theta", None) if "rms_norm_eps" in keys else None  # the rotary families
    if isinstance(theta, dict):  # Gemma 3: global and local bases
        d["rope_theta"], d["rope_local_base_freq"] = theta["global"], theta["local"]
    elif theta is not None:
        d["rope_theta"] = theta
    out[model_type] = dict(sorted(d.items()))
print(json.dumps(out, indent=1))
