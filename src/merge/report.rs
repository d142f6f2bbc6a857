//! `merge_report.json`: what ran, with which settings, how long it took, and how well each module's
//! merged delta reproduces each adapter on its own task.

use super::iteris::ModuleRecord;
use super::{Options, Outcome};
use serde::Serialize;

#[derive(Serialize)]
pub struct ModuleReport {
    pub module: String,
    pub path: String,
    pub rank: usize,
    /// Fraction of ‖ΔW*‖²_F kept by `--rank` (1 when lossless).
    pub energy_kept: f64,
    pub solve_path: Option<super::solve::SolvePath>,
    pub adaptive_weights: Vec<f64>,
    /// ‖X_i ΔW_iᵀ − X̃_i ΔW*ᵀ‖ / ‖X_i ΔW_iᵀ‖ per task; null where task i's adapter does not target the module.
    pub alignment_error: Vec<Option<f64>>,
}

/// The last component of `path` as given (a file or folder name). Outputs name their inputs by it:
/// a report travels, and a local path would tell whoever reads it about the machine it came from.
pub fn file_name(path: &str) -> &str {
    let trimmed = path.trim_end_matches(['/', '\\']);
    trimmed.rsplit(['/', '\\']).next().filter(|n| !n.is_empty()).unwrap_or(trimmed)
}

/// Serialize a path as its `file_name`.
pub fn serialize_file_name<S: serde::Serializer>(path: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(file_name(path))
}

#[derive(Serialize)]
pub struct TaskReport {
    #[serde(serialize_with = "serialize_file_name")]
    pub adapter: String,
    #[serde(serialize_with = "serialize_file_name")]
    pub samples_file: String,
    pub samples: usize,
    pub tokens: usize,
    pub truncated_samples: usize,
    /// Mean relative alignment error over the modules the adapter targets.
    pub mean_alignment_error: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub tool: String,
    pub method: String,
    pub options: Options,
    pub backend: String,
    pub model_type: String,
    pub tasks: Vec<TaskReport>,
    pub modules: Vec<ModuleReport>,
    /// Jacobi: relative change of the merged deltas between consecutive solves.
    pub jacobi_changes: Vec<f64>,
    /// Jacobi: whether the adapter streams' inputs were kept between passes (else recomputed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_inputs: Option<super::plan::AdapterInputs>,
    /// Per task, on its held-out samples (when given): KL(adapter ‖ merged) and accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality: Option<Vec<super::evaluate::TaskQuality>>,
    /// IterIS with `--balance auto`: the task weights chosen and each task's held-out KL before
    /// and after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balancing: Option<super::balance::Balancing>,
    /// `--self-calibrate`: the adapters' greedy continuations added to the samples, and their time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_calibration: Option<super::calibrate::SelfCalibration>,
    pub refinement: Option<super::refine::Refinement>,
    /// What the merge was planned to take, against the limits it had to fit.
    pub memory_plan: super::plan::MemoryPlan,
    /// The host memory's measured peak in each phase: the resident set natively, the
    /// WebAssembly memory in the page (which only grows: there, the peak of the merge so far).
    pub memory_peaks: Vec<PhasePeak>,
    pub warnings: Vec<String>,
    /// How the backend was chosen, and any hand-over to the CPU (`engine::Engine::notes`).
    pub notes: Vec<String>,
    pub timings_s: Timings,
}

#[derive(Serialize, Clone, Debug)]
pub struct PhasePeak {
    pub phase: &'static str,
    pub bytes: u64,
}

#[derive(Serialize, Default)]
pub struct Timings {
    pub load: f64,
    pub tokenize: f64,
    /// Self-calibration's greedy generation.
    pub self_calibration: f64,
    /// Balancing's merges on the calibration split and their held-out KL.
    pub balancing: f64,
    pub passes: f64,
    /// Distillation refinement (teachers' distributions and every step).
    pub refinement: f64,
    pub export: f64,
    pub quality: f64,
}

/// Mean over modules of each task's alignment error.
pub fn task_means(records: &[ModuleRecord], tasks: usize) -> Vec<f64> {
    (0..tasks)
        .map(|i| {
            let v: Vec<f64> = records.iter().filter_map(|r| r.align.get(i).copied().flatten()).collect();
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        })
        .collect()
}

pub fn module_reports(out: &Outcome, ranks: &[usize], energy: &[f64]) -> Vec<ModuleReport> {
    out.targets
        .iter()
        .zip(&out.records)
        .enumerate()
        .map(|(k, (t, r))| ModuleReport {
            module: t.name.clone(),
            path: t.path.clone(),
            rank: ranks[k],
            energy_kept: energy[k],
            solve_path: r.solve_path,
            adaptive_weights: r.c.clone(),
            alignment_error: r.align.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn file_name_is_the_last_component() {
        use super::file_name;
        assert_eq!(file_name("/home/me/adapters/rev/"), "rev");
        assert_eq!(file_name("samples/rev.txt"), "rev.txt");
        assert_eq!(file_name("C:\\Users\\me\\eval.jsonl"), "eval.jsonl");
        assert_eq!(file_name("rev.txt"), "rev.txt");
        assert_eq!(file_name("/"), "");
    }
}
