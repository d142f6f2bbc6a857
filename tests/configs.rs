//! config.json as published checkpoints write it: each model type's declared defaults are
//! transformers' (tests/fixtures/config_defaults.json, printed by tools/config_defaults.py), and
//! the forms that lean on them read as transformers reads them.

use iteris::formats::hf_config::HfConfig;
use iteris::models::{self, decoder::DecoderConfig, gemma};
use serde_json::{json, Value};

fn config(v: Value) -> HfConfig {
    let c = HfConfig::parse("config.json", v.to_string().as_bytes()).unwrap();
    c.with_defaults(&models::defaults(&c.model_type().unwrap()))
}

#[test]
fn declared_defaults_are_transformers_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/config_defaults.json");
    let reference: serde_json::Map<String, Value> = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(reference.len(), models::MODEL_TYPES.len() - 1, "every model type but gemma3 (its text_config's)");
    for (model_type, want) in &reference {
        assert_eq!(&models::defaults(model_type), want, "{model_type}");
    }
}

#[test]
fn gemma3_multimodal_text_config_leans_on_gemma3_text_defaults() {
    // gemma-3-4b's config.json: its text_config leaves heads, head_dim, vocabulary, norms and the
    // rotary bases to Gemma3TextConfig.
    let c = config(json!({"model_type": "gemma3", "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024}}));
    let text = gemma::text_config(&c).unwrap();
    let s = DecoderConfig::read(&text).unwrap().shape(&text).unwrap();
    assert_eq!((s.d, s.heads, s.kv_heads, s.head_dim, s.layers), (2560, 8, 4, 256, 34));
    assert_eq!((s.vocab, s.max_pos, s.eps), (262208, 131072, 1e-6));
    let full = models::rope::gemma3(&text, "full_attention", 256).unwrap();
    let local = models::rope::gemma3(&text, "sliding_attention", 256).unwrap();
    assert_eq!(full.inv_freq[1], (1e6f64.powf(-2.0 / 256.0) / 8.0) as f32, "global base, linear scaling");
    assert_eq!(local.inv_freq[1], 1e4f64.powf(-2.0 / 256.0) as f32, "local base, no scaling");
}

#[test]
fn an_explicit_null_is_none_and_a_missing_key_the_class_default() {
    // Mistral: "sliding_window": null (v0.2 on) is no window; left out it is 4096.
    let shape = json!({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100});
    let mut none = shape.clone();
    none["sliding_window"] = Value::Null;
    assert_eq!(config(none).raw["sliding_window"], Value::Null);
    assert_eq!(config(shape.clone()).raw["sliding_window"], json!(4096));
    // Gemma 2 soft-caps where the config does not say otherwise.
    let gemma2 = config(json!({"model_type": "gemma2"}));
    assert_eq!(
        (&gemma2.raw["attn_logit_softcapping"], &gemma2.raw["final_logit_softcapping"]),
        (&json!(50.0), &json!(30.0))
    );
    // Phi-3's norm epsilon is 1e-5, not Llama's 1e-6.
    let mut phi3 = shape;
    phi3["model_type"] = "phi3".into();
    let c = config(phi3);
    assert_eq!(DecoderConfig::read(&c).unwrap().shape(&c).unwrap().eps, 1e-5);
}

#[test]
fn errors_name_the_key_path() {
    let bad = config(json!({"model_type": "llama", "hidden_size": "64"}));
    let e = DecoderConfig::read(&bad).err().unwrap().to_string();
    assert!(
        e.contains("config.json") && e.contains("\"hidden_size\": expected a non-negative integer, not \"64\""),
        "{e}"
    );
    let bad = config(json!({"model_type": "qwen2", "layer_types": ["full_attention", "chunked_attention"]}));
    let e = DecoderConfig::read(&bad).err().unwrap().to_string();
    assert!(e.contains("\"layer_types[1]\": \"chunked_attention\" is not supported"), "{e}");
}
