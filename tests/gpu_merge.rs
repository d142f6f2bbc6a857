//! Whole merges on the GPU backend (software Vulkan in CI) against the CPU backend and the float64
//! reference, on the fixtures of every architecture.

mod common;
use common::*;
use iteris::backend::gpu::Gpu;
use iteris::fsio;
use iteris::merge::export::dense;
use iteris::merge::solve::SolvePath;
use iteris::merge::{Options, Schedule};

/// `arch`'s fixture merged on the GPU, and its worst module's relative error from the CPU's merge
/// and from the float64 reference in `file`.
fn gpu_against_cpu_and_reference(
    gpu: &Gpu,
    arch: &str,
    opts: &Options,
    file: &str,
) -> (iteris::merge::pipeline::MergeResult, f64, f64) {
    let g = merge_on(gpu, &base(arch), arch, opts);
    let c = merge(arch, opts);
    let exp = expected(arch, file);
    let (mut worst_cpu, mut worst_ref): (f64, f64) = (0.0, 0.0);
    for ((t, gm), cm) in g.outcome.targets.iter().zip(&g.outcome.merged).zip(&c.outcome.merged) {
        let gd = dense(gm);
        worst_cpu = worst_cpu.max(rel(&gd, &dense(cm)));
        worst_ref = worst_ref.max(rel(&gd, &exp.mat(&t.name).unwrap()));
    }
    (g, worst_cpu, worst_ref)
}

#[test]
fn gpu_merges_match_cpu_and_reference() {
    let Some(gpu) = gpu_or_skip("gpu_merges_match_cpu_and_reference") else { return };
    // Bounds: about 3× the worst figure measured on lavapipe (ARCHITECTURE.md, Numerics), so a
    // regression shows. At α = 1e-4 every architecture: 1.2e-5 vs the CPU, 1.1e-5 vs the float64
    // reference (BERT). At a 1e-7 ridge the solve amplifies every rounding of the statistics by up
    // to 1e7: the Grams and norms come back in twice f32 precision (Dot2) and LayerNorm's row
    // statistics are taken to that precision; measured vs CPU / reference: BERT 1.7e-4 / 2.4e-4
    // (its erf GELU is a 1.2e-7 series on the GPU), GPT-2 1.4e-4 / 9e-5, Llama family 1.5e-5 /
    // 1e-5 (f32 Grams gave 7e-3 on Llama).
    // (vs the CPU, vs the reference)
    let weak = |arch: &str| match arch {
        "bert" => (5e-4, 7e-4),
        // GPT-2 at this ridge is a lottery of f32 rounding (tests/merge_reference.rs): measured
        // 6.5e-4 vs the CPU, 4.0e-4 vs the reference (9e-5 before the deltas were added in place).
        "gpt2" => (2e-3, 1e-3),
        _ => (4.5e-5, 3e-5),
    };
    let cases = [
        (Options::published(), "expected_sweep_a1e-4.safetensors", None),
        (
            Options { schedule: Schedule::Jacobi, iters: 3, ..Options::published() },
            "expected_jacobi3_a1e-4.safetensors",
            None,
        ),
        (Options { alpha1: 1e-7, alpha2: 1e-7, ..Options::published() }, "expected_sweep_a1e-7.safetensors", Some(())),
    ];
    for arch in ARCHS {
        for (opts, file, weak_ridge) in &cases {
            let (tol_cpu, tol_ref) = &if weak_ridge.is_some() { weak(arch) } else { (3e-5, 3e-5) };
            let (g, worst_cpu, worst_ref) = gpu_against_cpu_and_reference(&gpu, arch, opts, file);
            assert!(worst_cpu <= *tol_cpu, "{arch} {file}: GPU vs CPU {worst_cpu:.2e}");
            assert!(worst_ref <= *tol_ref, "{arch} {file}: GPU vs float64 reference {worst_ref:.2e}");
            assert!(g.report.backend.starts_with("gpu"));
            let refined =
                g.report.modules.iter().filter(|m| m.solve_path == Some(SolvePath::GpuCholeskyF32Refined)).count();
            let fallback =
                g.report.modules.iter().filter(|m| m.solve_path == Some(SolvePath::CholeskyF64AfterGpu)).count();
            assert_eq!(
                refined + fallback,
                g.report.modules.len(),
                "{arch} {file}: every module solved through the GPU path or its fallback"
            );
            if opts.alpha2 >= 1e-4 {
                assert_eq!(fallback, 0, "{arch} {file}: at a 1e-4 ridge the refined f32 solve converges");
            }
            eprintln!("{arch} {file}: GPU vs CPU {worst_cpu:.2e}, vs reference {worst_ref:.2e}; solves: {refined} refined f32, {fallback} f64 fallback");
        }
    }
}

/// A stage costs one round trip: its statistics, the previous stage's alignment errors and the f32
/// Cholesky factors of its systems (assembled on the GPU from the statistics) come back together;
/// a pass's last alignment errors take one more. Every module's solve still ran through the GPU
/// factor.
#[test]
fn one_readback_per_stage() {
    use iteris::merge::baselines::Method;
    let Some(gpu) = gpu_or_skip("one_readback_per_stage") else { return };
    let stages = 8; // gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj; llama: q/k/v, o, gate/up, down; 2 blocks
    let cases = [
        (Options::published(), 1), // the sweep: one pass
        (Options { schedule: Schedule::Jacobi, iters: 2, ..Options::published() }, 3), // solves, then measures
        (Options { method: Method::Regmean, ..Options::published() }, 2), // solves, then measures
    ];
    for arch in ["gpt2", "llama"] {
        for (opts, passes) in &cases {
            let before = gpu.readbacks();
            let r = merge_on(&gpu, &base(arch), arch, opts);
            let n = gpu.readbacks() - before;
            let what = format!("{arch} {:?} {:?}", opts.method, opts.schedule);
            assert!(n <= passes * (stages + 1), "{what}: {n} readbacks for {passes} passes of {stages} stages");
            assert!(
                r.report.modules.iter().all(|m| m.solve_path == Some(SolvePath::GpuCholeskyF32Refined)),
                "{what}: every solve refined around the GPU's factor"
            );
            eprintln!("{what}: {n} readbacks, {passes} passes of {stages} stages");
        }
    }
}

/// Passes after the first re-record the dispatches of the one before and reuse their bind groups
/// (`BindCache` in backend/gpu/dispatch.rs): with more Jacobi passes the merge creates no more bind groups.
#[test]
fn bind_groups_reused_across_passes() {
    let Some(gpu) = gpu_or_skip("bind_groups_reused_across_passes") else { return };
    let mut created = Vec::new();
    for iters in [2, 4, 8] {
        let (c0, r0) = gpu.bind_groups();
        merge_on(&gpu, &base("llama"), "llama", &Options { schedule: Schedule::Jacobi, iters, ..Options::published() });
        let (c1, r1) = gpu.bind_groups();
        eprintln!("jacobi {iters}: {} bind groups created, {} reused", c1 - c0, r1 - r0);
        created.push(c1 - c0);
    }
    // Each merge loads the model afresh (new weight buffers), so its first passes create bind
    // groups; the passes after the first few repeat them: 8 solves create no more than 4.
    assert!(created[2] <= created[1], "bind groups created by 2, 4, 8 solves: {created:?}");
}

/// A half-precision checkpoint: the GPU keeps the weights packed (half the memory) and merges
/// exactly as the CPU does from the same values.
#[test]
fn f16_checkpoint_merges_like_the_cpu() {
    use iteris::formats::safetensors::{write, TensorFile};
    let d = temp_dir("f16-base");
    copy_dir(&fixture("gpt2").join("base"), &d);
    let p = d.join("model.safetensors");
    let tf = TensorFile::parse("x", std::fs::read(&p).unwrap()).unwrap();
    let m = tf.keys().map(|k| (k.clone(), tf.mat(k).unwrap())).collect();
    std::fs::write(&p, write(&m, true, None).unwrap()).unwrap();
    let f16_base = fsio::read_base(&d).unwrap();
    let Some(gpu) = gpu_or_skip("f16_checkpoint_merges_like_the_cpu") else { return };
    let g = merge_on(&gpu, &f16_base, "gpt2", &Options::published());
    let c = merge_on(&iteris::backend::cpu::Cpu, &f16_base, "gpt2", &Options::published());
    for (gm, cm) in g.outcome.merged.iter().zip(&c.outcome.merged) {
        let e = rel(&dense(gm), &dense(cm));
        assert!(e < 1e-4, "f16 checkpoint: GPU vs CPU {e:.2e}");
    }
}

/// A batch whose widest activation exceeds the GPU's binding limit runs in chunks of rows that
/// each fit (`models::chunked`): the same merge as in one piece, still one readback per stage, for
/// every architecture and schedule. A limit that one sample alone exceeds is refused by the memory
/// plan before any work, and held-out evaluation splits its logits into runs that fit: the same KL
/// as with no limit.
#[test]
fn binding_limits_chunk_refuse_or_split_instead_of_failing() {
    use iteris::formats::samples::EvalSet;
    use iteris::merge::baselines::Method;
    use pollster::FutureExt;
    let Some(whole) = gpu_or_skip("binding_limits_chunk_refuse_or_split_instead_of_failing") else { return };
    // Per architecture: a limit that holds the widest Gram and about 128 token rows of the widest
    // activation (the fixture batches are about 1500 rows).
    // GPT-2 at 32 KiB with samples cut to 8 tokens: its 128 × 128 Grams (64 KiB) are kept in row
    // blocks too, and solved on the host without a GPU factor.
    // Gemma 3: its embedding (300 × 64 f32, 75 KiB) exceeds the limit too and is split by rows, as
    // a real Gemma's 262k-row table is. Phi-3: fused projections (its longest sample is 132 rows
    // of 192-wide gate_up outputs, 99 KiB, over both streams).
    for (arch, limit, max_len) in [
        ("gpt2", 64 << 10, 128),
        ("llama", 48 << 10, 128),
        ("bert", 32 << 10, 128),
        ("gpt2", 32 << 10, 8),
        ("gemma3", 64 << 10, 128),
        ("phi3", 128 << 10, 128),
    ] {
        let mut limited = Gpu::new().unwrap();
        limited.limit_bindings(limit);
        let base_opts = Options { max_len, ..Options::published() };
        for opts in [
            base_opts.clone(),
            Options { schedule: Schedule::Jacobi, iters: 2, ..base_opts.clone() },
            Options { method: Method::Regmean, ..base_opts.clone() },
        ] {
            let what = format!("{arch} at {} KiB, {:?} {:?}", limit >> 10, opts.method, opts.schedule);
            let before = whole.readbacks();
            let w = merge_on(&whole, &base(arch), arch, &opts);
            let whole_readbacks = whole.readbacks() - before;
            let before = limited.readbacks();
            let c = merge_on(&limited, &base(arch), arch, &opts);
            let readbacks = limited.readbacks() - before;
            let plan = &c.report.memory_plan;
            let rows: usize = c.outcome.tokens.iter().sum::<usize>() * 2;
            assert!(plan.chunk_rows * 3 <= rows, "{what}: chunks of {} rows for {rows} rows", plan.chunk_rows);
            assert!(plan.largest_tensor_bytes <= limit, "{what}: {} > {limit}", plan.largest_tensor_bytes);
            assert_eq!(readbacks, whole_readbacks, "{what}: readbacks chunked and whole");
            let mut worst: f64 = 0.0;
            for (a, b) in w.outcome.merged.iter().zip(&c.outcome.merged) {
                worst = worst.max(rel(&dense(a), &dense(b)));
            }
            // Where a task's rows span chunks its Gram sums run in another order (both 1e-13 from
            // exact); the solve amplifies that by up to 1/α, and merged rows downstream carry it
            // on: measured ≤ 2e-6 on lavapipe (GPU vs CPU differ by 1.2e-5).
            assert!(worst < 1e-5, "{what}: chunked vs whole {worst:.2e}");
            let align = |r: &iteris::merge::pipeline::MergeResult| -> Vec<f64> {
                r.outcome.records.iter().flat_map(|m| m.align.iter().flatten().copied()).collect::<Vec<_>>()
            };
            let (wa, ca) = (align(&w), align(&c));
            assert_eq!(wa.len(), ca.len(), "{what}: alignment errors of every module and task");
            for (a, b) in wa.iter().zip(&ca) {
                assert!((a - b).abs() <= 1e-4 * a.abs().max(1e-6), "{what}: alignment {a} vs {b}");
            }
            if limit < 64 << 10 && arch == "gpt2" {
                let wide = c.report.modules.iter().filter(|m| m.module.ends_with("mlp.c_proj"));
                assert!(
                    wide.clone().count() == 2
                        && wide.clone().all(|m| m.solve_path == Some(SolvePath::CholeskyF64AfterGpu)),
                    "{what}: the modules whose Grams exceed a binding are solved on the host"
                );
            }
            eprintln!(
                "{what}: {} rows in chunks of ≤ {}, {readbacks} readbacks, chunked vs whole {worst:.1e}",
                rows, plan.chunk_rows
            );
        }
    }

    let mut small = Gpu::new().unwrap();
    small.limit_bindings(4 << 10);
    let b = base("gpt2");
    let refused = iteris::merge::pipeline::merge(&small, &b, &tasks("gpt2"), &Options::published(), &mut |_| {})
        .block_on()
        .err()
        .expect("the plan refuses the merge");
    assert!(refused.to_string().starts_with("memory plan: the largest tensor"), "{refused}");

    let lines: String =
        (0..40).map(|k| format!("the cat sat on the mat number {k} and the dog ran far away\n")).collect();
    let with_eval = || {
        let mut t = tasks("gpt2");
        for x in &mut t {
            x.eval = Some(EvalSet::parse("held_out.txt", lines.as_bytes()).unwrap());
        }
        t
    };
    let kl = |gpu: &Gpu| {
        let r = iteris::merge::pipeline::merge(gpu, &b, &with_eval(), &Options::published(), &mut |_| {})
            .block_on()
            .unwrap();
        r.quality.unwrap().iter().map(|q| q.kl).collect::<Vec<_>>()
    };
    let mut limited = Gpu::new().unwrap();
    // The merge's batch fits; all 40 held-out samples' logits (2 × ~600 rows × 300) do not.
    limited.limit_bindings(1 << 20);
    let (whole, split) = (kl(&Gpu::new().unwrap()), kl(&limited));
    for (w, s) in whole.iter().zip(&split) {
        assert!((w - s).abs() <= 1e-6 * w.abs().max(1e-12), "KL {w} vs {s} with split evaluation");
    }
}

/// The KV cache on the GPU (`write_rows` into slots, attention over cached keys): each decoding
/// pass's logits equal rerunning the sequences whole, on GPT-2 (learned positions), Mistral
/// (rotary positions, sliding window of 6), Gemma 2 (soft-capping) and Phi-3 (partial rotary,
/// longrope).
#[test]
fn cached_decoding_on_the_gpu_equals_recomputed_decoding() {
    let Some(gpu) = gpu_or_skip("cached_decoding_on_the_gpu_equals_recomputed_decoding") else { return };
    for arch in ["gpt2", "mistral", "gemma2", "phi3"] {
        let e = cached_decoding_error(&gpu, arch);
        // Measured 0 on lavapipe: one query row runs the same sums either way.
        assert!(e < 1e-5, "{arch}: cached logits differ from recomputed ones by {e:.2e} on the GPU");
    }
}

/// Task weights λ reach the GPU's own assembly of each system (`shaders/system/scalars.wgsl` reads the
/// scaled adaptive-weight terms): the merge equals the CPU's, and every module's f32 factor still
/// refines (a factor of another M would not), for IterIS and RegMean.
#[test]
fn task_weights_reach_the_gpu_factor() {
    let Some(gpu) = gpu_or_skip("task_weights_reach_the_gpu_factor") else { return };
    for method in [iteris::merge::Method::Iteris, iteris::merge::Method::Regmean] {
        for arch in ["gpt2", "llama"] {
            let opts = Options { method, weights: Some(vec![1.0, 3.0, 0.5]), ..Options::published() };
            let (g, c) = (merge_on(&gpu, &base(arch), arch, &opts), merge(arch, &opts));
            let unweighted = merge(arch, &Options { method, ..Options::published() });
            let worst = |x: &iteris::merge::pipeline::MergeResult, y: &iteris::merge::pipeline::MergeResult| {
                x.outcome
                    .merged
                    .iter()
                    .zip(&y.outcome.merged)
                    .map(|(a, b)| rel(&dense(a), &dense(b)))
                    .fold(0.0, f64::max)
            };
            let (vs_cpu, moved) = (worst(&g, &c), worst(&c, &unweighted));
            eprintln!(
                "{arch} {}: weighted GPU vs CPU {vs_cpu:.2e}; the weights moved the merge by {moved:.2e}",
                method.name()
            );
            assert!(vs_cpu <= 3e-5, "{arch}: {vs_cpu:.2e}");
            assert!(moved > 1e-3, "{arch}: the weights change the merge ({moved:.2e})");
            assert!(g.report.modules.iter().all(|m| m.solve_path == Some(SolvePath::GpuCholeskyF32Refined)));
        }
    }
}

/// The output objective on the GPU: its extra statistics (X̃ᵀ(Y − X̃W0ᵀ), (in, out) Grams of the
/// module outputs) come back like the others, and the merge equals the CPU's and the float64
/// reference's, on the adapters' modules and on every module of the layers.
#[test]
fn output_objective_on_the_gpu() {
    use iteris::merge::{ModuleSet, Objective};
    let Some(gpu) = gpu_or_skip("output_objective_on_the_gpu") else { return };
    let opts = Options { objective: Objective::Output, rank: Some(4096), ..Options::published() };
    for arch in ["gpt2", "llama", "qwen2"] {
        for (opts, file) in [
            (opts.clone(), "expected_output_a1e-4.safetensors"),
            (Options { modules: ModuleSet::All, ..opts.clone() }, "expected_output_all_a1e-4.safetensors"),
        ] {
            let (_, worst_cpu, worst_ref) = gpu_against_cpu_and_reference(&gpu, arch, &opts, file);
            eprintln!("{arch} {file}: GPU vs CPU {worst_cpu:.2e}, vs reference {worst_ref:.2e}");
            assert!(
                worst_cpu <= 3e-5 && worst_ref <= 3e-5,
                "{arch} {file}: GPU vs CPU {worst_cpu:.2e}, vs reference {worst_ref:.2e}"
            );
        }
    }
}
