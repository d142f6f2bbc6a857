//! From checked inputs to the merged adapter's files: the one entry point the CLI, the tests and
//! (later) the wasm bindings call.

use super::balance::{balance, MIN_SAMPLES};
use super::calibrate::self_calibrate;
use super::evaluate::{self, DeltaHook, TaskQuality};
use super::export::{adapter_files, reduce_rank};
use super::report::{module_reports, task_means, Report, TaskReport, Timings};
use super::{iteris, map_targets, now, plan, tokenize, Balance, Options, Progress};
use crate::backend::Backend;
use crate::backend::Backward;
use crate::error::Result;
use crate::formats::hf_config::HfConfig;
use crate::formats::samples::EvalSet;
use crate::inputs::{BaseInputs, TaskInput};
use crate::models;
use crate::models::chunked::{chunk_batches, Streams};
use crate::models::Stream;

/// Everything a merge produces.
pub struct MergeResult {
    /// Quality on the tasks' held-out samples, where they were given.
    pub quality: Option<Vec<super::evaluate::TaskQuality>>,
    pub adapter_config: Vec<u8>,
    pub adapter_weights: Vec<u8>,
    /// The same merged adapter as MLX files (adapter_config.json, adapters.safetensors), or why
    /// mlx-lm could not load it (`formats::mlx::files`).
    pub mlx: Result<(Vec<u8>, Vec<u8>)>,
    /// The same merged adapter as a llama.cpp LoRA (`adapter.gguf`), or why it has none
    /// (`formats::gguf::lora`).
    pub gguf: Result<Vec<u8>>,
    /// The merged adapter's factors per target (`outcome.targets`), as written (rank-reduced
    /// where asked), and whether the base stores linear weights as (in, out): what a dense
    /// model adds to the base (`write_dense`).
    pub deltas: Vec<super::solve::Merged>,
    pub fan_in_fan_out: bool,
    pub report: Report,
    pub outcome: super::Outcome,
}

impl MergeResult {
    /// The files a merge writes, by their paths in the output folder (the CLI's `--out`, the
    /// page's zip): PEFT's adapter, the report, the same adapter as MLX files under `mlx/` where
    /// `asked.mlx` (an error where mlx-lm could not load them) or where an input adapter came as
    /// MLX files (left out, with a warning in the report, where they cannot be written), and as a
    /// llama.cpp LoRA (`adapter.gguf`) where `asked.gguf`, and the merged model's small files
    /// under `dense/` where `asked.dense` (its weights: `streamed_files`).
    pub fn output_files(
        &self,
        base: &BaseInputs,
        tasks: &[TaskInput],
        asked: Formats,
    ) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let mlx_asked = asked.mlx;
        let mut report = serde_json::to_value(&self.report).map_err(|e| crate::error::Error::Io(e.to_string()))?;
        let mlx_input = tasks.iter().any(|t| crate::formats::mlx::is_mlx(&t.adapter.config));
        let mlx = match (&self.mlx, mlx_asked) {
            (Ok(files), _) if mlx_asked || mlx_input => Some(files),
            (Err(e), true) => return Err(crate::error::bad_input("--mlx", e.to_string())),
            (Err(e), false) if mlx_input => {
                if let Some(w) = report["warnings"].as_array_mut() {
                    w.push(format!("no MLX files: {e}").into());
                }
                None
            }
            _ => None,
        };
        let report = serde_json::to_vec_pretty(&report).map_err(|e| crate::error::Error::Io(e.to_string()))?;
        let mut files = vec![
            ("adapter_config.json", self.adapter_config.clone()),
            ("adapter_model.safetensors", self.adapter_weights.clone()),
            ("merge_report.json", report),
        ];
        if let Some((config, weights)) = mlx {
            files.push(("mlx/adapter_config.json", config.clone()));
            files.push(("mlx/adapters.safetensors", weights.clone()));
        }
        if asked.gguf {
            let gguf = self.gguf.as_ref().map_err(|e| crate::error::bad_input("--gguf", e.to_string()))?;
            files.push(("adapter.gguf", gguf.clone()));
        }
        if asked.dense {
            let [config, tokenizer] = super::dense::small_files(base)?;
            files.push(("dense/config.json", config));
            files.push(("dense/tokenizer.json", tokenizer));
        }
        Ok(files)
    }

    /// The files too large to hold, written into the output as they are made: the merged
    /// model's weights, `dense/model.safetensors`, where `asked.dense`.
    pub fn streamed_files<'a>(&'a self, base: &'a BaseInputs, asked: Formats) -> Vec<super::export::Streamed<'a>> {
        match asked.dense {
            true => vec![("dense/model.safetensors", Box::new(move |w| self.write_dense_model(base, w)))],
            false => Vec::new(),
        }
    }

    /// The merged model's model.safetensors, streamed to `out` tensor by tensor.
    pub fn write_dense_model(&self, base: &BaseInputs, out: &mut dyn std::io::Write) -> Result<()> {
        super::dense::write_model(&base.weights, &self.outcome.targets, &self.deltas, self.fan_in_fan_out, out)
    }
}

/// The output formats a front end asks for beside PEFT's.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct Formats {
    /// mlx-lm's adapter files under `mlx/`.
    pub mlx: bool,
    /// A llama.cpp LoRA, `adapter.gguf`.
    pub gguf: bool,
    /// The merged model itself under `dense/` (`MergeResult::write_dense_model`; the front end
    /// streams it into its output).
    pub dense: bool,
}

/// A base model loaded on a backend, once for every merge and evaluation of a job (a comparison's
/// methods, a study's merges, the adapters-alone figures).
pub struct LoadedBase<'a, B: Backend> {
    pub inputs: &'a BaseInputs,
    pub model: models::Model<B::T>,
    /// The seconds the load took (the first merge's `timings_s.load` counts them).
    seconds: std::cell::Cell<f64>,
    /// The host memory in use before the load, and whether a merge has measured its phases since.
    before_bytes: u64,
}

/// Load `base` on `be`, after the memory plan of its weights (`max_memory_mib`: Options's cap).
pub fn load<'a, B: Backend>(be: &B, base: &'a BaseInputs, max_memory_mib: Option<u64>) -> Result<LoadedBase<'a, B>> {
    let peaks = PhasePeaks::start();
    let t = now();
    plan::weights_plan(be, &base.weights, max_memory_mib).check(&be.name())?;
    let model = models::load(be, &base.config, &base.weights)?;
    Ok(LoadedBase { inputs: base, model, seconds: std::cell::Cell::new(now() - t), before_bytes: peaks.base })
}

/// Load the base and merge: `merge_loaded` with a load of its own.
pub async fn merge<B: Backward>(
    be: &B,
    base: &BaseInputs,
    tasks: &[TaskInput],
    opts: &Options,
    progress: &mut dyn FnMut(Progress),
) -> Result<MergeResult> {
    opts.validate(tasks.len())?;
    merge_loaded(be, &load(be, base, opts.max_memory_mib)?, tasks, opts, progress).await
}

/// Merge the adapters of `tasks` into one, on a base model loaded already.
pub async fn merge_loaded<B: Backward>(
    be: &B,
    loaded: &LoadedBase<'_, B>,
    tasks: &[TaskInput],
    opts: &Options,
    progress: &mut dyn FnMut(Progress),
) -> Result<MergeResult> {
    opts.validate(tasks.len())?;
    let (base, model) = (loaded.inputs, &loaded.model);
    let mut timings = Timings::default();
    // The first merge on a load counts the load's time and memory in its "load" phase.
    let mut peaks = PhasePeaks { base: loaded.before_bytes, peaks: Vec::new() };
    let t = now() - loaded.seconds.replace(0.0);
    let adapters: Vec<_> = tasks.iter().map(|t| &t.adapter).collect();
    let mut targets = map_targets(&model.modules(), &adapters, model.model_type(), model.fan_in_fan_out())?;
    if opts.method == super::Method::Iteris
        && opts.objective == super::Objective::Output
        && opts.modules == super::ModuleSet::All
    {
        targets = super::with_every_module(&model.modules(), targets);
    }
    if opts.refine_steps > 0 && !matches!(model, models::Model::Decoder(_)) {
        return Err(crate::error::Error::Unsupported(format!(
            "distillation refinement (--refine-steps) runs on the decoder families (llama, mistral, qwen2, qwen3, smollm3, gemma2, gemma3, phi3); {} is not one of them yet",
            model.model_type()
        )));
    }
    timings.load = now() - t;

    let t = now();
    let max_len = opts.max_len.min(model.max_positions());
    let mut warnings = Vec::new();
    if opts.max_len > model.max_positions() {
        warnings.push(format!(
            "max length (--max-len) {} exceeds the model's {} positions: samples are cut to {}",
            opts.max_len,
            model.max_positions(),
            max_len
        ));
    }
    let vocab = Some(model.vocab());
    let decoder = model.is_causal();
    let mut ids = Vec::new();
    let mut cut = Vec::new();
    for task in tasks {
        let (s, c) = tokenize(&base.tokenizer, &task.samples, max_len, vocab, &task.samples_name)?;
        if c > 0 {
            warnings.push(format!(
                "{}: {c} of {} samples were longer than {max_len} tokens and were truncated",
                super::report::file_name(&task.samples_name),
                s.len()
            ));
        }
        ids.push(s);
        cut.push(c);
    }
    timings.tokenize = now() - t;
    peaks.end("load");

    // Self-calibration and balancing read next-token distributions: decoders only.
    let data_driven = !opts.method.data_free();
    let calibrate = data_driven && decoder && opts.self_calibrate > 0;
    let modules = model.modules();
    let auto_balance =
        opts.method == super::Method::Iteris && opts.balance == Balance::Auto && opts.weights.is_none() && decoder;
    let quality_shapes = quality_shapes(base, model, tasks, opts.eval_limit)?;
    let base_bytes = peaks.base;
    let plan_for = |ids: &[Vec<Vec<u32>>], generation: Option<(usize, usize, usize)>| {
        let chunks = chunk_batches(ids, Streams::Both, plan::chunk_rows(be, &modules, &targets));
        let chunk_rows: Vec<usize> = chunks.iter().map(|b| b.tokens()).collect();
        let output = opts.method == super::Method::Iteris && opts.objective == super::Objective::Output;
        let task_tokens = ids.iter().map(|s| s.iter().map(Vec::len).sum::<usize>()).max().unwrap_or(0);
        let task_samples = ids.iter().map(Vec::len).max().unwrap_or(0);
        let rank = iteris::default_dense_rank(&targets).max(opts.rank.unwrap_or(0));
        let shapes = plan::PhaseShapes {
            base_bytes,
            row_floats: model.row_floats(),
            vocab: modules.iter().find(|m| m.name == "lm_head").map_or(0, |m| m.out_dim),
            kv_token_bytes: models::kv_cache::KvCache::<B::T>::token_bytes(&model.kv_widths()),
            eval_rows: evaluate::rows_within(be, model, plan::EVAL_LOGITS_BYTES),
            decode_rows: evaluate::rows_within(be, model, plan::DECODING_BYTES),
            self_calibration: generation,
            balancing: (auto_balance && ids.iter().all(|s| s.len() >= MIN_SAMPLES))
                .then(|| (task_tokens, task_samples * (opts.self_calibrate + 1))),
            quality: quality_shapes,
            // The PEFT and MLX files, and the merged factors they are written from.
            export_bytes: 3 * targets.iter().map(|t| (rank * (t.in_dim + t.out_dim) * 4) as u64).sum::<u64>(),
        };
        plan::merge_plan(
            be,
            &base.weights,
            &modules,
            &targets,
            &chunk_rows,
            tasks.len(),
            output,
            &shapes,
            opts.max_memory_mib,
        )
    };
    // The plan is checked before any pass, for the longest the samples can become: each as long
    // as self-calibration may make it.
    let generation = calibrate.then(|| {
        let lens = ids.iter().flatten().map(Vec::len);
        let longest = lens.clone().map(|n| (n + opts.self_calibrate).min(max_len).max(n)).max().unwrap_or(0);
        (lens.clone().count(), longest, lens.sum::<usize>())
    });
    if calibrate {
        let longest: Vec<Vec<Vec<u32>>> = ids
            .iter()
            .map(|s| s.iter().map(|x| vec![0; (x.len() + opts.self_calibrate).min(max_len).max(x.len())]).collect())
            .collect();
        plan_for(&longest, generation).check(&be.name())?;
    }
    // Refinement distils on recombinations of the given prompts (`refine::augment`).
    let prompts = (opts.refine_steps > 0).then(|| ids.clone());
    let single_line: Vec<bool> = tasks.iter().map(|t| t.samples.iter().all(|s| !s.contains('\n'))).collect();
    let mut continuations = None;
    let self_calibration = if calibrate {
        let eos = base.config.eos_token();
        let (s, c) = self_calibrate(
            be,
            model,
            &base.tokenizer,
            &targets,
            &mut ids,
            &single_line,
            opts.self_calibrate,
            max_len,
            eos,
        )
        .await?;
        timings.self_calibration = s.seconds;
        continuations = Some(c);
        Some(s)
    } else {
        None
    };
    peaks.end("self_calibration");
    let mut memory = plan_for(&ids, generation);
    if opts.refine_steps > 0 {
        // The merged factors are at most Σr wide per module (a dense solution is cut to --rank).
        let rank = iteris::default_dense_rank(&targets).max(opts.rank.unwrap_or(0));
        let params: u64 = targets.iter().map(|t| (rank * (t.in_dim + t.out_dim)) as u64).sum();
        plan::add_refinement(&mut memory, &modules, params, be.on_device());
    }
    memory.check(&be.name())?;
    // Balancing holds out every fifth sample: below `balance::MIN_SAMPLES` per task the merges it
    // compares would lose too much of their samples, and its held-out KL is too noisy to trust.
    let few = ids.iter().map(Vec::len).min().unwrap_or(0);
    if auto_balance && few < MIN_SAMPLES {
        warnings.push(format!(
            "balancing skipped: a task has {few} samples, fewer than the {MIN_SAMPLES} it needs to hold some out; every task weighs 1"
        ));
    }
    let balancing = if auto_balance && few >= MIN_SAMPLES {
        let b = balance(be, model, &targets, &ids, continuations.as_ref(), opts, progress)
            .await
            .map_err(|e| non_finite(e, &base.config, tasks))?;
        timings.balancing = b.seconds;
        Some(b)
    } else {
        None
    };
    peaks.end("balancing");
    let balanced;
    let opts = match &balancing {
        Some(b) => {
            balanced = Options { weights: Some(b.weights.clone()), ..opts.clone() };
            &balanced
        }
        None => opts,
    };
    let mut outcome =
        iteris(be, model, targets, &ids, opts, progress).await.map_err(|e| non_finite(e, &base.config, tasks))?;
    check_finite(&outcome)?;
    timings.passes = outcome.seconds_passes;
    peaks.end("passes");
    let refinement = if let Some(prompts) = prompts {
        let t = now();
        let mut extra = super::refine::augment(&prompts, opts.refine_augment, opts.seed);
        if calibrate {
            let eos = base.config.eos_token();
            let (targets, n) = (&outcome.targets, opts.self_calibrate);
            let tok = &base.tokenizer;
            self_calibrate(be, model, tok, targets, &mut extra, &single_line, n, max_len, eos).await?;
        }
        let batch: Vec<usize> = ids.iter().map(Vec::len).collect();
        let pool: Vec<Vec<Vec<u32>>> =
            ids.iter().zip(extra).map(|(g, e)| g.iter().cloned().chain(e).collect()).collect();
        let mut r = refine_merge(be, model, &mut outcome, &pool, &batch, opts, progress).await?;
        r.seconds = now() - t;
        check_finite(&outcome)?;
        timings.refinement = r.seconds;
        Some(r)
    } else {
        None
    };
    peaks.end("refinement");

    let t = now();
    let (deltas, energy): (Vec<_>, Vec<_>) = outcome
        .merged
        .iter()
        .zip(&outcome.energy)
        .map(|(m, e)| match opts.rank {
            Some(r) => {
                let (m, kept) = reduce_rank(m, r);
                (m, e * kept)
            }
            None => (m.clone(), *e),
        })
        .unzip();
    let files = adapter_files(&outcome.targets, &deltas, &tasks[0].adapter, model.fan_in_fan_out(), opts.f16)?;
    let mlx_modules: Vec<_> = outcome.targets.iter().zip(&deltas).map(|(t, d)| (t.path.as_str(), &d.a, &d.b)).collect();
    let layers = crate::formats::mlx::layer_count(model.modules().iter().map(|m| m.name.as_str()));
    let mlx = crate::formats::mlx::files(&mlx_modules, layers, model.fan_in_fan_out(), opts.f16);
    let gguf_modules: Vec<_> =
        outcome.targets.iter().zip(&deltas).map(|(t, d)| (t.name.as_str(), &d.a, &d.b)).collect();
    let gguf_base = crate::formats::gguf::lora::BaseModel { model_type: model.model_type(), heads: model.heads() };
    let gguf = crate::formats::gguf::lora::adapter_file(&gguf_base, &gguf_modules, opts.f16);
    timings.export = now() - t;
    peaks.end("export");

    let t = now();
    let quality = if tasks.iter().any(|t| t.eval.is_some()) && opts.eval_limit != Some(0) {
        progress(Progress::Quality);
        Some(merged_quality(be, base, model, &outcome.targets, &deltas, tasks, opts.eval_limit).await?)
    } else {
        None
    };
    timings.quality = now() - t;
    peaks.end("quality");

    let means = task_means(&outcome.records, tasks.len());
    warnings.extend(outcome.warnings.iter().cloned());
    let report = Report {
        tool: format!("iteris {}", env!("CARGO_PKG_VERSION")),
        method: match (opts.method, opts.schedule) {
            (super::Method::Iteris, super::Schedule::Sweep) => match (opts.objective, opts.modules) {
                (super::Objective::Delta, _) => "iteris-sweep".to_string(),
                (super::Objective::Output, super::ModuleSet::Adapters) => "iteris-sweep-output".to_string(),
                (super::Objective::Output, super::ModuleSet::All) => "iteris-sweep-output-all".to_string(),
            },
            (super::Method::Iteris, super::Schedule::Jacobi) => "iteris-jacobi".to_string(),
            (m, _) => m.name().to_string(),
        } + if refinement.is_some() { "-refined" } else { "" },
        options: opts.clone(),
        backend: be.name(),
        model_type: model.model_type().to_string(),
        tasks: tasks
            .iter()
            .enumerate()
            .map(|(i, t)| TaskReport {
                adapter: t.adapter.name.clone(),
                samples_file: t.samples_name.clone(),
                samples: outcome.samples[i],
                tokens: outcome.tokens[i],
                truncated_samples: cut[i],
                mean_alignment_error: means[i],
            })
            .collect(),
        modules: module_reports(&outcome, &deltas.iter().map(|d| d.rank()).collect::<Vec<_>>(), &energy),
        jacobi_changes: outcome.changes.clone(),
        adapter_inputs: outcome.adapter_inputs,
        quality: quality.clone(),
        balancing,
        self_calibration,
        refinement,
        memory_plan: memory,
        memory_peaks: peaks.peaks,
        warnings,
        notes: Vec::new(),
        timings_s: timings,
    };
    Ok(MergeResult {
        quality,
        adapter_config: files.config,
        adapter_weights: files.weights,
        mlx,
        gguf,
        deltas,
        fan_in_fan_out: model.fan_in_fan_out(),
        report,
        outcome,
    })
}

/// The host memory's peak in each phase of a merge, as measured (`profile::host_peak_bytes`),
/// and what was in use when it began.
struct PhasePeaks {
    base: u64,
    peaks: Vec<super::report::PhasePeak>,
}

impl PhasePeaks {
    fn start() -> Self {
        crate::profile::reset_host_peak();
        PhasePeaks { base: crate::profile::host_peak_bytes().unwrap_or(0), peaks: Vec::new() }
    }

    /// The phase `name` ends: record its peak and start the next one's.
    fn end(&mut self, phase: &'static str) {
        if let Some(bytes) = crate::profile::host_peak_bytes() {
            self.peaks.push(super::report::PhasePeak { phase, bytes });
        }
        crate::profile::reset_host_peak();
    }
}

/// Held-out evaluation's shapes for the memory plan (`plan::PhaseShapes::quality`): the KL
/// pass's rows (one task's samples, both streams) and the greedy decoding of every labeled
/// sample by the merged model and by its adapter.
fn quality_shapes<T>(
    base: &BaseInputs,
    model: &models::Model<T>,
    tasks: &[TaskInput],
    limit: Option<usize>,
) -> Result<Option<(usize, Option<(usize, usize, usize)>)>> {
    if limit == Some(0) || tasks.iter().all(|t| t.eval.is_none()) {
        return Ok(None);
    }
    let max_pos = model.max_positions();
    let (mut kl_rows, mut seqs, mut longest, mut prompts) = (0, 0, 0, 0);
    for set in tasks.iter().filter_map(|t| t.eval.as_ref().map(|e| e.first(limit))) {
        kl_rows = kl_rows.max(2 * eval_ids(base, &set, max_pos)?.iter().map(Vec::len).sum::<usize>());
        for (p, a) in set.labeled() {
            let (p, a) = (base.tokenizer.encode(p, max_pos)?.ids.len(), base.tokenizer.encode(a, max_pos)?.ids.len());
            seqs += 2;
            prompts += 2 * p;
            longest = longest.max((p + a + 2).min(max_pos));
        }
    }
    Ok(Some((kl_rows, (seqs > 0).then_some((seqs, longest, prompts)))))
}

/// Distillation refinement of the merged deltas (`refine`), on the merge's own backend and model.
#[allow(clippy::too_many_arguments)]
async fn refine_merge<B: Backward>(
    be: &B,
    model: &models::Model<B::T>,
    outcome: &mut super::Outcome,
    pool: &[Vec<Vec<u32>>],
    batch: &[usize],
    opts: &Options,
    progress: &mut dyn FnMut(Progress),
) -> Result<super::refine::Refinement> {
    let models::Model::Decoder(decoder) = model else {
        return Err(crate::error::Error::Unsupported("distillation refinement needs a decoder model".into()));
    };
    let weights = opts.weights.clone().unwrap_or_else(|| vec![1.0; pool.len()]);
    super::refine::refine(
        be,
        decoder,
        &outcome.targets,
        &mut outcome.merged,
        pool,
        batch,
        &weights,
        opts.refine_steps,
        opts.refine_lr,
        opts.seed,
        progress,
    )
    .await
}

fn eval_ids(base: &BaseInputs, set: &EvalSet, max_len: usize) -> Result<Vec<Vec<u32>>> {
    let texts: Vec<String> = set.items.iter().map(|(p, a)| format!("{p}{}", a.as_deref().unwrap_or(""))).collect();
    Ok(super::tokenize(&base.tokenizer, &texts, max_len, None, &set.name)?.0)
}

/// KL and (labeled sets) accuracy of the merged deltas on each task's held-out samples, and the
/// accuracy of each task's own adapter alone there. The generations all decode together.
async fn merged_quality<B: Backend>(
    be: &B,
    base: &BaseInputs,
    model: &models::Model<B::T>,
    targets: &[super::iteris::Target],
    deltas: &[super::solve::Merged],
    tasks: &[TaskInput],
    limit: Option<usize>,
) -> Result<Vec<TaskQuality>> {
    let mut hook = DeltaHook::new(be, targets, Some(deltas));
    let sets: Vec<Option<EvalSet>> = tasks.iter().map(|t| t.eval.as_ref().map(|e| e.first(limit))).collect();
    let labeled: Vec<Vec<(&str, &str)>> =
        sets.iter().map(|s| s.as_ref().map(|s| s.labeled()).unwrap_or_default()).collect();
    // Per task with labeled samples: the merged model's job, then its adapter's.
    let mut jobs = Vec::new();
    for (i, l) in labeled.iter().enumerate().filter(|(_, l)| !l.is_empty()) {
        jobs.push((l.as_slice(), Stream::Merged));
        jobs.push((l.as_slice(), Stream::Adapter(i)));
    }
    let mut acc =
        evaluate::accuracies(be, model, &base.tokenizer, &mut hook, &jobs, base.config.eos_token()).await?.into_iter();
    let mut out = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        let Some(set) = set else {
            out.push(TaskQuality {
                eval_file: String::new(),
                samples: 0,
                kl: f64::NAN,
                accuracy: None,
                accuracy_alone: None,
            });
            continue;
        };
        let ids = eval_ids(base, set, model.max_positions())?;
        let kl = evaluate::mean_kl(be, model, &mut hook, &ids, i).await?;
        let (accuracy, accuracy_alone) = if labeled[i].is_empty() { (None, None) } else { (acc.next(), acc.next()) };
        out.push(TaskQuality { eval_file: set.name.clone(), samples: set.items.len(), kl, accuracy, accuracy_alone });
    }
    Ok(out)
}

/// Accuracy of the base model (row 0) and of each adapter alone (row 1 + j) on every task's
/// labeled held-out samples (None where a task has none): the reference a merge is judged by.
pub async fn accuracy_alone<B: Backend>(
    be: &B,
    base: &BaseInputs,
    tasks: &[TaskInput],
    limit: Option<usize>,
) -> Result<Vec<Vec<Option<f64>>>> {
    accuracy_alone_loaded(be, &load(be, base, None)?, tasks, limit).await
}

/// `accuracy_alone` on a base model loaded already.
pub async fn accuracy_alone_loaded<B: Backend>(
    be: &B,
    loaded: &LoadedBase<'_, B>,
    tasks: &[TaskInput],
    limit: Option<usize>,
) -> Result<Vec<Vec<Option<f64>>>> {
    let (base, model) = (loaded.inputs, &loaded.model);
    let adapters: Vec<_> = tasks.iter().map(|t| &t.adapter).collect();
    let targets = map_targets(&model.modules(), &adapters, model.model_type(), model.fan_in_fan_out())?;
    let mut hook = DeltaHook::new(be, &targets, None);
    let streams: Vec<Stream> = std::iter::once(Stream::Base).chain((0..tasks.len()).map(Stream::Adapter)).collect();
    let sets: Vec<Option<EvalSet>> = tasks.iter().map(|t| t.eval.as_ref().map(|s| s.first(limit))).collect();
    let labeled: Vec<Vec<(&str, &str)>> =
        sets.iter().map(|s| s.as_ref().map(|s| s.labeled()).unwrap_or_default()).collect();
    let jobs: Vec<(&[(&str, &str)], Stream)> = streams
        .iter()
        .flat_map(|&s| labeled.iter().filter(|l| !l.is_empty()).map(move |l| (l.as_slice(), s)))
        .collect();
    let mut acc =
        evaluate::accuracies(be, model, &base.tokenizer, &mut hook, &jobs, base.config.eos_token()).await?.into_iter();
    Ok(streams.iter().map(|_| labeled.iter().map(|l| if l.is_empty() { None } else { acc.next() }).collect()).collect())
}

/// `Error::NonFinite` as an input error naming config.json, the fields that can make a forward
/// pass overflow or divide by zero, and the task's adapter (its deltas run in that stream).
fn non_finite(e: crate::error::Error, config: &HfConfig, tasks: &[TaskInput]) -> crate::error::Error {
    let crate::error::Error::NonFinite { module, task } = e else { return e };
    let keys: Vec<&str> =
        ["rope_theta", "rope_parameters", "rope_scaling", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"]
            .into_iter()
            .filter(|k| config.has(k))
            .collect();
    crate::error::bad_input(
        &config.file,
        format!(
            "the forward pass produced non-finite values (NaN or ±∞) before module {module} on the samples of task {} (adapter {}): check {}, and the scale of the base model's and that adapter's weights",
            task + 1,
            tasks.get(task).map_or("?", |t| t.adapter.name.as_str()),
            if keys.is_empty() { "the model's sizes".to_string() } else { keys.join(", ") }
        ),
    )
}

/// Refuse merged deltas that are not finite (a baseline's huge weights, an overflowing solve)
/// before they reach a rank reduction or a file.
fn check_finite(outcome: &super::Outcome) -> Result<()> {
    for (t, m) in outcome.targets.iter().zip(&outcome.merged) {
        if m.a.data.iter().chain(&m.b.data).any(|v| !v.is_finite()) {
            return Err(crate::error::Error::Numeric(format!(
                "the merged delta of module {} is not finite (it overflowed f32): lower --weights or raise --alpha1/--alpha2",
                t.name
            )));
        }
    }
    Ok(())
}
