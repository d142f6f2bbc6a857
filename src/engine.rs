//! The library's one entry point for a job (a merge, a comparison of methods, a study, the
//! adapters-alone figures): the CLI (`bin/iteris.rs`) and the page's bindings (`wasm.rs`) only
//! translate their arguments into these calls and the results into their output. It owns
//! - the backend's choice from `BackendChoice` (a CPU emulation of a GPU is slower than the CPU
//!   path, so `Auto` passes it by), and the CPU taking over where the GPU fails midway;
//! - the base model, loaded once per backend for every merge and evaluation of the job;
//! - the typed results (`Comparison`; `merge::study::Study`) and the files a merge writes
//!   (`MergeResult::output_files`).
//!
//! The defaults of every setting are `merge::Options::default()` and its limits
//! `merge::Options::validate`; the CLI's help and the page read them from there.

use crate::backend::{cpu::Cpu, gpu::Gpu, Backward, Transfer};
use crate::error::{bad_input, Error, Result};
use crate::inputs::{BaseInputs, TaskInput};
use crate::mat::Mat;
use crate::merge::evaluate::TaskQuality;
use crate::merge::pipeline::{self, LoadedBase, MergeResult};
use crate::merge::study::Study;
use crate::merge::{now, Options, Progress};

/// Which backend a job asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(not(target_arch = "wasm32"), derive(clap::ValueEnum))]
pub enum BackendChoice {
    /// The GPU where it is real hardware, else the CPU.
    #[default]
    Auto,
    /// The GPU, even a CPU emulation of one (with a warning); an error where there is none.
    Gpu,
    /// The CPU path.
    Cpu,
}

/// Where a job runs, with the base model loaded on each backend it has used.
pub struct Engine<'a> {
    base: &'a BaseInputs,
    max_memory_mib: Option<u64>,
    gpu: Option<Gpu>,
    on_gpu: Option<LoadedBase<'a, Gpu>>,
    on_cpu: Option<LoadedBase<'a, Cpu>>,
    /// How the backend was chosen and any hand-over to the CPU since, for the person (the
    /// report's `notes`, the CLI's standard error, the page's notes).
    pub notes: Vec<String>,
    /// What the person should read before the work starts (a CPU emulation of a GPU chosen
    /// explicitly): the front end shows it at once.
    pub warning: Option<String>,
}

impl<'a> Engine<'a> {
    /// The engine for a job on `base` (`max_memory_mib`: `Options::max_memory_mib`, the cap of
    /// the weights' memory plan), on the backend `choice` asks for.
    pub async fn new(choice: BackendChoice, base: &'a BaseInputs, max_memory_mib: Option<u64>) -> Result<Engine<'a>> {
        let mut e =
            Engine { base, max_memory_mib, gpu: None, on_gpu: None, on_cpu: None, notes: vec![], warning: None };
        if choice == BackendChoice::Cpu {
            return Ok(e);
        }
        let name =
            |g: &Gpu| if g.info.name.is_empty() { "a software adapter".to_string() } else { g.info.name.clone() };
        match Gpu::new_async().await {
            Ok(g) if choice == BackendChoice::Auto && g.is_software() => e.notes.push(format!(
                "the only GPU adapter, {}, is a CPU emulation, slower than the CPU path: merged on the CPU",
                name(&g)
            )),
            Ok(g) if g.is_software() => {
                // The page's end-to-end test measures it: the GPT-2 fixture merges in 0.6 s on the
                // CPU path and in about 21 s on SwiftShader's WebGPU (35×).
                let msg = format!(
                    "the GPU here is {}, a CPU emulation: expect this merge to take tens of times longer than on the CPU path (35× on a small GPT-2); the auto or CPU backend merges faster",
                    name(&g)
                );
                e.notes.push(msg.clone());
                e.warning = Some(msg);
                e.gpu = Some(g);
            }
            Ok(g) => e.gpu = Some(g),
            Err(err) if choice == BackendChoice::Gpu => return Err(err),
            Err(err) => e.notes.push(format!("{}: merged on the CPU", no_gpu(&err))),
        }
        Ok(e)
    }

    /// The backend the next work runs on (`Backend::name`).
    pub fn backend(&self) -> String {
        self.gpu.as_ref().map_or_else(|| Cpu.name(), |g| g.name())
    }

    /// One merge (`pipeline::merge_loaded`); the engine's notes go into its report.
    pub async fn merge(
        &mut self,
        tasks: &[TaskInput],
        opts: &Options,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<MergeResult> {
        opts.validate(tasks.len())?;
        let mut r = self.run(&mut Merge { tasks, opts, progress }).await?;
        r.report.notes = self.notes.clone();
        Ok(r)
    }

    /// The base model's and each adapter's own accuracy on the tasks' labeled held-out samples
    /// (`pipeline::accuracy_alone`).
    pub async fn accuracy_alone(&mut self, tasks: &[TaskInput], limit: Option<usize>) -> Result<Vec<Vec<Option<f64>>>> {
        self.run(&mut Alone { tasks, limit }).await
    }

    /// Every method of `methods` (None: every method the model's family has,
    /// `merge::variant_names_for`) on the same inputs, beside the adapters alone where the tasks
    /// have held-out samples. `progress(k, n, method, p)` sees method k of n.
    pub async fn compare(
        &mut self,
        tasks: &[TaskInput],
        opts: &Options,
        methods: Option<&[String]>,
        progress: &mut dyn FnMut(usize, usize, &str, Progress),
    ) -> Result<Comparison> {
        opts.validate(tasks.len())?;
        let mut left_out = None;
        let names: Vec<String> = match methods {
            Some(m) => m.to_vec(),
            None => {
                // PEFT's own merges take adapters of one rank only; by default they are left out
                // of a comparison they cannot join, and the table says so.
                let ranks: std::collections::BTreeSet<usize> =
                    tasks.iter().flat_map(|t| t.adapter.modules.iter().map(|m| m.rank())).collect();
                let one_rank = ranks.len() <= 1;
                if !one_rank {
                    left_out = Some(format!(
                        "peft-linear and peft-ties left out: PEFT merges adapters of one rank, these have ranks {ranks:?}"
                    ));
                }
                crate::merge::variant_names_for(&self.base.config.model_type()?)
                    .into_iter()
                    .filter(|n| one_rank || !n.starts_with("peft-"))
                    .map(str::to_string)
                    .collect()
            }
        };
        let variants = names
            .iter()
            .map(|n| {
                let known = || format!("one of {}, iteris-delta", crate::merge::variant_names().join(", "));
                crate::merge::variant(n, opts)
                    .ok_or_else(|| bad_input("methods", format!("unknown method '{n}' ({})", known())))
            })
            .collect::<Result<Vec<_>>>()?;
        let alone = match tasks.iter().any(|t| t.eval.is_some()) {
            true => Some(self.accuracy_alone(tasks, opts.eval_limit).await?),
            false => None,
        };
        let mut methods = Vec::new();
        for (k, (name, o)) in names.iter().zip(&variants).enumerate() {
            let mut sink = |p: Progress| progress(k + 1, names.len(), name, p);
            let r = self.run(&mut Merge { tasks, opts: o, progress: &mut sink }).await?;
            methods.push(ComparisonRow::of(&r));
        }
        Ok(Comparison {
            tasks: tasks.iter().map(TaskInput::quality_name).collect(),
            alone,
            methods,
            backend: self.backend(),
            notes: self.notes.iter().cloned().chain(left_out).collect(),
        })
    }

    /// The study (`merge::study::study`): the Jacobi schedule's convergence and each method's
    /// accuracy by samples per task.
    pub async fn study(
        &mut self,
        tasks: &mut [TaskInput],
        opts: &Options,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Study> {
        opts.validate(tasks.len())?;
        self.run(&mut StudyWork { tasks, opts, progress }).await
    }

    /// The base model's forward pass over `batch` to its final hidden states, `repeat` times (the
    /// peer benchmark's workload, what a merge's calibration pass computes): each run's seconds,
    /// and the last run's hidden states.
    pub async fn time_forward(&mut self, batch: &crate::models::Batch, repeat: usize) -> Result<(Vec<f64>, Mat)> {
        self.run(&mut Forward { batch, repeat }).await
    }

    /// `work` on the GPU where there is one, with the base loaded there once; where the GPU fails
    /// (`Error::Gpu`), on the CPU from then on (noted).
    async fn run<W: Work>(&mut self, work: &mut W) -> Result<W::Out> {
        if let Some(g) = &self.gpu {
            let done = match &self.on_gpu {
                Some(loaded) => work.run(g, loaded).await,
                None => match pipeline::load(g, self.base, self.max_memory_mib) {
                    Ok(loaded) => work.run(g, self.on_gpu.insert(loaded)).await,
                    Err(e) => Err(e),
                },
            };
            match done {
                Err(Error::Gpu(msg)) => {
                    self.notes.push(format!("{msg}; the CPU path took over"));
                    (self.gpu, self.on_gpu) = (None, None);
                }
                done => return done,
            }
        }
        let loaded = match &mut self.on_cpu {
            Some(l) => l,
            slot => slot.insert(pipeline::load(&Cpu, self.base, self.max_memory_mib)?),
        };
        work.run(&Cpu, loaded).await
    }
}

/// Why there is no GPU, in the words of where the engine runs.
fn no_gpu(err: &Error) -> String {
    // wgpu's message lists the native backends the page was built without: not useful there.
    if cfg!(target_arch = "wasm32") {
        "WebGPU is not available in this browser".to_string()
    } else {
        format!("no GPU ({err})")
    }
}

/// Every method on the same inputs (`Engine::compare`): `iteris compare`'s table and the page's.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Comparison {
    /// Each task's name (its held-out file's, else its adapter's).
    pub tasks: Vec<String>,
    /// Accuracy per task of the base model (row 0) and of each adapter alone (row 1 + j); None
    /// where no task has held-out samples.
    pub alone: Option<Vec<Vec<Option<f64>>>>,
    pub methods: Vec<ComparisonRow>,
    /// The backend the last method ran on.
    pub backend: String,
    pub notes: Vec<String>,
}

/// One method of a `Comparison`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ComparisonRow {
    /// The method as the report names it (`iteris-sweep`, `ties`, …).
    pub method: String,
    /// Each task's mean alignment error.
    pub alignment_error: Vec<f64>,
    /// Quality on the held-out samples, where the tasks have them.
    pub quality: Option<Vec<TaskQuality>>,
    /// The seconds the passes and the quality evaluation took.
    pub seconds: f64,
}

impl ComparisonRow {
    fn of(r: &MergeResult) -> ComparisonRow {
        let rep = &r.report;
        ComparisonRow {
            method: rep.method.clone(),
            alignment_error: rep.tasks.iter().map(|t| t.mean_alignment_error).collect(),
            quality: r.quality.clone(),
            seconds: rep.timings_s.passes + rep.timings_s.quality,
        }
    }
}

/// Work that runs on either backend, given the base loaded there.
trait Work {
    type Out;
    async fn run<B: Backward>(&mut self, be: &B, base: &LoadedBase<'_, B>) -> Result<Self::Out>;
}

struct Merge<'s> {
    tasks: &'s [TaskInput],
    opts: &'s Options,
    progress: &'s mut dyn FnMut(Progress),
}

impl Work for Merge<'_> {
    type Out = MergeResult;
    async fn run<B: Backward>(&mut self, be: &B, base: &LoadedBase<'_, B>) -> Result<MergeResult> {
        pipeline::merge_loaded(be, base, self.tasks, self.opts, self.progress).await
    }
}

struct Alone<'s> {
    tasks: &'s [TaskInput],
    limit: Option<usize>,
}

impl Work for Alone<'_> {
    type Out = Vec<Vec<Option<f64>>>;
    async fn run<B: Backward>(&mut self, be: &B, base: &LoadedBase<'_, B>) -> Result<Self::Out> {
        pipeline::accuracy_alone_loaded(be, base, self.tasks, self.limit).await
    }
}

struct StudyWork<'s> {
    tasks: &'s mut [TaskInput],
    opts: &'s Options,
    progress: &'s mut dyn FnMut(Progress),
}

impl Work for StudyWork<'_> {
    type Out = Study;
    async fn run<B: Backward>(&mut self, be: &B, base: &LoadedBase<'_, B>) -> Result<Study> {
        crate::merge::study::study(be, base, self.tasks, self.opts, self.progress).await
    }
}

struct Forward<'s> {
    batch: &'s crate::models::Batch,
    repeat: usize,
}

impl Work for Forward<'_> {
    type Out = (Vec<f64>, Mat);
    async fn run<B: Backward>(&mut self, be: &B, base: &LoadedBase<'_, B>) -> Result<Self::Out> {
        use crate::models::{run, NoHook, Output};
        let mut seconds = Vec::new();
        let mut last = None;
        for _ in 0..self.repeat.max(1) {
            let t0 = now();
            let h = run(&base.model, be, self.batch, &mut NoHook, Output::Hidden).await?;
            // The readback ends the run on a GPU (its work is queued until then).
            last = Some(be.download(&h.ok_or(Error::Stop)?).await?);
            seconds.push(now() - t0);
        }
        Ok((seconds, last.ok_or(Error::Stop)?))
    }
}
