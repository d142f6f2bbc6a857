//! Self-calibration and task balancing (ARCHITECTURE.md, "How a merge flows" 4b and 5b), on the
//! bundled demo (whose calibration samples are prompts only) and the GPT-2 fixture.

mod common;

use common::{demo, demo_tasks, merge, rel};
use iteris::backend::cpu::Cpu;
use iteris::fsio;
use iteris::merge::{pipeline, Balance, Options};
use pollster::FutureExt;

fn demo_merge(opts: &Options) -> pipeline::MergeResult {
    let base = fsio::read_base(&demo().join("base")).unwrap();
    let opts = Options { eval_limit: Some(50), ..opts.clone() };
    pipeline::merge(&Cpu, &base, &demo_tasks(), &opts, false, &mut |_| {}).block_on().unwrap()
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

/// Balancing records its rounds, keeps the round whose worst held-out KL is smallest (never worse
/// than equal weights), and its final merge is the merge with those weights given by hand.
#[test]
fn balancing_lowers_the_worst_held_out_kl() {
    let r = demo_merge(&Options::default());
    let b = r.report.balancing.as_ref().unwrap();
    let worst = |kl: &[f64]| kl.iter().copied().fold(0.0, f64::max);
    println!("weights {:?}; held-out KL {:?} → {:?}", b.weights, b.kl_before, b.kl_after);
    assert_eq!(b.rounds.len(), 3);
    assert_eq!(b.held_out, vec![10; 4], "every fifth of 50 samples");
    assert_eq!(b.kl_before, b.rounds[0].kl);
    assert!(worst(&b.kl_after) <= worst(&b.kl_before));
    assert!(worst(&b.kl_after) < worst(&b.kl_before), "the demo's tasks are unequal: the weights move");
    assert!((mean(&b.weights) - 1.0).abs() < 1e-12);
    assert_eq!(r.report.options.weights.as_ref(), Some(&b.weights));
    let by_hand = demo_merge(&Options { weights: Some(b.weights.clone()), ..Options::default() });
    assert!(by_hand.report.balancing.is_none(), "given weights are not balanced again");
    for (x, y) in r.outcome.merged.iter().zip(&by_hand.outcome.merged) {
        assert_eq!(x.a.data, y.a.data);
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
