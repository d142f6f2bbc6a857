//! Each architecture's forward pass against Hugging Face `transformers` (float64) on tiny random
//! configs: the input of every linear module and the final output (logits, or BERT's last hidden
//! state), with adapter 0 applied, to ≤1e-4 relative.

mod common;
use common::*;
use iteris::backend::cpu::Cpu;
use iteris::backend::prelude::*;
use iteris::fsio;
use iteris::mat::Mat;
use iteris::merge::tokenize;
use iteris::models::{self, Batch, Output, Stream};
use pollster::FutureExt;

#[test]
fn forward_matches_transformers() {
    check_forward(&Cpu, 1e-4);
}

/// The GPU backend's forward pass (software Vulkan in CI) against the same float64 reference.
#[test]
fn gpu_forward_matches_transformers() {
    let Some(gpu) = gpu_or_skip("gpu_forward_matches_transformers") else { return };
    check_forward(&gpu, 1e-4);
}

fn check_forward<B: Backend>(be: &B, tol: f64) {
    for arch in ARCHS {
        let base = fsio::read_base(&fixture(arch).join("base")).unwrap();
        let model = models::load(be, &base.config, &base.weights).unwrap();
        let task = &tasks(arch)[0];
        let mut hook = Recorder::for_adapter(be, &model, &task.adapter);
        let (ids, _) = tokenize(&base.tokenizer, &task.samples[..3], 128, None, "samples").unwrap();
        let mut batch = Batch::default();
        batch.push_group(0, Stream::Adapter(0), &ids);
        let out = if arch == "bert" { Output::Hidden } else { Output::Logits };
        let y = models::run(&model, be, &batch, &mut hook, out).block_on().unwrap().unwrap();

        let exp = expected(arch, "forward.safetensors");
        let e = rel(&be.download(&y).block_on().unwrap(), &exp.mat("output").unwrap());
        assert!(e < tol, "{arch}: output differs by {e:.2e}");
        let (mut checked, mut worst) = (0, 0.0f64);
        for key in exp.keys().filter(|k| k.starts_with("in.")) {
            let name = &key[3..];
            let got = hook.seen.get(name).unwrap_or_else(|| panic!("{arch}: module {name} never ran"));
            let e = rel(got, &exp.mat(key).unwrap());
            assert!(e < tol, "{arch}: input of {name} differs by {e:.2e}");
            worst = worst.max(e);
            checked += 1;
        }
        assert!(checked >= model.modules().len() - 1, "{arch}: only {checked} modules checked");
        eprintln!("{} {arch}: output ({e:.1e}) and {checked} module inputs (worst {worst:.1e}) match", be.name());
    }
}

/// The README and the page list every `model_type` the loader accepts, and the loader accepts
/// every one they list (each has a fixture above, or is a form of one: `gemma3` is checked by
/// `multimodal_gemma3_loads_its_text_model`).
#[test]
fn readme_and_page_list_the_supported_model_types() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["README.md", "www/index.html"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for mt in models::MODEL_TYPES {
            let quoted = if file.ends_with(".md") { format!("`{mt}`") } else { format!("<code>{mt}</code>") };
            assert!(text.contains(&quoted), "{file} does not list model_type {mt}");
        }
    }
}

/// A multimodal `gemma3` checkpoint: the text model's config in `text_config`, its weights under
/// `model.language_model.` (transformers 5) or `language_model.model.` (4.x). Loads as the same
/// text model and gives the same output.
#[test]
fn multimodal_gemma3_loads_its_text_model() {
    let b = base("gemma3");
    let text = models::load(&Cpu, &b.config, &b.weights).unwrap();
    let mut batch = Batch::default();
    let (ids, _) = tokenize(&b.tokenizer, &tasks("gemma3")[0].samples[..2], 128, None, "samples").unwrap();
    batch.push_group(0, Stream::Base, &ids);
    let run = |m: &models::Model<Mat>| {
        models::run(m, &Cpu, &batch, &mut models::NoHook, Output::Logits).block_on().unwrap().unwrap()
    };
    let want = run(&text);
    for prefix in ["model.language_model.", "language_model.model."] {
        let d = temp_dir(&format!("gemma3-multimodal-{}", prefix.len()));
        copy_dir(&fixture("gemma3").join("base"), &d);
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
        let outer = serde_json::json!({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": cfg, "vision_config": {"model_type": "siglip_vision_model"}});
        std::fs::write(d.join("config.json"), serde_json::to_vec(&outer).unwrap()).unwrap();
        common::hostile::rewrite_tensors(&d.join("model.safetensors"), |m| {
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let v = m.remove(&k).unwrap();
                m.insert(k.replacen("model.", prefix, 1), v);
            }
        });
        let mb = fsio::read_base(&d).unwrap();
        let m = models::load(&Cpu, &mb.config, &mb.weights).unwrap();
        assert_eq!(m.model_type(), "gemma3_text");
        assert_eq!(rel(&run(&m), &want), 0.0, "{prefix}");
    }
}
