// The page: collects files and settings, runs the merge in a worker (worker.js), shows progress,
// results and errors, and offers the merged adapter as a .zip. The dropped File objects go to the
// worker as they are (no bytes are read here): the engine reads the weights by ranges, a tensor at
// a time, and its memory plan refuses what cannot fit. Nothing is sent anywhere (see the
// Content-Security-Policy).

const EVAL_LIMIT = 50;

const $ = (id) => document.getElementById(id);
// Tasks keep the id they were made with (element ids stay unique after a removal); their
// headings and labels follow their position.
const state = { base: [], tasks: [], worker: null, zipUrl: null, nextTaskId: 0 };

// ---------- files ----------

function fileList(ul, files) {
  ul.replaceChildren(...files.map((f) => {
    const li = document.createElement('li');
    li.textContent = `${f.webkitRelativePath || f.name} (${size(f.size)})`;
    return li;
  }));
}

const mib = (b) => `${Math.ceil(b / 2 ** 20)} MiB`;

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 ** 2) return `${(bytes / 1024).toFixed(1)} KB`;
  if (bytes < 1024 ** 3) return `${(bytes / 1024 ** 2).toFixed(1)} MB`;
  return `${(bytes / 1024 ** 3).toFixed(2)} GB`;
}

// Every file of a drop, descending into dropped folders.
async function droppedFiles(event) {
  const items = [...(event.dataTransfer.items || [])];
  const entries = items.map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (!entries.length) return [...event.dataTransfer.files];
  const out = [];
  const walk = async (entry) => {
    if (entry.isFile) {
      out.push(await new Promise((ok, fail) => entry.file(ok, fail)));
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
        if (!batch.length) break;
        for (const e of batch) await walk(e);
      }
    }
  };
  for (const e of entries) await walk(e);
  return out;
}

function dropZone(zone, onFiles) {
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', async (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    onFiles(await droppedFiles(e));
  });
}

// Hidden files and editor leftovers in a dropped folder are not part of it.
const visible = (files) => files.filter((f) => !f.name.startsWith('.'));

function setBase(files) {
  state.base = visible(files);
  fileList($('base-list'), state.base);
}

// ---------- adapters ----------

// Headings and accessible names by position: "Adapter 2", "Adapter 2: samples file", …
function renumber() {
  state.tasks.forEach((t, i) => {
    t.el.querySelector('h4').textContent = `Adapter ${i + 1}`;
    t.el.querySelectorAll('[data-label]').forEach((e) => e.setAttribute('aria-label', `Adapter ${i + 1}: ${e.dataset.label}`));
  });
}

function addTask() {
  const k = state.nextTaskId++;
  const task = { adapter: [], samples: null, eval: null, el: document.createElement('div') };
  task.el.className = 'task';
  task.el.innerHTML = `
    <h4></h4>
    <div class="drop">
      <span class="drop-label">Adapter folder:</span>
      <label class="button">files<input type="file" id="task-${k}-adapter" multiple data-label="choose adapter files"></label>
      <label class="button">folder<input type="file" id="task-${k}-adapter-dir" webkitdirectory data-label="choose the adapter folder"></label>
      <ul class="files"></ul>
    </div>
    <div class="drop">
      <span class="drop-label">Samples (.txt, .jsonl):</span>
      <label class="button">file<input type="file" id="task-${k}-samples" accept=".txt,.jsonl,text/plain" data-label="choose the samples file"></label>
      <ul class="files"></ul>
    </div>
    <div class="drop">
      <span class="drop-label">Held-out (optional):</span>
      <label class="button">file<input type="file" id="task-${k}-eval" accept=".txt,.jsonl,text/plain" data-label="choose the held-out file (optional)"></label>
      <ul class="files"></ul>
    </div>
    <button type="button" class="remove" title="Remove this adapter" data-label="remove">✕</button>`;
  const [adapterZone, samplesZone, evalZone] = task.el.querySelectorAll('.drop');
  const setAdapter = (files) => {
    task.adapter = visible(files);
    fileList(adapterZone.querySelector('ul'), task.adapter);
  };
  const setSamples = (files) => {
    task.samples = files[0] || null;
    fileList(samplesZone.querySelector('ul'), files.slice(0, 1));
  };
  const setEval = (files) => {
    task.eval = files[0] || null;
    fileList(evalZone.querySelector('ul'), files.slice(0, 1));
  };
  task.setAdapter = setAdapter;
  task.setSamples = setSamples;
  task.setEval = setEval;
  evalZone.querySelector('input').addEventListener('change', (e) => setEval([...e.target.files]));
  dropZone(evalZone, setEval);
  adapterZone.querySelectorAll('input').forEach((i) => i.addEventListener('change', () => setAdapter([...i.files])));
  samplesZone.querySelector('input').addEventListener('change', (e) => setSamples([...e.target.files]));
  dropZone(adapterZone, setAdapter);
  dropZone(samplesZone, setSamples);
  task.el.querySelector('.remove').addEventListener('click', () => {
    if (state.tasks.length <= 2) return;
    state.tasks.splice(state.tasks.indexOf(task), 1);
    task.el.remove();
    renumber();
  });
  state.tasks.push(task);
  $('tasks').append(task.el);
  renumber();
  return task;
}

// ---------- settings ----------

function options() {
  // The bounds are the library's (Options::validate checks every setting again): a number field's
  // min and max attributes show them (tests/settings.rs holds the form to the library's).
  const num = (id, what) => {
    const v = Number($(id).value);
    if ($(id).value.trim() === '' || !Number.isFinite(v)) throw new UserError(`${what}: "${$(id).value}" is not a number`);
    const { min, max } = $(id);
    if ((min !== '' && v < Number(min)) || (max !== '' && v > Number(max))) {
      throw new UserError(`${what}: ${v} is not in ${min || '−∞'}..${max || '∞'}`);
    }
    return v;
  };
  const rank = $('rank').value.trim();
  const weights = $('weights').value.trim();
  const w = weights === '' ? null : weights.split(',').map((v) => Number(v.trim()));
  if (w && w.some((v) => !Number.isFinite(v))) throw new UserError(`Weights: "${weights}" is not a comma-separated list of numbers`);
  return {
    method: $('method').value,
    weights: w,
    density: num('density', 'Density'),
    seed: Math.round(num('seed', 'Seed')),
    common_space: num('common-space', 'Common subspace'),
    regmean_scale: num('regmean-scale', 'RegMean off-diagonal'),
    balance: $('balance').value,
    objective: $('objective').value,
    modules: $('modules').value,
    self_calibrate: Math.round(num('self-calibrate', 'Self-calibration')),
    refine_steps: Math.round(num('refine-steps', 'Refinement steps')),
    schedule: $('schedule').value,
    iters: Math.round(num('iters', 'Solves')),
    alpha1: num('alpha1', 'α1'),
    alpha2: num('alpha2', 'α2'),
    max_len: Math.round(num('max-len', 'Max length')),
    rank: rank === '' ? null : Math.round(num('rank', 'Output rank')),
    f16: $('f16').checked,
    gguf: $('gguf').checked,
    dense: $('dense').checked,
    mlx: $('mlx').checked,
    backend: $('backend').value,
    // Greedy generation re-runs the whole prompt per token: a sample of the held-out set keeps
    // the page's quality check to seconds (the CLI uses every sample).
    eval_limit: EVAL_LIMIT,
  };
}

class UserError extends Error {}

// ---------- messages ----------

// What to tell a person for each kind of failure (kinds come from src/wasm.rs and worker.js).
const ADVICE = {
  input: 'Check that each drop zone holds the right files.',
  unsupported: '',
  numeric: '',
  gpu: 'Try again, or choose the CPU backend.',
  'no-webgpu': 'Choose the auto or CPU backend, or open the page in a browser with WebGPU (recent Chrome or Edge, Safari 26, Firefox 141 on Windows).',
  memory: 'The browser ran out of memory for this merge. Use fewer or shorter samples (Max length), or the command-line tool (iteris merge) for large models.',
  engine: 'This browser cannot run the engine (WebAssembly). Use a recent Chrome, Edge, Firefox or Safari.',
  bug: 'This is a bug in iteris; please report it with the message above.',
};

function showMessage(text, kind) {
  const m = $('message');
  m.hidden = !text;
  m.className = kind === 'info' || kind === 'warning' ? kind : '';
  const said = text || '';
  m.textContent = kind && ADVICE[kind] ? `${said}${/[.!?]$/.test(said) ? '' : '.'} ${ADVICE[kind]}` : said;
}

// ---------- merge ----------

function checkInputs() {
  if (!state.base.length) throw new UserError('Base model: drop the model folder (config.json, tokenizer.json, model.safetensors) or its .gguf file.');
  const tasks = state.tasks.filter((t) => t.adapter.length || t.samples);
  if (tasks.length < 2) throw new UserError('Merging needs at least two adapters, each with its samples.');
  tasks.forEach((t, k) => {
    if (!t.adapter.length) throw new UserError(`Adapter ${k + 1}: drop its folder (adapter_config.json with adapter_model.safetensors for PEFT, or adapters.safetensors for MLX).`);
    if (!t.samples) throw new UserError(`Adapter ${k + 1}: drop a samples file (.txt or .jsonl).`);
  });
  return tasks;
}

// A file as the worker takes it: the File itself (structured-cloned, not read).
const given = (file) => ({ name: file.name, file });

function folder(name, files) {
  return { name, files: files.map(given) };
}

async function startMerge(cmd = 'merge') {
  let tasks, opts;
  try {
    tasks = checkInputs();
    opts = options();
  } catch (e) {
    showMessage(e.message, e.kind || 'input-local');
    return;
  }
  showMessage('');
  // A comparison leaves the last merge's result (and its download) in place.
  if (cmd === 'merge') $('results').hidden = true;
  setBusy(true);
  const baseName = (state.base[0].webkitRelativePath || '').split('/')[0] || 'base model';
  const input = { base: folder(baseName, state.base), tasks: [] };
  for (const [k, t] of tasks.entries()) {
    // Loose files carry no folder name: name the adapter after its samples file instead.
    const name = (t.adapter[0].webkitRelativePath || '').split('/')[0] || `adapter ${k + 1} (${t.samples.name.replace(/\.[^.]*$/, '')})`;
    input.tasks.push({ adapter: folder(name, t.adapter), samples: given(t.samples), eval: t.eval ? given(t.eval) : null });
  }
  const started = performance.now();
  const worker = new Worker('worker.js', { type: 'module' });
  state.worker = worker;
  worker.onmessage = (e) => {
    const m = e.data;
    if (m.type === 'version') {
      $('version').textContent = `v${m.version}`;
      $('threads').textContent = threadsLine(m.threads);
      $('threads').dataset.threads = m.threads;
      $('threads').dataset.engine = m.engine;
      state.engineSeconds = (performance.now() - started) / 1000;
    }
    else if (m.type === 'progress') showProgress(m, started);
    else if (m.type === 'warning') showMessage(m.text, 'warning');
    else if (m.type === 'done') { finish(); showResults(m, (performance.now() - started) / 1000); }
    else if (m.type === 'compared') { finish(); showComparison(JSON.parse(m.table), (performance.now() - started) / 1000); }
    else if (m.type === 'error') { finish(); showMessage(m.message, m.kind); }
  };
  worker.onerror = (e) => {
    finish();
    showMessage(`The engine could not start (${e.message || 'worker error'}).`, 'engine');
  };
  $('comparison').hidden = true;
  const query = new URLSearchParams(location.search);
  worker.postMessage({ cmd, input, options: opts, threads: wantedThreads(), relaxed: query.get('relaxed') !== '0', profile: query.has('profile') });
}

// Threads for the engine's CPU path: every core, or `?threads=N` (1: the single-thread build).
function wantedThreads() {
  const asked = Number(new URLSearchParams(location.search).get('threads'));
  return asked >= 1 ? Math.floor(asked) : Math.min(navigator.hardwareConcurrency || 1, 16);
}

function threadsLine(threads) {
  if (threads > 1) return `The CPU path runs on ${threads} threads.`;
  if (wantedThreads() === 1) return 'The CPU path runs on one thread (as asked).';
  return crossOriginIsolated ? 'The CPU path runs on one thread (this device has one core).'
    : 'The CPU path runs on one thread: this page is not cross-origin isolated, so the browser allows no shared memory (serve it with the COOP/COEP headers, or over HTTPS where its service worker adds them).';
}

function finish() {
  if (state.worker) state.worker.terminate();
  state.worker = null;
  setBusy(false);
}

function cancel() {
  finish();
  showMessage('Merge cancelled.', 'info');
}

function setBusy(busy) {
  $('merge').disabled = busy;
  $('compare').disabled = busy;
  $('demo').disabled = busy;
  $('cancel').disabled = !busy;
  $('progress').hidden = !busy;
  if (busy) {
    $('bar').value = 0;
    $('progress-text').textContent = 'Reading files…';
  }
}

function showProgress(m, started) {
  if (m.passes === 0) {
    // The passes are done; the quality on held-out samples has no estimate: an indeterminate bar.
    $('bar').removeAttribute('value');
    $('progress-text').textContent = 'Passes done · measuring the quality on held-out samples';
    return;
  }
  const frac = m.passes ? Math.min(1, (m.pass - 1 + (m.all ? m.done / m.all : 0)) / m.passes) : 0;
  $('bar').value = frac;
  const elapsed = (performance.now() - started) / 1000;
  const left = frac > 0.02 ? ` · about ${Math.ceil((elapsed * (1 - frac)) / frac)} s left` : '';
  const modules = m.all ? ` · module ${m.done} of ${m.all}` : '';
  $('progress-text').textContent = `Pass ${m.pass} of ${m.passes} (${m.label})${modules}${left}`;
}

// ---------- results ----------

// The memory plan the engine made before the merge (src/merge/plan.rs), in one line.
function memoryLine(p) {
  if (!p) return '';
  const parts = [`Memory plan: ${mib(p.host_bytes)} in this page`];
  if (p.host_available_bytes != null) parts[0] += ` (of ${mib(p.host_available_bytes)} available)`;
  const top = (p.phases || []).reduce((a, b) => (b.host_bytes > a.host_bytes ? b : a), { host_bytes: 0 });
  if (top.phase) parts[0] += `, most in ${top.phase.replace('_', '-')}`;
  if (p.device_bytes) parts.push(`${mib(p.device_bytes)} on the GPU`);
  parts.push(`weights ${mib(p.weights_bytes)}, activations ${mib(p.activations_bytes)}, statistics ${mib(p.statistics_bytes)}`);
  let largest = `largest tensor ${mib(p.largest_tensor_bytes)} (${p.largest_tensor})`;
  if (p.tensor_limit_bytes != null) largest += ` of ${mib(p.tensor_limit_bytes)} one binding holds`;
  parts.push(largest);
  if (p.chunks > 1) parts.push(`the passes ran in ${p.chunks} chunks of at most ${p.chunk_rows} token rows, so that no tensor exceeds a binding`);
  return `${parts.join('; ')}.`;
}

function showResults(m, seconds) {
  const report = JSON.parse(m.report);
  $('ran').textContent = `Merged ${report.tasks.length} adapters of a ${report.model_type} model in ${seconds.toFixed(1)} s ` +
    `(engine loaded in ${state.engineSeconds.toFixed(2)} s) on ${m.backend}, ${report.method}.`;
  $('ran').dataset.seconds = seconds;
  $('ran').dataset.engineSeconds = state.engineSeconds;
  $('ran').dataset.wasmMemoryBytes = m.wasmMemoryBytes;
  // Each phase's planned and measured memory, for benches/page_merge.mjs.
  $('ran').dataset.memoryPhases = JSON.stringify({ plan: report.memory_plan.phases, peaks: report.memory_peaks });
  $('ran').dataset.timings = JSON.stringify(report.timings_s);
  // ?profile=1: the engine's time per op (benches/page_merge.mjs --profile prints it).
  if (m.profile) { $('ran').dataset.profile = m.profile; console.log(m.profile); }
  $('memory').textContent = `${memoryLine(report.memory_plan)} The engine's WebAssembly memory peaked at ${mib(m.wasmMemoryBytes)}.`;
  $('notes').replaceChildren(...[...m.notes, ...report.warnings].map((t) => {
    const li = document.createElement('li');
    li.textContent = t;
    return li;
  }));
  if (state.zipUrl) URL.revokeObjectURL(state.zipUrl);
  state.zipUrl = URL.createObjectURL(new Blob([m.zip], { type: 'application/zip' }));
  $('download').href = state.zipUrl;

  const fmt = (v) => (v === null || v === undefined || Number.isNaN(v) ? '—' : v.toExponential(2));
  // Balancing's weights and each task's held-out loss with weights 1 and with them (and, judged
  // by agreement, the share of held-out continuations the kept round reproduced); the tokens
  // self-calibration generated.
  const b = report.balancing, sc = report.self_calibration, lambda = report.options.weights;
  const byAgreement = b && b.objective === 'agreement';
  const kept = b ? b.rounds.find((r) => r.weights.every((w, i) => w === b.weights[i])) : null;
  const klChange = (i) => {
    if (!b) return '—';
    const agreed = kept && kept.agreement ? `; ${(100 * kept.agreement[i]).toFixed(0)}% agree` : '';
    return `${b.kl_before[i].toFixed(3)} → ${b.kl_after[i].toFixed(3)}${agreed}`;
  };
  const lossName = byAgreement ? 'held-out −log p of the adapter\'s tokens' : 'held-out KL';
  table($('task-table'), ['adapter', 'samples file', 'samples', 'tokens', 'generated tokens', 'task weight λ', `${lossName} (λ = 1 → chosen)`, 'mean alignment error'],
    report.tasks.map((t, i) => [t.adapter, t.samples_file, t.samples, t.tokens, sc ? sc.tokens_added[i] : '—',
      lambda && report.method.startsWith('iteris') ? lambda[i].toFixed(3) : '—', klChange(i), fmt(t.mean_alignment_error)]));
  const steps = [];
  if (sc) steps.push(`Self-calibration generated ${sc.tokens_added.reduce((a, v) => a + v, 0)} tokens (at most ${sc.max_tokens} per sample) in ${sc.seconds.toFixed(2)} s.`);
  if (b) {
    const worst = (kl) => Math.max(...kl).toFixed(3);
    const merges = b.rounds.length * b.folds;
    const held = b.folds > 1 ? `each sample held out once (${b.folds} folds)` : `${b.held_out.reduce((a, v) => a + v, 0)} samples held out`;
    const judge = byAgreement ? 'the worst task reproduced the most held-out continuations' : 'the worst held-out KL was smallest';
    steps.push(`Balancing ran ${b.rounds.length} round(s), ${merges} merges, ${held} (${b.seconds.toFixed(2)} s), and kept the weights with which ${judge} (worst ${lossName}: ${worst(b.kl_before)} with equal weights, ${worst(b.kl_after)} with these).`);
  }
  $('steps').textContent = steps.join(' ');
  table($('module-table'), ['module', 'rank', 'solve', ...report.tasks.map((_, i) => `error ${i + 1}`), ...report.tasks.map((_, i) => `weight ${i + 1}`)],
    report.modules.map((r) => [r.module, r.rank, r.solve_path || '—', ...r.alignment_error.map(fmt), ...r.adaptive_weights.map((c) => c.toPrecision(3))]));
  $('quality-box').hidden = !report.quality;
  if (report.quality) {
    table($('quality-table'), ['task (held-out file)', 'samples', 'merged accuracy', 'its adapter alone', 'KL (nats/token)'],
      report.quality.map((q, i) => [q.eval_file || `task ${i + 1}: none`, q.samples, accuracyCell(q.accuracy),
        accuracyCell(q.accuracy_alone, '', true), q.kl === null ? '—' : q.kl.toFixed(4)]));
  }
  $('convergence-box').hidden = !report.jacobi_changes.length;
  if (report.jacobi_changes.length) plot($('convergence'), report.jacobi_changes);
  $('results').hidden = false;
}

// A cell: text, or a DOM node (bars).
function table(el, head, rows) {
  const tr = (cells, tag) => {
    const r = document.createElement('tr');
    for (const c of cells) {
      const td = document.createElement(tag);
      if (c instanceof Node) {
        td.append(c);
        td.className = 'cell';
      } else {
        td.textContent = c;
        if (typeof c === 'number' || /^[-\d.e+]+$/.test(String(c))) td.className = 'num';
      }
      r.append(td);
    }
    return r;
  };
  el.replaceChildren(tr(head, 'th'), ...rows.map((r) => tr(r, 'td')));
}

// An accuracy as a bar and a percentage (— where there are no labels); `extra` follows in small text.
function accuracyCell(acc, extra = '', ref = false) {
  const span = document.createElement('span');
  if (acc === null || acc === undefined) {
    span.textContent = '—';
  } else {
    const bar = document.createElement('span');
    bar.className = ref ? 'bar ref' : 'bar';
    bar.style.width = `${Math.round(acc * 80)}px`;
    span.append(bar, `${(acc * 100).toFixed(1)}%`);
  }
  if (extra) {
    const small = document.createElement('small');
    small.textContent = extra;
    span.append(small);
  }
  return span;
}

// One line on what each method of the comparison does (the variants of IterIS by their prefix).
const METHOD_NOTES = {
  iteris: 'aligns the merged model with each adapter on the samples, through the merged model',
  regmean: 'the closed form on each adapter\'s own inputs, once (the samples, no iteration)',
  'regmean++': 'RegMean on the merged model\'s own inputs, layer by layer (RegMean++, 2025)',
  linear: 'the average of the adapters\' deltas',
  cat: 'the sum of the deltas, exactly (PEFT\'s cat)',
  ties: 'top entries of each delta, signs elected, agreeing entries averaged',
  dare: 'entries dropped at random and the rest rescaled, then summed',
  svd: 'the sum of the deltas truncated to a rank',
  'iso-c': 'the sum\'s singular vectors with its spectrum made flat (Iso-C, 2025)',
  'iso-cts': 'Iso-C over the sum\'s top directions plus each adapter\'s own (Iso-CTS, 2025)',
  tsv: 'each adapter\'s singular vectors, decorrelated, with their own singular values (TSV-Merge, 2025)',
  'knots-ties': 'TIES on the adapters\' coordinates in one shared SVD basis (KnOTS, 2025)',
  'knots-linear': 'the average in KnOTS\'s shared basis, which is the plain average',
  'core-ties': 'TIES on the adapters\' small core matrices in shared bases (Core Space, 2025)',
  'peft-linear': 'PEFT\'s linear: the A\'s and the B\'s averaged apart, as PEFT does it',
  'peft-ties': 'PEFT\'s TIES: on the A\'s and the B\'s apart, as PEFT does it',
};

function methodCell(name) {
  const span = document.createElement('span');
  span.append(name);
  const note = METHOD_NOTES[name] || (name.startsWith('iteris') ? METHOD_NOTES.iteris : null);
  if (note) {
    const small = document.createElement('small');
    small.textContent = note;
    span.append(small);
  }
  return span;
}

function showComparison(t, seconds) {
  $('compare-ran').textContent = `${t.methods.length} methods on ${t.tasks.length} tasks in ${seconds.toFixed(1)} s on ${t.backend}.` +
    (t.notes.length ? ` ${[...new Set(t.notes)].join('; ')}.` : '');
  const rows = [];
  (t.alone || []).forEach((row, k) => rows.push([k === 0 ? 'base model' : `adapter ${k} alone`, ...row.map((a) => accuracyCell(a, '', true))]));
  for (const m of t.methods) {
    rows.push([methodCell(m.method), ...t.tasks.map((_, i) => {
      const q = m.quality ? m.quality[i] : null;
      const kl = q && q.kl !== null ? `KL ${q.kl.toFixed(3)}` : '';
      return accuracyCell(q ? q.accuracy : null, `${kl} · align ${m.alignment_error[i].toFixed(2)}`);
    })]);
  }
  table($('compare-table'), ['', ...t.tasks.map((n) => n.split('/').pop())], rows);
  $('comparison').hidden = false;
}

function roundTicks(hi) {
  const raw = hi / 4;
  const p = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * p).find((st) => st >= raw * (1 - 1e-9));
  const n = Math.ceil(hi / step - 1e-9);
  return Array.from({ length: n + 1 }, (_, k) => k * step);
}

// A line plot drawn as SVG elements: `series` = [{ name, ys, color }] over `xs`; `log` plots
// log10(y). Missing values (null) break nothing: they are skipped.
function lines(svg, xs, series, { log = false, xLabel = '', yFormat = (v) => v } = {}) {
  const NS = 'http://www.w3.org/2000/svg';
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const [W, H, L, R, T, B] = [480, 200, 56, 90, 12, 30];
  const f = (y) => (log ? Math.log10(Math.max(y, 1e-16)) : y);
  const vals = series.flatMap((s) => s.ys.filter((y) => y !== null).map(f));
  let lo = log ? Math.floor(Math.min(...vals)) : 0;
  let hi = log ? Math.ceil(Math.max(...vals)) : Math.max(...vals, 1e-9);
  if (hi === lo) hi = lo + 1;
  // Linear axes: round ticks (a step of 1, 2 or 5 × 10^k, about four of them from 0), the top
  // rounded up to the next tick.
  const linear = log ? null : roundTicks(hi);
  if (linear) hi = linear[linear.length - 1];
  const x = (i) => L + (xs.length === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (xs.length - 1));
  const y = (v) => T + ((hi - v) * (H - T - B)) / (hi - lo);
  const parts = [el('line', { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: '#888' }), el('line', { x1: L, y1: T, x2: L, y2: H - B, stroke: '#888' })];
  const ticks = log ? Array.from({ length: hi - lo + 1 }, (_, k) => lo + k) : linear;
  for (const p of ticks) {
    parts.push(el('line', { x1: L, y1: y(p), x2: W - R, y2: y(p), stroke: '#e3e6eb' }));
    parts.push(el('text', { x: L - 6, y: y(p) + 4, 'text-anchor': 'end', 'font-size': 11, fill: '#555' }, log ? `1e${p}` : yFormat(p)));
  }
  xs.forEach((v, i) => parts.push(el('text', { x: x(i), y: H - B + 16, 'text-anchor': 'middle', 'font-size': 11, fill: '#555' }, `${v}`)));
  parts.push(el('text', { x: (L + W - R) / 2, y: H - 2, 'text-anchor': 'middle', 'font-size': 11, fill: '#555' }, xLabel));
  series.forEach((s, k) => {
    const pts = s.ys.map((v, i) => (v === null ? null : [x(i), y(f(v))])).filter(Boolean);
    parts.push(el('polyline', { points: pts.map((p) => p.join(',')).join(' '), fill: 'none', stroke: s.color, 'stroke-width': 2 }));
    pts.forEach(([cx, cy]) => parts.push(el('circle', { cx, cy, r: 3, fill: s.color })));
    parts.push(el('text', { x: W - R + 8, y: T + 12 + 16 * k, 'font-size': 12, fill: s.color }, s.name));
  });
  svg.replaceChildren(...parts);
}

// Jacobi: relative change from solve k to k+1 (for k+1 = 2, 3, …).
function plot(svg, ys) {
  lines(svg, ys.map((_, i) => i + 2), [{ name: 'change', ys, color: '#2450b2' }], { log: true, xLabel: 'solve' });
}

// The study of the demo (iteris study, demo/study.json): convergence and sample efficiency.
async function showStudy() {
  let study;
  try {
    const r = await fetch('demo/study.json');
    if (!r.ok) return;
    study = await r.json();
  } catch (_) {
    return;
  }
  const c = study.convergence;
  lines($('study-convergence'), c.solves, [{ name: 'jacobi', ys: c.distance_to_sweep, color: '#2450b2' }], { log: true, xLabel: 'solves' });
  const e = study.sample_efficiency;
  const colors = { iteris: '#2450b2', unbalanced: '#16a085', output: '#d68910', published: '#8e44ad', regmean: '#c0392b', 'regmean++': '#e67e22', linear: '#7f8c8d' };
  for (const [id, key] of [['study-samples', 'accuracy'], ['study-worst', 'worst_accuracy']]) {
    lines($(id), e.samples, Object.entries(e.methods).map(([name, m]) => ({ name, ys: m[key] || [], color: colors[name] || '#333' })),
      { xLabel: 'calibration samples per task', yFormat: (v) => `${Math.round(v * 100)}%` });
  }
  $('study').hidden = false;
}

// ---------- demo ----------

async function loadDemo() {
  showMessage('Loading the demo files…', 'info');
  try {
    const get = async (path) => {
      const r = await fetch(`demo/${path}`);
      if (!r.ok) throw new Error(`demo/${path}: ${r.status}`);
      return new File([await r.blob()], path.split('/').pop());
    };
    const manifest = await (await fetch('demo/manifest.json')).json();
    // The demo's own settings (its model has 64 positions), by the id of their input.
    for (const [id, value] of Object.entries(manifest.settings || {})) $(id).value = value;
    setBase(await Promise.all(manifest.base.files.map((f) => get(`${manifest.base.folder}/${f}`))));
    while (state.tasks.length < manifest.tasks.length) addTask();
    for (const [k, t] of manifest.tasks.entries()) {
      state.tasks[k].setAdapter(await Promise.all(t.files.map((f) => get(`${t.adapter}/${f}`))));
      state.tasks[k].setSamples([await get(t.samples)]);
      if (t.eval) state.tasks[k].setEval([await get(t.eval)]);
    }
  } catch (e) {
    showMessage(`The demo files could not be loaded (${e.message}).`, 'bug');
    return;
  }
  showMessage('');
  showStudy();
  startMerge();
}

// ---------- wiring ----------

for (const id of ['base-files', 'base-dir']) $(id).addEventListener('change', (e) => setBase([...e.target.files]));
dropZone($('base-drop'), setBase);
addTask();
addTask();
$('add-task').addEventListener('click', addTask);
$('merge').addEventListener('click', () => startMerge('merge'));
$('compare').addEventListener('click', () => startMerge('compare'));
$('cancel').addEventListener('click', cancel);
$('demo').addEventListener('click', loadDemo);
// The output objective needs the sweep: the published Jacobi schedule takes the delta objective.
// With the output objective, every module by default (the library's ModuleSet::default_for).
$('schedule').addEventListener('change', () => {
  if ($('schedule').value === 'jacobi') {
    $('objective').value = 'delta';
    $('modules').value = 'adapters';
  }
});
$('objective').addEventListener('change', () => {
  $('modules').value = $('objective').value === 'output' ? 'all' : 'adapters';
});

// The page's service worker (sw.js) caches the build for offline use, and on static hosts that
// cannot send the headers that make the page cross-origin isolated (and so let the engine use
// threads) it adds them: the page then reloads once to come under it.
async function serviceWorker() {
  if (!('serviceWorker' in navigator) || !isSecureContext) return;
  await navigator.serviceWorker.register('sw.js');
  if (crossOriginIsolated || sessionStorage.getItem('isolate-reloaded')) return; // one try: a browser may refuse
  await navigator.serviceWorker.ready;
  sessionStorage.setItem('isolate-reloaded', '1');
  location.reload();
}
serviceWorker().catch(() => { /* no offline copy; where not isolated, one thread (said on the page) */ });
