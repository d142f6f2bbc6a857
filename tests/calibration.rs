//! Self-calibration and task balancing (ARCHITECTURE.md, "How a merge flows" 4b and 5b), on the
//! bundled demo (whose calibration samples are prompts only) and the GPT-2 fixture.

mod common;

use common::{demo, demo_tasks, merge, rel};
use iteris::backend::cpu::Cpu;
use iteris::fsio;
use iteris::merge::calibrate::self_calibrate;
use iteris::merge::evaluate::{agreement, continue_greedy, ends_line, Decoding, DeltaHook};
use iteris::merge::{map_targets, pipeline, tokenize, Balance, BalanceObjective, Options};
use iteris::models::{self, Stream};
use pollster::FutureExt;

fn demo_merge(opts: &Options) -> pipeline::MergeResult {
    let base = fsio::read_base(&demo().join("base")).unwrap();
    let opts = Options { eval_limit: Some(50), ..opts.clone() };
    pipeline::merge(&Cpu, &base, &demo_tasks(), &opts, &mut |_| {}).block_on().unwrap()
}

fn accuracies(r: &pipeline::MergeResult) -> Vec<f64> {
    r.quality.as_ref().unwrap().iter().map(|q| q.accuracy.unwrap()).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The demo's samples are prompts ("sort 7000>"): self-calibration writes every adapter's answer
/// after its prompts (each demo answer is 1-7 characters, then the newline that ends it), and the
/// merge then keeps the tasks far better than from the prompts alone (27% against 8% measured).
#[test]
fn self_calibration_writes_the_answers_the_prompts_lack() {
    let plain = demo_merge(&Options { balance: Balance::Off, self_calibrate: 0, ..Options::default() });
    let calibrated = demo_merge(&Options { balance: Balance::Off, ..Options::default() });
    assert!(plain.report.self_calibration.is_none());
    let s = calibrated.report.self_calibration.as_ref().unwrap();
    for (i, t) in calibrated.report.tasks.iter().enumerate() {
        assert_eq!(s.samples_extended[i], t.samples, "every prompt of task {i} got an answer");
        assert!(s.tokens_added[i] >= t.samples && s.tokens_added[i] <= 7 * t.samples, "task {i}: {s:?}");
        assert_eq!(t.tokens, plain.report.tasks[i].tokens + s.tokens_added[i]);
    }
    let (a, b) = (accuracies(&plain), accuracies(&calibrated));
    println!("mean accuracy: prompts alone {:.3}, self-calibrated {:.3} ({a:?} → {b:?})", mean(&a), mean(&b));
    assert!(mean(&b) > mean(&a) + 0.1, "{a:?} → {b:?}");
}

/// Balancing records its rounds, keeps the round whose worst task was served best (never worse
/// than equal weights), and its final merge is the merge with those weights given by hand. By
/// default every sample is held out once (two folds) and a round is judged by agreement.
#[test]
fn balancing_keeps_the_best_round_by_held_out_agreement() {
    let r = demo_merge(&Options::default());
    let b = r.report.balancing.as_ref().unwrap();
    let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let disagreement =
        |i: usize| worst(&b.rounds[i].agreement.as_ref().unwrap().iter().map(|a| 1.0 - a).collect::<Vec<_>>());
    println!("weights {:?}; rounds {:?}", b.weights, b.rounds);
    assert_eq!((b.objective, b.folds, b.rounds.len()), (BalanceObjective::Agreement, 2, 3));
    assert_eq!(b.held_out, vec![50; 4], "every one of the 50 samples, once");
    assert_eq!(b.kl_before, b.rounds[0].kl);
    let kept = b.rounds.iter().position(|x| x.weights == b.weights).unwrap();
    for i in 0..b.rounds.len() {
        assert!(disagreement(kept) <= disagreement(i), "round {kept} kept, round {i} better");
    }
    assert!(
        b.rounds.iter().any(|x| x.weights != b.rounds[0].weights),
        "the demo's tasks are unequal: the weights move"
    );
    assert!((mean(&b.weights) - 1.0).abs() < 1e-12);
    assert_eq!(r.report.options.weights.as_ref(), Some(&b.weights));
    let by_hand = demo_merge(&Options { weights: Some(b.weights.clone()), ..Options::default() });
    assert!(by_hand.report.balancing.is_none(), "given weights are not balanced again");
    for (x, y) in r.outcome.merged.iter().zip(&by_hand.outcome.merged) {
        assert_eq!(x.a.data, y.a.data);
    }
}

/// The KL objective on one split (before cross-fitting): every fifth sample held out, and the
/// round with the smallest worst KL kept; without self-calibration, agreement falls back to KL.
#[test]
fn balancing_by_kl_on_every_fifth_sample() {
    let opts = Options { balance_objective: BalanceObjective::Kl, balance_folds: 1, ..Options::default() };
    let r = demo_merge(&opts);
    let b = r.report.balancing.as_ref().unwrap();
    let worst = |kl: &[f64]| kl.iter().copied().fold(0.0, f64::max);
    assert_eq!(b.held_out, vec![10; 4], "every fifth of 50 samples");
    assert!(b.rounds.iter().all(|x| x.agreement.is_none()));
    assert!(worst(&b.kl_after) < worst(&b.kl_before), "the demo's tasks are unequal: the weights move");
    let plain = demo_merge(&Options { self_calibrate: 0, ..Options::default() });
    assert_eq!(plain.report.balancing.as_ref().unwrap().objective, BalanceObjective::Kl);
}

/// Agreement, measured in one teacher-forced pass, is exactly greedy decoding: a sample agrees
/// when the merged model, decoding from the prompt with self-calibration's budget and stop rule,
/// writes the adapter's continuation and stops with the adapter's stop token.
#[test]
fn agreement_is_greedy_reproduction_of_the_adapters_continuation() {
    let base = fsio::read_base(&demo().join("base")).unwrap();
    let tasks = demo_tasks();
    let model = models::load(&Cpu, &base.config, &base.weights).unwrap();
    let adapters: Vec<_> = tasks.iter().map(|t| &t.adapter).collect();
    let targets = map_targets(&model.modules(), &adapters, model.model_type(), true).unwrap();
    let merged = demo_merge(&Options { balance: Balance::Off, ..Options::default() });
    let mut ids: Vec<Vec<Vec<u32>>> =
        tasks.iter().map(|t| tokenize(&base.tokenizer, &t.samples[..20], 128, None, "samples").unwrap().0).collect();
    let prompts = ids.clone();
    let single = vec![true; tasks.len()];
    let (_, cont) =
        self_calibrate(&Cpu, &model, &base.tokenizer, &targets, &mut ids, &single, 32, 128, None).block_on().unwrap();
    let mut hook = DeltaHook::new(&Cpu, &targets, Some(&merged.outcome.merged));
    let (mut some, mut none) = (false, false);
    for (i, task) in ids.iter().enumerate() {
        let teacher: Vec<_> = (0..task.len()).map(|k| cont.teacher(i, k, &task[k])).collect();
        let a = agreement(&Cpu, &model, &mut hook, task, &teacher, i).block_on().unwrap();
        // Greedy decoding by the merged model, recording the token that stops it.
        let mut seqs = prompts[i].clone();
        let budget: Vec<usize> = seqs.iter().map(|s| 32.min(128 - s.len())).collect();
        let stops = std::cell::RefCell::new(vec![None; seqs.len()]);
        let stop = |k: usize, t: u32| {
            let end = ends_line(&base.tokenizer, t);
            if end {
                stops.borrow_mut()[k] = Some(t);
            }
            end
        };
        let streams = vec![Stream::Merged; seqs.len()];
        continue_greedy(&Cpu, &model, &mut hook, &mut seqs, &budget, &streams, &stop, Decoding::Cached)
            .block_on()
            .unwrap();
        let stops = stops.into_inner();
        let same = (0..seqs.len()).filter(|&k| seqs[k] == task[k] && stops[k] == cont.stop[i][k]).count();
        println!("task {i}: {} of {} agree, mean −log p {:.3}", a.agreed, a.samples, a.mean_nll());
        assert_eq!((a.agreed, a.samples), (same, task.len()), "task {i}");
        some |= a.agreed > 0;
        none |= a.agreed < a.samples;
    }
    assert!(some && none, "the demo's merge keeps some continuations and loses others");
}

/// Self-calibration decodes every task's samples in one batch, each with its own adapter: the
/// continuations are those each adapter writes decoding its task's samples alone.
#[test]
fn self_calibration_batched_over_tasks_writes_what_each_adapter_writes_alone() {
    let base = fsio::read_base(&demo().join("base")).unwrap();
    let tasks = demo_tasks();
    let model = models::load(&Cpu, &base.config, &base.weights).unwrap();
    let adapters: Vec<_> = tasks.iter().map(|t| &t.adapter).collect();
    let targets = map_targets(&model.modules(), &adapters, model.model_type(), true).unwrap();
    // Unequal counts per task, so a decoding run mixes tasks at uneven boundaries.
    let mut ids: Vec<Vec<Vec<u32>>> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| tokenize(&base.tokenizer, &t.samples[..7 + 3 * i], 128, None, "samples").unwrap().0)
        .collect();
    let prompts = ids.clone();
    let single = vec![true; tasks.len()];
    let (s, cont) =
        self_calibrate(&Cpu, &model, &base.tokenizer, &targets, &mut ids, &single, 32, 128, None).block_on().unwrap();
    let mut hook = DeltaHook::new(&Cpu, &targets, None);
    for (i, task) in ids.iter().enumerate() {
        let mut seqs = prompts[i].clone();
        let budget: Vec<usize> = seqs.iter().map(|s| 32.min(128 - s.len())).collect();
        let stop = |_: usize, t: u32| ends_line(&base.tokenizer, t);
        let streams = vec![Stream::Adapter(i); seqs.len()];
        continue_greedy(&Cpu, &model, &mut hook, &mut seqs, &budget, &streams, &stop, Decoding::Cached)
            .block_on()
            .unwrap();
        assert_eq!(&seqs, task, "task {i}");
        assert_eq!(cont.prompt_len[i], prompts[i].iter().map(Vec::len).collect::<Vec<_>>());
        assert!(cont.stop[i].iter().all(Option::is_some), "task {i}: every demo answer ends its line");
        assert_eq!(s.tokens_added[i], task.iter().zip(&prompts[i]).map(|(a, b)| a.len() - b.len()).sum::<usize>());
    }
}

/// Task weights: only their ratios matter (each ridge is relative to its own task), and a larger
/// weight serves that task better.
#[test]
fn task_weights_shift_the_objective() {
    let with = |w: Option<Vec<f64>>| merge("gpt2", &Options { weights: w, ..Options::published() });
    let (one, two, favour) = (with(None), with(Some(vec![2.0; 3])), with(Some(vec![1.0, 4.0, 1.0])));
    for (a, b) in one.outcome.merged.iter().zip(&two.outcome.merged) {
        assert!(rel(&b.a, &a.a) < 1e-9, "scaling every weight changes nothing: {}", rel(&b.a, &a.a));
    }
    let err = |r: &pipeline::MergeResult| r.report.tasks.iter().map(|t| t.mean_alignment_error).collect::<Vec<_>>();
    let (e1, e4) = (err(&one), err(&favour));
    println!("alignment errors: equal {e1:?}, task 2 weighted 4 {e4:?}");
    assert!(e4[1] < e1[1] && e4[0] > e1[0] && e4[2] > e1[2]);
}
