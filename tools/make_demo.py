#!/usr/bin/env python3
"""Make the bundled demo: a tiny Llama-style base model trained on synthetic text, and four LoRA
adapters trained with PEFT, each on a task whose answers can be checked exactly:

  rev   reverse a word           "rev stone>enots"
  sort  sort digits              "sort 50713>01357"
  add   add two digits           "add 7+5>12"
  kind  map a word to its kind   "kind apple>fruit"

The base model learns the alphabet, words, numbers and the "prefix input>output" format from copy
lines ("copy stone>stone") and free text, never a task line; each adapter learns one task. Per task
the demo holds 50 unlabeled calibration samples (what IterIS merges with) and up to 200
held-out labeled examples (eval/*.jsonl: prompt and answer, for greedy-generation accuracy and KL).
The calibration samples are prompts only ("rev stone>"): the engine's self-calibration
(`--self-calibrate`, on by default) extends each with its adapter's own greedy answer before the
merge, so the merge also aligns the positions where answers are produced (measured on the demo:
mean merged accuracy 8% with prompts alone, 27% with the adapters' answers).

Char-level tokenizer (BPE without merges over the characters), so the tasks are learnable by a
model of under a million parameters in minutes on two CPU cores. Seeded; rerun to regenerate:
    python3 tools/make_demo.py [out_dir]   (default demo/)
Needs torch, transformers, peft, tokenizers (pip).
"""
import json, os, random, shutil, sys, time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models
import transformers
from peft import LoraConfig, get_peft_model

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "demo")
torch.manual_seed(0)
torch.set_num_threads(max(1, os.cpu_count() or 1))

KINDS = {
    "fruit": "apple pear plum grape lemon lime melon peach mango cherry berry fig kiwi date olive".split(),
    "animal": "cat dog horse cow sheep goat mouse bird fish frog bear wolf fox lion tiger".split(),
    "color": "red blue green black white pink brown gray gold silver purple orange yellow teal navy".split(),
    "tool": "hammer saw drill knife spoon fork axe rope nail brush pen clock lamp key wheel".split(),
}
WORDS = [w for ws in KINDS.values() for w in ws] + ("stone river house tree moon star sun rain snow wind "
         "road town ship boat book door wall room hand foot head face road king queen").split()
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 >+\n")
TASKS = ["rev", "sort", "add", "kind"]


def rand_word(rng):
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))


def example(task, rng):
    """(prompt, answer) of one task."""
    if task == "rev":
        w = rand_word(rng)
        return f"rev {w}>", w[::-1]
    if task == "sort":
        d = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 7)))
        return f"sort {d}>", "".join(sorted(d))
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"add {a}+{b}>", str(a + b)
    if task == "kind":
        k = rng.choice(list(KINDS))
        return f"kind {rng.choice(KINDS[k])}>", k
    raise ValueError(task)


def base_line(rng):
    """Pretraining text: free text of words and numbers, and copy lines in the task format."""
    r = rng.random()
    if r < 0.4:
        return " ".join(rng.choice(WORDS + [str(rng.randint(0, 999))]) for _ in range(rng.randint(2, 6)))
    if r < 0.7:
        w = rand_word(rng)
        return f"copy {w}>{w}"
    if r < 0.85:
        d = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 7)))
        return f"copy {d}>{d}"
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"copy {a}+{b}>{a}+{b}"


def make_tokenizer():
    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return tok


def batches(lines, tok, bs, rng):
    """Endless batches of (ids, labels) padded with '\n' (loss only on real tokens)."""
    nl = tok.token_to_id("\n")
    while True:
        chunk = [lines[rng.randrange(len(lines))] for _ in range(bs)]
        enc = [tok.encode(t).ids for t in chunk]
        n = max(len(e) for e in enc)
        ids = torch.full((bs, n), nl, dtype=torch.long)
        labels = torch.full((bs, n), -100, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            labels[i, : len(e)] = torch.tensor(e)
        yield ids, labels


def task_batches(task, tok, bs, rng):
    """Task lines with the loss on the answer and the closing newline only."""
    while True:
        rows = []
        for _ in range(bs):
            p, a = example(task, rng)
            rows.append((tok.encode(p).ids, tok.encode(a + "\n").ids))
        n = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((bs, n), tok.token_to_id("\n"), dtype=torch.long)
        labels = torch.full((bs, n), -100, dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        yield ids, labels


def train(model, data, steps, lr, label):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        ids, labels = next(data)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"{label} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()


def accuracy(model, tok, items):
    return sum(greedy(model, tok, p, len(a) + 2) == a for p, a in items) / len(items)


def table(t):
    """The whole input space of a lookup-table task (kind: 60 words; add: 100 digit pairs)."""
    if t == "kind":
        return [(f"kind {w}>", k) for k, ws in KINDS.items() for w in ws]
    return [(f"add {a}+{b}>", str(a + b)) for a in range(10) for b in range(10)]


def train_adapter(model, tok, t, base_state):
    """Train task t's LoRA on the base weights (seeded by the task's index), save it, and return
    the base model again."""
    k = TASKS.index(t)
    model.load_state_dict(base_state)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lcfg)
    torch.manual_seed(10 + k)
    train(peft_model, task_batches(t, tok, 64, random.Random(100 + k)), int(os.environ.get("LORA_STEPS", 800)), 4e-3, f"lora {t}")
    shutil.rmtree(os.path.join(OUT, "adapters", t), ignore_errors=True)
    save_adapter(peft_model, t)
    return peft_model.unload()


def main():
    only = os.environ.get("ONLY")  # retrain these adapters (comma-separated) on the saved base
    if os.environ.get("REEVALUATE"):
        return reevaluate()
    if only:
        return retrain(only.split(","))
    shutil.rmtree(OUT, ignore_errors=True)
    for d in ["base", "adapters", "samples", "eval"]:
        os.makedirs(os.path.join(OUT, d))
    rng = random.Random(0)
    tok = make_tokenizer()
    tok.save(os.path.join(OUT, "base", "tokenizer.json"))

    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.token_to_id("\n"),
        pad_token_id=tok.token_to_id("\n"),
    )
    model = transformers.LlamaForCausalLM(cfg)
    print(f"base model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    base_lines = [base_line(rng) for _ in range(50000)]
    train(model, batches(base_lines, tok, 96, rng), int(os.environ.get("BASE_STEPS", 1500)), 3e-3, "base")
    model.save_pretrained(os.path.join(OUT, "base"), safe_serialization=True)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    # Held-out evaluation sets and unlabeled calibration prompts, disjoint from each other.
    erng = random.Random(1)
    for t in TASKS:
        if t in ("kind", "add"):
            # Lookup tables: every entry is evaluated; the calibration prompts are 50 of them.
            items = table(t)
            calib, held = erng.sample(items, 50), items
        else:
            seen, items = set(), []
            while len(items) < 250:
                p, a = example(t, erng)
                if p not in seen:
                    seen.add(p)
                    items.append((p, a))
            calib, held = items[:50], items[50:]
        with open(os.path.join(OUT, "samples", f"{t}.txt"), "w") as f:
            f.write("".join(p + "\n" for p, _ in calib))
        with open(os.path.join(OUT, "eval", f"{t}.jsonl"), "w") as f:
            f.write("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in held))
    for t in TASKS:
        model = train_adapter(model, tok, t, base_state)
    reevaluate()
    # The decoder (characters joined without separators) is added last: training only encodes.
    path = os.path.join(OUT, "base", "tokenizer.json")
    with open(path) as f:
        tj = json.load(f)
    tj["decoder"] = {"type": "Fuse"}
    with open(path, "w") as f:
        json.dump(tj, f, ensure_ascii=False, indent=2)


@torch.no_grad()
def greedy(model, tok, prompt, max_new=10):
    nl = tok.token_to_id("\n")
    ids = torch.tensor([tok.encode(prompt).ids])
    out = []
    for _ in range(max_new):
        nxt = model(input_ids=ids).logits[0, -1].argmax().item()
        if nxt == nl:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return "".join(tok.id_to_token(i) for i in out)


def save_adapter(peft_model, t):
    """The PEFT folder, without the model card and without the path the base was loaded from."""
    d = os.path.join(OUT, "adapters", t)
    peft_model.save_pretrained(d)
    os.remove(os.path.join(d, "README.md"))
    with open(os.path.join(d, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = None
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def read_eval(t):
    with open(os.path.join(OUT, "eval", f"{t}.jsonl")) as f:
        return [(d["prompt"], d["answer"]) for d in map(json.loads, f)]


def retrain(names):
    """Retrain the adapters `names` on the saved base model (same seeds as a full run), rewriting
    the add task's calibration and evaluation files (its data changed once), then re-measure every
    accuracy."""
    tok = Tokenizer.from_file(os.path.join(OUT, "base", "tokenizer.json"))
    model = transformers.LlamaForCausalLM.from_pretrained(os.path.join(OUT, "base"))
    if "add" in names:
        items = table("add")
        calib = random.Random(1).sample(items, 50)
        with open(os.path.join(OUT, "samples", "add.txt"), "w") as f:
            f.write("".join(p + "\n" for p, _ in calib))
        with open(os.path.join(OUT, "eval", "add.jsonl"), "w") as f:
            f.write("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in items))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for t in names:
        model = train_adapter(model, tok, t, base_state)
    reevaluate()


def reevaluate():
    """Accuracy of the base and of every saved adapter on every task's current evaluation set."""
    from peft import PeftModel
    tok = Tokenizer.from_file(os.path.join(OUT, "base", "tokenizer.json"))
    evals = {t: read_eval(t) for t in TASKS}
    model = transformers.LlamaForCausalLM.from_pretrained(os.path.join(OUT, "base")).eval()
    results = {"base": {t: accuracy(model, tok, evals[t][:100]) for t in TASKS}}
    for t in TASKS:
        m = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(os.path.join(OUT, "base")),
                                      os.path.join(OUT, "adapters", t)).eval()
        results[t] = {u: accuracy(m, tok, evals[u][:100]) for u in TASKS}
        print(f"adapter {t} accuracy", results[t], flush=True)
    with open(os.path.join(OUT, "training_accuracy.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
