//! The quality report against direct computations on the GPT-2 fixture: the KL from two separate
//! forward passes (adapter model, merged model with its dense deltas folded into the weights), and
//! greedy generation one prompt at a time with the merged weights folded in.

mod common;

use common::{base, fixture, merge_on, tasks, ARCHS};
use iteris::backend::cpu::Cpu;
use iteris::backend::prelude::*;
use iteris::formats::samples::EvalSet;
use iteris::mat::Mat;
use iteris::merge::evaluate::{generate, Decoding, DeltaHook};
use iteris::merge::{map_targets, Options};
use iteris::models::{self, Batch, Hook, Output, StageInput, Stream};
use pollster::FutureExt;
use std::collections::HashMap;

/// Adds fixed dense deltas (out, in) to every row, by module name.
struct Dense(HashMap<String, Mat>);
impl Hook<Cpu> for Dense {
    async fn stage(&mut self, be: &Cpu, input: &StageInput<'_, Cpu>, ys: &mut [Mat]) -> iteris::Result<()> {
        for (m, y) in input.mods.iter().zip(ys.iter_mut()) {
            if let Some(d) = self.0.get(m.name) {
                let n = input.x.rows;
                let add = be.matmul_t(input.x, 0..n, d);
                be.add_rows(y, 0..n, &add, 1.0);
            }
        }
        Ok(())
    }
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&v| v as f64 - z).collect()
}

fn eval_set() -> EvalSet {
    // Prompts from the fixture's samples; answers are set by the test.
    let text = std::fs::read_to_string(fixture("gpt2").join("samples0.txt")).unwrap();
    let items =
        text.lines().map(|l| (l.split(' ').take(3).collect::<Vec<_>>().join(" "), Some(String::new()))).collect();
    EvalSet { name: "eval.jsonl".into(), items }
}

#[test]
fn kl_and_generation_match_direct_computations() {
    let base = base("gpt2");
    let mut tasks = tasks("gpt2");
    let model = models::load(&Cpu, &base.config, &base.weights).unwrap();
    let adapters: Vec<_> = tasks.iter().map(|t| &t.adapter).collect();
    let targets = map_targets(&model.modules(), &adapters, model.model_type(), true).unwrap();

    // The merged model's greedy continuations, one prompt at a time, with dense deltas.
    let merged = merge_on(&Cpu, &base, "gpt2", &Options::published());
    let dense_of = |m: &iteris::merge::solve::Merged| {
        let (a, b) = (iteris::merge::solve::to_f64(&m.a), iteris::merge::solve::to_f64(&m.b));
        iteris::merge::solve::to_mat(&(b * a))
    };
    let merged_dense: HashMap<String, Mat> =
        targets.iter().zip(&merged.outcome.merged).map(|(t, m)| (t.name.clone(), dense_of(m))).collect();
    // Answers of two lengths; the stopping rule is the same for both decoders (a newline, the
    // answer's token count plus two, or the model's last position). A random model gets short
    // prompts wrong; one prompt two tokens short of the model's positions stops there, whatever
    // its answer, so its own continuation becomes its answer and the accuracy is not 0 by
    // construction.
    let max_pos = model.max_positions();
    let mut set = eval_set();
    for (k, item) in set.items.iter_mut().enumerate() {
        item.1 = Some(if k % 2 == 0 { "abcd".into() } else { "no such answer here".into() });
    }
    let text = std::fs::read_to_string(fixture("gpt2").join("samples0.txt")).unwrap().replace('\n', " ");
    let words: Vec<&str> = text.split_whitespace().collect();
    let tokens = |p: &str| base.tokenizer.encode(p, usize::MAX).unwrap().ids.len();
    let long_prompt = (1..=words.len())
        .map(|n| words[..n].join(" "))
        .find(|p| (max_pos - 2..max_pos).contains(&tokens(p)))
        .expect("a prompt of the fixture's words one or two tokens short of the model's positions");
    set.items.push((long_prompt, Some("abcd".into())));
    let mut direct = Vec::new();
    for (prompt, answer) in &set.items {
        let budget = base.tokenizer.encode(answer.as_deref().unwrap(), 64).unwrap().ids.len() + 2;
        let mut ids = base.tokenizer.encode(prompt, 64).unwrap().ids;
        let start = ids.len();
        for _ in 0..budget {
            if ids.len() >= max_pos {
                break;
            }
            let mut batch = Batch::default();
            batch.push_group(0, Stream::Base, &[ids.clone()]);
            let mut hook = Dense(merged_dense.clone());
            let y = models::run(&model, &Cpu, &batch, &mut hook, Output::Logits).block_on().unwrap().unwrap();
            let row = y.row(y.rows - 1);
            let next = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
            if base.tokenizer.decode(&[next]).unwrap().contains('\n') {
                break;
            }
            ids.push(next);
        }
        direct.push(base.tokenizer.decode(&ids[start..]).unwrap());
    }
    set.items.last_mut().unwrap().1 = Some(direct.last().unwrap().clone());
    let labeled = set.labeled();
    let mut hook = DeltaHook::new(&Cpu, &targets, Some(&merged.outcome.merged));
    for decoding in [Decoding::Cached, Decoding::Recomputed] {
        let batched = generate(
            &Cpu,
            &model,
            &base.tokenizer,
            &mut hook,
            &labeled,
            &vec![Stream::Merged; labeled.len()],
            None,
            decoding,
        )
        .block_on()
        .unwrap();
        assert_eq!(batched, direct, "batched ({decoding:?}) and one-at-a-time greedy decoding agree");
    }

    // The report: accuracy = exact matches of those continuations; KL below.
    tasks[0].eval = Some(set.clone());
    let r = iteris::merge::pipeline::merge(&Cpu, &base, &tasks, &Options::published(), &mut |_| {}).block_on().unwrap();
    let q = &r.quality.as_ref().unwrap()[0];
    let want_acc = direct.iter().zip(&set.items).filter(|(d, (_, a))| d.trim() == a.as_deref().unwrap().trim()).count()
        as f64
        / set.items.len() as f64;
    assert!(want_acc > 0.0, "at least the long prompt's answer is right");
    assert!((q.accuracy.unwrap() - want_acc).abs() < 1e-12, "accuracy {:?} vs {want_acc}", q.accuracy);

    // KL directly: two separate passes, adapter 0's deltas and the merged deltas folded in.
    let lora0: HashMap<String, Mat> = targets
        .iter()
        .filter_map(|t| {
            let l = t.loras[0].as_ref()?;
            let d = iteris::merge::solve::to_f64(&l.b) * iteris::merge::solve::to_f64(&l.a) * l.scale as f64;
            Some((t.name.clone(), iteris::merge::solve::to_mat(&d)))
        })
        .collect();
    let texts: Vec<String> = set.items.iter().map(|(p, a)| format!("{p}{}", a.as_deref().unwrap())).collect();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| base.tokenizer.encode(t, 64).unwrap().ids).collect();
    let logits = |deltas: &HashMap<String, Mat>| {
        let mut batch = Batch::default();
        batch.push_group(0, Stream::Base, &ids);
        models::run(&model, &Cpu, &batch, &mut Dense(deltas.clone()), Output::Logits).block_on().unwrap().unwrap()
    };
    let (p, m) = (logits(&lora0), logits(&merged_dense));
    let mut kl = 0.0;
    for r in 0..p.rows {
        let (lp, lq) = (log_softmax(p.row(r)), log_softmax(m.row(r)));
        kl += lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
    }
    kl /= p.rows as f64;
    println!("KL: report {:.6e}, direct {kl:.6e}; accuracy {:?}", q.kl, q.accuracy);
    assert!((q.kl - kl).abs() <= 1e-4 * kl.abs() + 1e-9, "KL {} vs direct {kl}", q.kl);
    assert!(kl > 0.0);
}

/// `Output::LastLogits` (what greedy decoding reads) is each sequence's last row of the full
/// logits, on both decoder families and with a hook adding deltas to the LM head's input stage.
#[test]
fn last_logits_are_the_last_rows_of_the_full_logits() {
    for arch in ["gpt2", "llama"] {
        let base = base(arch);
        let model = models::load(&Cpu, &base.config, &base.weights).unwrap();
        let ids: Vec<Vec<u32>> =
            ["a b c", "hello there, general", "x"].iter().map(|t| base.tokenizer.encode(t, 64).unwrap().ids).collect();
        let mut batch = Batch::default();
        batch.push_group(0, Stream::Base, &ids);
        let run = |out| models::run(&model, &Cpu, &batch, &mut Dense(HashMap::new()), out).block_on().unwrap().unwrap();
        let (all, last) = (run(Output::Logits), run(Output::LastLogits));
        assert_eq!(last.rows, ids.len(), "{arch}: one row per sequence");
        for (k, s) in batch.seqs.iter().enumerate() {
            assert_eq!(last.row(k), all.row(s.end - 1), "{arch}: sequence {k}");
        }
    }
}

/// A KV cache changes how decoding computes, not what: each pass's logits equal rerunning every
/// sequence whole, on every decoder architecture (sliding windows, Gemma's soft-capping, SmolLM3's
/// NoPE layers, Phi-3's longrope past its original context included).
#[test]
fn cached_decoding_equals_recomputed_decoding() {
    for arch in ARCHS.into_iter().filter(|a| *a != "bert") {
        let e = common::cached_decoding_error(&Cpu, arch);
        // Measured 0: one query row's sums run in the same order either way.
        assert!(e < 1e-6, "{arch}: cached logits differ from recomputed ones by {e:.2e}");
    }
}
