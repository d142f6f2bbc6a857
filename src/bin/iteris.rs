//! The command-line face: parse arguments, read the folders, call the merge, show progress and a
//! summary, write the output folder atomically.

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use iteris::engine::{BackendChoice, Engine};
use iteris::fsio;
use iteris::inputs::{BaseInputs, TaskInput};
use iteris::merge::pipeline::Formats;
use iteris::merge::{Balance, BalanceObjective, Method, ModuleSet, Objective, Options, Progress, Schedule};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "iteris", version, about = "Merge LoRA adapters with IterIS (CVPR 2025)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Merge two or more PEFT LoRA adapters of one base model into one adapter.
    Merge(MergeArgs),
    /// Merge with every method (IterIS and the baselines) and compare their quality on held-out
    /// samples (--eval); --out writes the table as JSON.
    Compare(CompareArgs),
    /// Study IterIS on the inputs: Jacobi convergence to the sweep's fixed point, and quality
    /// against the number of calibration samples per task; --out writes JSON (the page plots it).
    Study(MergeArgs),
}

#[derive(clap::Args)]
struct CompareArgs {
    #[command(flatten)]
    merge: MergeArgs,
    /// Methods to compare, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
}

/// The library's defaults, the one source of every default below.
fn d() -> Options {
    Options::default()
}

#[derive(clap::Args)]
struct MergeArgs {
    /// Hugging Face model folder (config.json, tokenizer.json, model.safetensors or shards).
    #[arg(long)]
    base: PathBuf,
    /// Adapter folder, PEFT (adapter_config.json + adapter_model.safetensors) or MLX
    /// (adapter_config.json + adapters.safetensors); repeat per adapter.
    #[arg(long = "adapter", required = true)]
    adapters: Vec<PathBuf>,
    /// Calibration samples of the adapter given in the same position (.txt: one per line; .jsonl: "text").
    #[arg(long = "samples", required = true)]
    samples: Vec<PathBuf>,
    /// Held-out samples of the adapter in the same position, to measure the merge's quality:
    /// .jsonl with {"prompt", "answer"} (KL and greedy accuracy) or {"text"}, or .txt (KL only).
    #[arg(long = "eval")]
    evals: Vec<PathBuf>,
    /// Output folder for the merged adapter (written atomically); for compare, a JSON file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// iteris (default); baselines: regmean (X̃ = X, no adaptive weights, --regmean-scale),
    /// regmean++ (RegMean on the merged model's own inputs, module by module; Nguyen et al.),
    /// linear (weighted average, weights 1/N), cat (PEFT's exact sum), ties and dare (--density,
    /// --seed), svd (the summed delta truncated to --rank, default the largest adapter rank),
    /// and the methods of 2024–25: iso-c, iso-cts (--common-space) (the summed delta's spectrum
    /// flattened; Marczak et al.), tsv (task singular vectors decorrelated; Gargiulo et al.),
    /// knots-ties, knots-linear (in a shared SVD basis; Stoica et al.), core-ties (TIES on the
    /// core matrices; Panariello et al.); and PEFT's own add_weighted_adapter, exactly:
    /// peft-linear, peft-ties (the A's and B's combined apart; adapters of one rank).
    #[arg(long, default_value = d().method.name(), value_parser = parse_method)]
    method: Method,
    /// One weight per adapter, comma-separated. iteris, regmean: each task's weight λ_i in the
    /// objective (positive; default: chosen by --balance, else 1); linear: default 1/N; cat,
    /// ties, dare, svd and the methods of 2024–25: default 1 (the papers' scaling factor α is the
    /// weights), knots-linear 1/N.
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f64>>,
    /// iteris: auto (default) chooses the task weights from calibration samples held out from
    /// --balance-sweeps rounds of merges (--balance-folds), so that the worst task is served
    /// best (--balance-objective); off: weights 1 (or --weights).
    #[arg(long, value_enum, default_value_t = d().balance)]
    balance: Balance,
    /// Rounds of merges (each one set of weights) --balance auto runs before the final merge.
    #[arg(long, default_value_t = d().balance_sweeps)]
    balance_sweeps: usize,
    /// What judges a balancing round on held-out samples: agreement (default), each task's share
    /// of samples whose self-calibrated continuation the merge reproduces token for token (KL
    /// where self-calibration is off); kl, the mean KL(adapter ‖ merged) per token.
    #[arg(long, value_enum, default_value_t = d().balance_objective)]
    balance_objective: BalanceObjective,
    /// Balancing's folds: K ≥ 2 cross-fits (each round K merges, each on all folds but one, so
    /// every sample is held out once); 1 holds out every fifth sample from one merge a round.
    #[arg(long, default_value_t = d().balance_folds)]
    balance_folds: usize,
    /// iteris, regmean: extend each calibration sample with its own adapter's greedy
    /// continuation, up to this many tokens (0: off), so the merge sees where each adapter
    /// writes its answers; a sample that holds its answer already ends at once.
    #[arg(long, default_value_t = d().self_calibrate)]
    self_calibrate: usize,
    /// iteris: what each module's merged delta fits. delta (default): each adapter's delta on its
    /// own inputs, as published; output: each adapter model's whole output from the merged
    /// model's inputs, which also undoes the drift upstream merging causes (sweep only; dense
    /// deltas exported at --rank, default the largest Σ r_i, with the energy kept reported;
    /// keeps more, costs more: see the README).
    #[arg(long, value_enum, default_value_t = d().objective)]
    objective: Objective,
    /// iteris --objective output: all (default) also solves every other linear module of the
    /// layers (extra capacity); adapters merges only the modules the adapters target (the only
    /// choice, and the default, for --objective delta).
    #[arg(long, value_enum)]
    modules: Option<ModuleSet>,
    /// Distillation refinement after the merge: this many steps of Adam on the merged LoRA's
    /// factors, descending the KL of each adapter's next-token distributions (the teachers) to
    /// the merged model's on the calibration samples (label-free; the lowest-KL iterate is kept;
    /// 0: off). Decoder families; one forward and backward pass per step, on the CPU.
    #[arg(long, default_value_t = d().refine_steps)]
    refine_steps: usize,
    /// Refinement's step size, relative to each factor's RMS.
    #[arg(long, default_value_t = d().refine_lr)]
    refine_lr: f64,
    /// Refinement's transfer data: this many recombinations of the given prompts per prompt
    /// (token-wise crossovers within a task), each answered by its adapter; every step draws as
    /// many samples per task as were given from the pool (0: the given samples alone).
    #[arg(long, default_value_t = d().refine_augment)]
    refine_augment: usize,
    /// ties: fraction of each delta's entries kept; dare: probability an entry is kept.
    #[arg(long, default_value_t = d().density)]
    density: f64,
    /// dare: random seed of the drops.
    #[arg(long, default_value_t = d().seed)]
    seed: u64,
    /// iso-cts: fraction of the summed delta's directions kept as the common subspace; the rest
    /// go to each task's own directions.
    #[arg(long, default_value_t = d().common_space)]
    common_space: f64,
    /// regmean: factor on the Gram matrices' off-diagonal entries (1: plain RegMean).
    #[arg(long, default_value_t = d().regmean_scale)]
    regmean_scale: f64,
    /// sweep: exact fixed point in one pass (default); jacobi: the published schedule.
    #[arg(long, value_enum, default_value_t = d().schedule)]
    schedule: Schedule,
    /// Solves in all for --schedule jacobi.
    #[arg(long, default_value_t = d().iters)]
    iters: usize,
    /// Ridge on X_iᵀX̃_i, relative to its Frobenius norm.
    #[arg(long, default_value_t = d().alpha1)]
    alpha1: f64,
    /// Ridge on X̃_iᵀX̃_i, relative to its Frobenius norm.
    #[arg(long, default_value_t = d().alpha2)]
    alpha2: f64,
    /// Feature mixing of the released code: X̃ ← (1-ρ)X̃ + ρX.
    #[arg(long, default_value_t = d().rho)]
    rho: f32,
    /// Tokens per sample (longer samples are truncated).
    #[arg(long, default_value_t = d().max_len)]
    max_len: usize,
    /// Reduce the merged adapter to this rank (default: lossless, rank = Σ r_i).
    #[arg(long)]
    rank: Option<usize>,
    /// Plan the merge for at most this much memory, in MiB (default: what the system has
    /// available); a merge that would need more is refused before it starts.
    #[arg(long)]
    max_memory: Option<u64>,
    /// Where the heavy work runs.
    #[arg(long, value_enum, default_value_t = BackendChoice::default())]
    backend: BackendChoice,
    /// Write the merged weights as F16 instead of F32.
    #[arg(long)]
    f16: bool,
    /// Also write the merged adapter for mlx-lm: OUT/mlx/ (adapter_config.json +
    /// adapters.safetensors; `mlx_lm.generate --adapter-path OUT/mlx`).
    #[arg(long)]
    mlx: bool,
    /// Also write the merged adapter as a llama.cpp LoRA: OUT/adapter.gguf
    /// (`llama-cli -m base.gguf --lora OUT/adapter.gguf`; Llama, Mistral, Qwen2, Qwen3).
    #[arg(long)]
    gguf: bool,
    /// Also write the merged model itself: OUT/dense/ (config.json, tokenizer.json,
    /// model.safetensors: the base's tensors in their precision, each merged module's weight
    /// plus its delta), a Hugging Face folder transformers loads.
    #[arg(long)]
    dense: bool,
    /// Replace --out if it exists (atomically; --out may never be or hold an input).
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    // A third-party parser's panic on a malformed file is caught and reported as one error line
    // naming the file (formats::contain); it must not also print a panic message.
    iteris::formats::contain::install_quiet_panic_hook();
    quiet_vulkan_loader();
    // Merges allocate and free activations of hundreds of MiB per layer: reuse them.
    iteris::backend::cpu::keep_freed_memory();
    let cli = Cli::parse();
    // ITERIS_PROFILE=1: where the time went, per phase of the CPU backend (`iteris::profile`).
    let profile = std::env::var_os("ITERIS_PROFILE").is_some_and(|v| v != "0");
    let clocks = profile.then(|| {
        iteris::profile::enable();
        iteris::profile::clocks()
    });
    let result = match cli.cmd {
        Cmd::Merge(a) => merge(a),
        Cmd::Compare(a) => compare(a),
        Cmd::Study(a) => study(a),
    };
    if let Some(((w0, c0), (w1, c1))) = clocks.flatten().zip(iteris::profile::clocks()) {
        eprint!("profile (ITERIS_PROFILE):\n{}", iteris::profile::table(&iteris::profile::phases(), w1 - w0, c1 - c0));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever a dependency's message holds.
            eprintln!("error: {}", e.to_string().split_whitespace().collect::<Vec<_>>().join(" "));
            ExitCode::FAILURE
        }
    }
}

/// Mesa's Vulkan drivers print `error: XDG_RUNTIME_DIR is invalid or not set in the environment.`
/// (twice) when that variable is missing, which reads as our error on a successful run. Give them
/// a private runtime folder, as a login session would; before any thread starts.
fn quiet_vulkan_loader() {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let usable = std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).is_dir());
        // SAFETY: getuid has no preconditions.
        let dir = std::env::temp_dir().join(format!("iteris-runtime-{}", unsafe { libc::getuid() }));
        if !usable && std::fs::create_dir_all(&dir).is_ok() {
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

/// Checked inputs and settings of a job.
struct Prepared {
    base: BaseInputs,
    tasks: Vec<TaskInput>,
    opts: Options,
}

impl MergeArgs {
    /// The settings, checked by the library's one validation.
    fn options(&self) -> iteris::Result<Options> {
        let opts = Options {
            method: self.method,
            weights: self.weights.clone(),
            balance: self.balance,
            balance_sweeps: self.balance_sweeps,
            balance_objective: self.balance_objective,
            balance_folds: self.balance_folds,
            self_calibrate: self.self_calibrate,
            density: self.density,
            seed: self.seed,
            common_space: self.common_space,
            regmean_scale: self.regmean_scale,
            eval_limit: None,
            max_memory_mib: self.max_memory,
            schedule: self.schedule,
            iters: self.iters,
            alpha1: self.alpha1,
            alpha2: self.alpha2,
            rho: self.rho,
            max_len: self.max_len,
            rank: self.rank,
            objective: self.objective,
            modules: self.modules.unwrap_or(ModuleSet::default_for(self.objective)),
            refine_steps: self.refine_steps,
            refine_lr: self.refine_lr,
            refine_augment: self.refine_augment,
            f16: self.f16,
        };
        opts.validate(self.adapters.len())?;
        Ok(opts)
    }

    /// Every input path, which --out must stay clear of.
    fn inputs(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = vec![&self.base];
        v.extend(self.adapters.iter().chain(&self.samples).chain(&self.evals).map(PathBuf::as_path));
        v
    }

    /// Settings and --out checked before anything is read (`None`: no --out).
    fn check(&self) -> iteris::Result<Options> {
        use iteris::error::bad_input;
        let counts = [
            ("--samples", self.samples.len(), false, "one samples file per adapter, in the same order"),
            ("--eval", self.evals.len(), true, "one evaluation file per adapter, or none"),
        ];
        for (flag, n, optional, what) in counts {
            if n != self.adapters.len() && !(optional && n == 0) {
                return Err(bad_input(
                    "arguments",
                    format!("{} --adapter but {n} {flag}: give {what}", self.adapters.len()),
                ));
            }
        }
        let opts = self.options()?;
        if let Some(out) = &self.out {
            fsio::check_out(out, self.force, &self.inputs())?;
        }
        Ok(opts)
    }
}

fn prepare(a: &MergeArgs) -> iteris::Result<Prepared> {
    let opts = a.check()?;
    let base = fsio::read_base(&a.base)?;
    let mut tasks =
        a.adapters.iter().zip(&a.samples).map(|(ad, s)| fsio::read_task(ad, s)).collect::<iteris::Result<Vec<_>>>()?;
    for (t, e) in tasks.iter_mut().zip(&a.evals) {
        t.eval = Some(fsio::read_eval(e)?);
    }
    Ok(Prepared { base, tasks, opts })
}

/// The library's engine on the backend --backend asks for; how it was chosen goes to stderr.
fn engine<'a>(a: &MergeArgs, base: &'a BaseInputs, opts: &Options) -> iteris::Result<Engine<'a>> {
    let choice = a.backend;
    let e = pollster::block_on(Engine::new(choice, base, opts.max_memory_mib))?;
    // Asked for the CPU, nothing to say: stderr stays the error line alone where one comes.
    if choice != BackendChoice::Cpu {
        eprintln!("backend: {}", e.backend());
    }
    for n in &e.notes {
        eprintln!("note: {n}");
    }
    Ok(e)
}

/// A progress callback drawing one bar per pass.
fn bars() -> impl FnMut(Progress) {
    let mut bar: Option<ProgressBar> = None;
    move |p: Progress| match p {
        Progress::Pass(k, n, label) => {
            if let Some(b) = bar.take() {
                b.finish();
            }
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} modules {elapsed}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            b.set_prefix(format!("pass {k}/{n} {label}"));
            bar = Some(b);
        }
        Progress::Modules(done, all) => {
            if let Some(b) = &bar {
                b.set_length(all as u64);
                b.set_position(done as u64);
            }
        }
        Progress::Quality => {
            if let Some(b) = bar.take() {
                b.finish();
            }
            let b = ProgressBar::new_spinner();
            b.set_style(ProgressStyle::with_template("{prefix:>18} {spinner} {elapsed}").unwrap());
            b.set_prefix("quality");
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            bar = Some(b);
        }
    }
}

fn merge(a: MergeArgs) -> iteris::Result<()> {
    let out = a.out.clone().ok_or_else(|| iteris::error::bad_input("arguments", "--out is required"))?;
    let p = prepare(&a)?;
    let opts = &p.opts;
    let mut engine = engine(&a, &p.base, opts)?;
    let r = pollster::block_on(engine.merge(&p.tasks, opts, &mut bars()))?;
    let asked = Formats { mlx: a.mlx, gguf: a.gguf, dense: a.dense };
    let files = r.output_files(&p.base, &p.tasks, asked)?;
    let files: Vec<(&str, &[u8])> = files.iter().map(|(name, bytes)| (*name, bytes.as_slice())).collect();
    fsio::write_folder(&out, &files, r.streamed_files(&p.base, asked), a.force, &a.inputs())?;

    for w in &r.report.warnings {
        eprintln!("warning: {w}");
    }
    println!("\n{:<28} {:>8} {:>8} {:>10} {:>14}", "task (adapter)", "samples", "tokens", "truncated", "align error");
    for t in &r.report.tasks {
        println!(
            "{:<28} {:>8} {:>8} {:>10} {:>14.3e}",
            shorten(&t.adapter, 28),
            t.samples,
            t.tokens,
            t.truncated_samples,
            t.mean_alignment_error
        );
    }
    let ranks: Vec<usize> = r.report.modules.iter().map(|m| m.rank).collect();
    let min_energy = r.report.modules.iter().map(|m| m.energy_kept).fold(1.0, f64::min);
    println!(
        "\n{} modules merged ({}), rank {}..{}{}; backend {}; passes {:.2}s",
        ranks.len(),
        r.report.method,
        ranks.iter().min().unwrap_or(&0),
        ranks.iter().max().unwrap_or(&0),
        if opts.rank.is_some() { format!(", lowest energy kept {min_energy:.4}") } else { String::new() },
        r.report.backend,
        r.report.timings_s.passes
    );
    if let Some(s) = &r.report.self_calibration {
        println!(
            "self-calibration: {} tokens generated (at most {} per sample) in {:.2}s",
            s.tokens_added.iter().sum::<usize>(),
            s.max_tokens,
            s.seconds
        );
    }
    if let Some(b) = &r.report.balancing {
        use iteris::merge::balance::worst;
        let w: Vec<String> = b.weights.iter().map(|w| format!("{w:.3}")).collect();
        let kept = b.rounds.iter().position(|r| r.weights == b.weights).unwrap_or(0);
        let agreed = match &b.rounds[kept].agreement {
            Some(a) => {
                let a: Vec<String> = a.iter().map(|v| format!("{:.0}%", 100.0 * v)).collect();
                format!("; held-out agreement {}", a.join(", "))
            }
            None => String::new(),
        };
        let loss = if b.objective == BalanceObjective::Kl { "KL" } else { "−log p" };
        println!(
            "balancing: task weights {} after {} rounds of {} merge(s) ({:.2}s); worst held-out {loss} {:.3} → {:.3}{agreed}",
            w.join(", "),
            b.rounds.len(),
            b.folds,
            b.seconds,
            worst(&b.kl_before),
            worst(&b.kl_after)
        );
    }
    if !r.report.jacobi_changes.is_empty() {
        let c: Vec<String> = r.report.jacobi_changes.iter().map(|c| format!("{c:.2e}")).collect();
        println!("jacobi: relative change between solves {}", c.join(" → "));
    }
    if let Some(k) = &r.report.adapter_inputs {
        println!("jacobi: {}", k.describe());
    }
    if let Some(q) = &r.quality {
        let alone = pollster::block_on(engine.accuracy_alone(&p.tasks, None))?;
        println!("\nquality on held-out samples (KL: adapter ‖ merged, nats/token; accuracy: greedy, exact answer)");
        print!("{:<12}", "");
        for t in &p.tasks {
            print!(" {:>22}", shorten(t.eval.as_ref().map_or("-", |e| e.name.as_str()), 22));
        }
        println!();
        let acc = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
        for (k, row) in alone.iter().enumerate() {
            let label = if k == 0 { "base".to_string() } else { format!("adapter {k}") };
            print!("{label:<12}");
            row.iter().for_each(|v| print!(" {:>22}", acc(*v)));
            println!();
        }
        print!("{:<12}", "merged");
        q.iter().for_each(|t| print!(" {:>22}", format!("{} KL {:.3}", acc(t.accuracy), t.kl)));
        println!();
    }
    println!("wrote {}", out.display());
    Ok(())
}

fn study(a: MergeArgs) -> iteris::Result<()> {
    let Prepared { base, mut tasks, opts } = prepare(&a)?;
    let mut engine = engine(&a, &base, &opts)?;
    let s = pollster::block_on(engine.study(&mut tasks, &opts, &mut bars()))?;
    let c = &s.convergence;
    println!(
        "jacobi solves 1..{}, distance to the sweep's fixed point: {}",
        c.solves.len(),
        c.distance_to_sweep.iter().map(|e| format!("{e:.2e}")).collect::<Vec<_>>().join(" ")
    );
    let e = &s.sample_efficiency;
    let pct = |v: &Vec<Option<f64>>| -> String {
        v.iter().map(|a| a.map_or("-".into(), |a| format!("{:.1}%", 100.0 * a))).collect::<Vec<_>>().join(" ")
    };
    println!("accuracy by samples per task {:?}: mean over the tasks | worst task", e.samples);
    for (name, _) in iteris::merge::study::variants(&opts) {
        let Some(curve) = e.methods.get(name) else { continue };
        println!("{name:>22}: {} | {}", pct(&curve.accuracy), pct(&curve.worst_accuracy));
    }
    if let Some(path) = &a.out {
        fsio::write_file(path, &serde_json::to_vec_pretty(&s).unwrap(), a.force, &a.inputs())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Every method on the same inputs: a table of accuracy, KL and alignment error per task.
fn compare(a: CompareArgs) -> iteris::Result<()> {
    let p = prepare(&a.merge)?;
    let mut engine = engine(&a.merge, &p.base, &p.opts)?;
    let mut bar = bars();
    let mut progress = |k: usize, n: usize, method: &str, pr: Progress| match pr {
        Progress::Pass(i, m, label) => bar(Progress::Pass(i, m, &format!("{k}/{n} {method} {label}"))),
        pr => bar(pr),
    };
    let table = pollster::block_on(engine.compare(&p.tasks, &p.opts, a.methods.as_deref(), &mut progress))?;
    println!("\nper task: accuracy (greedy, exact) / KL(adapter ‖ merged) / alignment error");
    print!("{:<14}", "");
    table.tasks.iter().for_each(|n| print!(" {:>26}", shorten(n, 26)));
    println!();
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
    if let Some(alone) = &table.alone {
        for (k, row) in alone.iter().enumerate() {
            print!("{:<14}", if k == 0 { "base".to_string() } else { format!("adapter {k} only") });
            row.iter().for_each(|v| print!(" {:>26}", pct(*v)));
            println!();
        }
    }
    for row in &table.methods {
        print!("{:<14}", row.method);
        for (i, err) in row.alignment_error.iter().enumerate() {
            let q = row.quality.as_ref().and_then(|q| q.get(i));
            let cell = format!(
                "{} / {} / {err:.3}",
                pct(q.and_then(|q| q.accuracy)),
                q.map_or("-".to_string(), |q| format!("{:.3}", q.kl)),
            );
            print!(" {cell:>26}");
        }
        println!();
    }
    if let Some(out) = &a.merge.out {
        fsio::write_file(out, &serde_json::to_vec_pretty(&table).unwrap(), a.merge.force, &a.merge.inputs())?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn parse_method(s: &str) -> Result<Method, String> {
    Method::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        format!("unknown method '{s}' (one of {})", names.join(", "))
    })
}

fn shorten(s: &str, n: usize) -> String {
    let c: Vec<char> = s.chars().collect();
    if c.len() <= n {
        s.to_string()
    } else {
        format!("…{}", c[c.len() - n + 1..].iter().collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI's defaults are the library's (`Options::default`), every one of them.
    #[test]
    fn defaults_are_the_librarys() {
        let args = ["iteris", "merge", "--base", "b", "--adapter", "a", "--adapter", "c", "--samples", "s"];
        let Cmd::Merge(a) = Cli::try_parse_from(args.iter().chain(&["--samples", "t"])).unwrap().cmd else {
            panic!("not a merge")
        };
        let cli = serde_json::to_value(a.options().unwrap()).unwrap();
        assert_eq!(cli, serde_json::to_value(Options::default()).unwrap());
        assert_eq!(a.backend, BackendChoice::default());
    }
}
