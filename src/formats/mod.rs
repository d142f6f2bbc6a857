//! File formats. Nothing here knows a model architecture (but `gguf::base`, the table from
//! llama.cpp's names to a checkpoint's): these modules turn bytes into checked, typed values
//! (tensors, configs, token ids) and back.

pub mod contain;
pub mod gguf;
pub mod hf_config;
pub mod mlx;
pub mod peft;
pub mod safetensors;
pub mod samples;
pub mod tokenizer;
