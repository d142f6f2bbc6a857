// End-to-end tests of the page in headless Chromium (Debian's chromium, driven by playwright-core).
// Run by tests/browser.rs, which builds dist/ first and then checks the downloaded adapters
// against the CLI's. Usage: node tests/browser/e2e.mjs OUT_DIR
// Writes OUT_DIR/{demo,gpu,cpu,...}.zip, OUT_DIR/results.png and OUT_DIR/summary.json; exits
// non-zero (with the reason) when a check fails. With OUT_DIR/big (tools/make_model.rs: 106M
// parameters) present, the page also merges that model on its CPU path (big.zip).
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { serve } from '../../tools/serve.mjs';

const out = path.resolve(process.argv[2] || 'target/browser');
fs.mkdirSync(out, { recursive: true });
const fixture = (p, arch = 'gpt2') => path.resolve('tests/fixtures', arch, p);
const server = await serve('dist');
const origin = `http://127.0.0.1:${server.address().port}`;

// WebGPU in headless Chromium without a GPU: SwiftShader's Vulkan, through Dawn.
// --disable-background-networking etc.: Chromium's own calls home would fail on a closed network
// (and are not the page's requests).
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-webgpu-adapter=swiftshader'],
});
const summary = { origin, requests: [], runs: {} };

// The page shows an error (not a note or a warning, which come while work goes on).
const ERROR_SHOWN = '#message:not([hidden]):not(.info):not(.warning)';

async function newPage(on = browser, query = '') {
  const context = await on.newContext({ acceptDownloads: true, viewport: { width: 1100, height: 1400 } });
  const page = await context.newPage();
  page.on('request', (r) => summary.requests.push(r.url()));
  page.on('console', (m) => { if (m.type() === 'error') console.error(`[page] ${m.text()}`); });
  page.on('pageerror', (e) => console.error(`[page error] ${e.message}`));
  const t0 = Date.now();
  await page.goto(`${origin}/${query}`);
  await page.waitForLoadState('load');
  summary.pageLoadSeconds = (Date.now() - t0) / 1000;
  return { context, page };
}

// `base`: the base model's files, else the fixture's Hugging Face folder.
async function giveFixtureFiles(page, arch = 'gpt2', base = null) {
  const f = (p) => fixture(p, arch);
  await page.setInputFiles('#base-files', base ?? ['config.json', 'tokenizer.json', 'model.safetensors'].map((n) => f(`base/${n}`)));
  await page.click('#add-task');
  for (const [k, s] of ['samples0.txt', 'samples1.jsonl', 'samples2.txt'].entries()) {
    await page.setInputFiles(`#task-${k}-adapter`, ['adapter_config.json', 'adapter_model.safetensors'].map((n) => f(`adapter${k}/${n}`)));
    await page.setInputFiles(`#task-${k}-samples`, f(s));
  }
  await published(page);
}

// IterIS as published, for the merges tests/browser.rs compares with the CLI's (its PUBLISHED).
async function published(page) {
  await page.selectOption('#balance', 'off');
  await page.fill('#self-calibrate', '0');
  await page.selectOption('#objective', 'delta');
}

// `during(page)` runs right after the click, while the merge runs.
async function mergeAndDownload(page, name, clickId = '#merge', during = null) {
  await page.click(clickId);
  if (during) await during(page);
  await page.waitForSelector(`#results:not([hidden]), ${ERROR_SHOWN}`, { timeout: 300_000 });
  const message = await page.locator('#message').textContent();
  assert.ok(await page.locator('#results').isVisible(), `${name}: no results; the page said: ${message}`);
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#download')]);
  await download.saveAs(path.join(out, `${name}.zip`));
  const ran = page.locator('#ran');
  const run = {
    text: await ran.textContent(),
    seconds: Number(await ran.getAttribute('data-seconds')),
    engineSeconds: Number(await ran.getAttribute('data-engine-seconds')),
    wasmMemoryBytes: Number(await ran.getAttribute('data-wasm-memory-bytes')),
    threads: Number(await page.locator('#threads').getAttribute('data-threads')),
    engine: await page.locator('#threads').getAttribute('data-engine'),
  };
  summary.runs[name] = run;
  console.log(`${name}: ${run.text}`);
  return run;
}

try {
  // 1. The demo, in one click, with whatever backend auto picks (here: SwiftShader is a CPU
  // emulation, so the CPU path), with its quality table.
  {
    const { context, page } = await newPage();
    await mergeAndDownload(page, 'demo', '#demo');
    assert.ok(await page.locator('#quality-box').isVisible(), 'the demo shows its quality on held-out samples');
    assert.ok(await page.locator('#study').isVisible(), 'the demo shows its study plots');
    await page.locator('#study').screenshot({ path: path.join(out, 'study.png') });
    summary.demoQuality = await page.locator('#quality-table').innerText();
    console.log(`demo quality:\n${summary.demoQuality}`);
    // Each task's own adapter alone is the anchor beside the merged accuracy (every demo adapter
    // scores 97.5-100% on its task).
    assert.match(summary.demoQuality, /its adapter alone/);
    assert.ok((summary.demoQuality.match(/(100\.0|9[7-9]\.\d)%/g) || []).length >= 4, 'four adapters-alone figures');
    await page.locator('#results').screenshot({ path: path.join(out, 'results-demo.png') });
    await context.close();
  }
  // 1b. (Measurement only, E2E_DEMO_GPU=1: slow on a software GPU.) The demo's merge alone (no
  // held-out files, so no quality evaluation) through the file inputs, on the CPU path and WebGPU.
  if (process.env.E2E_DEMO_GPU) {
    const d = (p) => path.resolve('demo', p);
    for (const backend of ['cpu', 'gpu']) {
      const { context, page } = await newPage();
      await page.setInputFiles('#base-files', ['config.json', 'tokenizer.json', 'model.safetensors'].map((f) => d(`base/${f}`)));
      await page.click('#add-task');
      await page.click('#add-task');
      for (const [k, t] of ['add', 'kind', 'rev', 'sort'].entries()) {
        await page.setInputFiles(`#task-${k}-adapter`, ['adapter_config.json', 'adapter_model.safetensors'].map((f) => d(`adapters/${t}/${f}`)));
        await page.setInputFiles(`#task-${k}-samples`, d(`samples/${t}.txt`));
      }
      await page.fill('#max-len', '64');
      await page.selectOption('#backend', backend);
      await mergeAndDownload(page, `demo-merge-${backend}`);
      await context.close();
    }
  }
  // 2. Fixture files through the file inputs, on WebGPU.
  {
    const { context, page } = await newPage();
    await giveFixtureFiles(page);
    await page.selectOption('#backend', 'gpu');
    // SwiftShader is a CPU emulation: chosen explicitly, it is used, with a warning shown while
    // the merge is still running (before its passes, which take ~20 s here).
    const run = await mergeAndDownload(page, 'gpu', '#merge', async (p) => {
      await p.waitForSelector('#message.warning:not([hidden])', { timeout: 60_000 });
      assert.ok(await p.locator('#progress').isVisible(), 'the emulation warning comes while the merge runs');
      const warning = await p.locator('#message').textContent();
      assert.match(warning, /CPU emulation.*tens of times longer/, `the warning says what to expect: ${warning}`);
      console.log(`gpu warning: ${warning}`);
    });
    assert.match(run.text, /on gpu \(/, 'the WebGPU run says it ran on the GPU');
    await page.locator('#results').screenshot({ path: path.join(out, 'results.png') });
    await context.close();
  }
  // 3. The same on the CPU path, with the Jacobi schedule shown too.
  {
    const { context, page } = await newPage();
    await giveFixtureFiles(page);
    await page.selectOption('#backend', 'cpu');
    const run = await mergeAndDownload(page, 'cpu');
    assert.match(run.text, /on cpu/, 'the CPU run says it ran on the CPU');
    await page.selectOption('#schedule', 'jacobi');
    await page.fill('#iters', '4');
    await mergeAndDownload(page, 'cpu-jacobi');
    assert.ok(await page.locator('#convergence-box').isVisible(), 'the Jacobi run shows its convergence plot');
    assert.equal(await page.locator('#convergence circle').count(), 3, 'one point per solve after the first');
    await page.locator('#results').screenshot({ path: path.join(out, 'results-jacobi.png') });
    await context.close();
  }
  // 3a. Today's families through the page: Gemma 3 ((1 + w) and per-head q/k norms, local and
  // global rope, sliding layers) on WebGPU and the CPU path, Phi-3 (fused projections, partial
  // rotary, longrope past its original context) on the CPU path. tests/browser.rs compares each
  // with the CLI.
  for (const [arch, backend] of [['gemma3', 'gpu'], ['gemma3', 'cpu'], ['phi3', 'cpu']]) {
    const { context, page } = await newPage();
    await giveFixtureFiles(page, arch);
    await page.selectOption('#backend', backend);
    const run = await mergeAndDownload(page, `${arch}-${backend}`);
    assert.match(run.text, new RegExp(`of a ${arch === 'gemma3' ? 'gemma3_text' : arch} model`), `${arch}: the page names the model`);
    await context.close();
  }
  // 3a'. The extra outputs: a llama.cpp LoRA, the dense merged model (streamed into the zip) and
  // mlx-lm's files, from a Qwen2 fixture on the CPU path. tests/browser.rs compares them with the CLI's.
  {
    const { context, page } = await newPage();
    await giveFixtureFiles(page, 'qwen2');
    await page.selectOption('#backend', 'cpu');
    for (const id of ['#gguf', '#dense', '#mlx']) await page.check(id);
    await mergeAndDownload(page, 'qwen2-formats');
    await context.close();
  }
  // 3a''. A GGUF base dropped as one file (tests/fixtures/gguf/llama.gguf: the llama fixture as
  // llama.cpp's converter writes it, in seven ggml types) with the llama fixture's adapters.
  {
    const { context, page } = await newPage();
    await giveFixtureFiles(page, 'llama', [path.resolve('tests/fixtures/gguf/llama.gguf')]);
    await page.selectOption('#backend', 'cpu');
    await mergeAndDownload(page, 'gguf-base');
    await context.close();
  }
  // 3b. Every method compared, with small labeled held-out sets.
  {
    const { context, page } = await newPage();
    await giveFixtureFiles(page);
    await page.selectOption('#backend', 'cpu');
    for (const k of [0, 1, 2]) {
      await page.setInputFiles(`#task-${k}-eval`, {
        name: `eval${k}.jsonl`, mimeType: 'text/plain',
        buffer: Buffer.from('{"prompt":"the cat","answer":" sat"}\n{"prompt":"a red","answer":" fish"}\n'),
      });
    }
    const t0 = Date.now();
    await page.click('#compare');
    await page.waitForSelector(`#comparison:not([hidden]), ${ERROR_SHOWN}`, { timeout: 300_000 });
    assert.ok(await page.locator('#comparison').isVisible(), `no comparison: ${await page.locator('#message').textContent()}`);
    const rows = await page.locator('#compare-table tr').count();
    // IterIS, its two GPT-2 variants, RegMean and RegMean++, and the eleven data-free methods; PEFT's
    // two are left out with a note, as the fixture's adapters have different ranks.
    assert.equal(rows, 1 + 4 + 16, 'header, base and three adapters alone, fourteen methods and two IterIS variants');
    const ran = await page.locator('#compare-ran').textContent();
    assert.ok(ran.includes('peft-linear and peft-ties left out'), `no note on PEFT's merges: ${ran}`);
    for (const name of ['regmean++', 'iso-c', 'iso-cts', 'tsv', 'knots-ties', 'core-ties']) {
      assert.ok(await page.locator('#compare-table td', { hasText: name }).count() > 0, `${name} is not in the comparison`);
    }
    summary.compareSeconds = (Date.now() - t0) / 1000;
    await page.locator('#comparison').screenshot({ path: path.join(out, 'comparison.png') });
    await context.close();
  }
  // 4. A corrupt (truncated) model file gets a message naming it, and no results.
  {
    const { context, page } = await newPage();
    await giveFixtureFiles(page);
    const whole = fs.readFileSync(fixture('base/model.safetensors'));
    await page.setInputFiles('#base-files', [
      { name: 'config.json', mimeType: 'application/json', buffer: fs.readFileSync(fixture('base/config.json')) },
      { name: 'tokenizer.json', mimeType: 'application/json', buffer: fs.readFileSync(fixture('base/tokenizer.json')) },
      { name: 'model.safetensors', mimeType: 'application/octet-stream', buffer: whole.subarray(0, whole.length / 2) },
    ]);
    await page.click('#merge');
    await page.waitForSelector(ERROR_SHOWN, { timeout: 120_000 });
    const text = await page.locator('#message').textContent();
    console.log(`corrupt file: ${text}`);
    assert.match(text, /model\.safetensors/, 'the message names the file');
    assert.ok(!(await page.locator('#results').isVisible()), 'no results for a corrupt file');
    summary.corruptMessage = text;
    await context.close();
  }
  // 5. One adapter is not a merge: said before any work.
  {
    const { context, page } = await newPage();
    await page.setInputFiles('#base-files', fixture('base/config.json'));
    await page.setInputFiles('#task-0-adapter', fixture('adapter0/adapter_config.json'));
    await page.setInputFiles('#task-0-samples', fixture('samples0.txt'));
    await page.click('#merge');
    assert.match(await page.locator('#message').textContent(), /at least two adapters/);
    await context.close();
  }
  // 6. A model too large for the page is refused by the memory plan before any tensor is read: a
  // sparse 6.1 GiB model.safetensors (no disk, no memory) whose valid header describes one
  // 400000 × 4096 f32 embedding. The engine reads only its header (a range of the File), so the
  // refusal comes at once, naming the weights.
  {
    const big = path.join(out, 'too-big', 'model.safetensors');
    fs.mkdirSync(path.dirname(big), { recursive: true });
    const n = 400000 * 4096 * 4;
    let header = JSON.stringify({ 'transformer.wte.weight': { dtype: 'F32', shape: [400000, 4096], data_offsets: [0, n] } });
    header += ' '.repeat((8 - (header.length % 8)) % 8);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(header.length));
    fs.writeFileSync(big, Buffer.concat([len, Buffer.from(header)]));
    fs.truncateSync(big, 8 + header.length + n);
    const { context, page } = await newPage();
    await giveFixtureFiles(page);
    await page.setInputFiles('#base-files', [fixture('base/config.json'), fixture('base/tokenizer.json'), big]);
    const t0 = Date.now();
    await page.click('#merge');
    await page.waitForSelector(ERROR_SHOWN, { timeout: 60_000 });
    const text = await page.locator('#message').textContent();
    summary.tooLargeRefusedSeconds = (Date.now() - t0) / 1000;
    console.log(`too large (${summary.tooLargeRefusedSeconds} s): ${text}`);
    assert.match(text, /memory plan/);
    assert.match(text, /weights need 6\.1 GiB/);
    fs.rmSync(path.dirname(big), { recursive: true });
    await context.close();
  }
  // 6b. A 106M-parameter model (OUT_DIR/big, made by tools/make_model.rs) on the CPU path: its
  // 213 MB of F16 weights are read from the File a tensor at a time; tests/browser.rs compares
  // the adapter with the CLI's and the peak WebAssembly memory with the memory plan.
  // Twice: on every core (the server isolates the page, so the threaded engine runs), and with
  // ?threads=1 (the single-thread engine, as where the page is not isolated).
  const big = path.join(out, 'big');
  // And ?relaxed=0: the threaded engine built without relaxed SIMD, as browsers without it run.
  for (const [name, query] of [['big', ''], ['big-1thread', '?threads=1'], ['big-no-relaxed', '?relaxed=0']]) {
    if (!fs.existsSync(big)) break;
    const { context, page } = await newPage(browser, query);
    await page.setInputFiles('#base-files', ['config.json', 'tokenizer.json', 'model.safetensors'].map((f) => path.join(big, 'base', f)));
    await page.click('#add-task');
    for (const k of [0, 1, 2]) {
      await page.setInputFiles(`#task-${k}-adapter`, ['adapter_config.json', 'adapter_model.safetensors'].map((f) => path.join(big, `adapter${k}`, f)));
      await page.setInputFiles(`#task-${k}-samples`, path.join(big, `samples${k}.txt`));
    }
    await published(page);
    await page.selectOption('#backend', 'cpu');
    const run = await mergeAndDownload(page, name);
    // The one-instruction module (f32x4.relaxed_madd) www/worker.js validates to pick its engine.
    run.relaxedSimd = await page.evaluate(() => WebAssembly.validate(new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 8, 1, 96, 3, 123, 123, 123, 1, 123, 3, 2, 1, 0, 10, 13, 1, 11, 0, 32, 0, 32, 1, 32, 2, 253, 133, 2, 11])));
    console.log(`106M model on the CPU path, ${run.threads} thread(s), ${run.engine}: ${run.seconds.toFixed(1)} s, peak wasm memory ${(run.wasmMemoryBytes / 2 ** 20).toFixed(0)} MiB`);
    await context.close();
  }
  // 7. A browser without WebGPU: asking for it explains what to do; auto merges on the CPU and says so.
  {
    const plain = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-gpu'] });
    try {
      const { page } = await newPage(plain);
      await giveFixtureFiles(page);
      await page.selectOption('#backend', 'gpu');
      await page.click('#merge');
      await page.waitForSelector(ERROR_SHOWN, { timeout: 120_000 });
      const text = await page.locator('#message').textContent();
      console.log(`no WebGPU, backend gpu: ${text}`);
      assert.match(text, /WebGPU is not available/);
      assert.match(text, /CPU backend/);
      await page.selectOption('#backend', 'auto');
      const run = await mergeAndDownload(page, 'no-webgpu-auto');
      assert.match(run.text, /on cpu/);
      assert.match(await page.locator('#notes').textContent(), /WebGPU is not available/);
    } finally {
      await plain.close();
    }
  }
  // 8. The hostile-input cases that apply to the page (tests/common/hostile.rs, written out by
  // tests/browser.rs), each through the worker and the wasm entry point as the page runs them:
  // the outcome of each goes to OUT_DIR/hostile-results.json for tests/browser.rs to judge.
  const manifestFile = path.join(out, 'hostile-manifest.json');
  if (fs.existsSync(manifestFile)) {
    const { context, page } = await newPage();
    const b64 = (f) => fs.readFileSync(f).toString('base64');
    const folder = (dir) => ({
      name: path.basename(dir),
      files: fs.readdirSync(dir).filter((f) => fs.statSync(path.join(dir, f)).isFile()).map((f) => ({ name: f, bytes: b64(path.join(dir, f)) })),
    });
    const file = (f) => ({ name: path.basename(f), bytes: b64(f) });
    const results = [];
    for (const c of JSON.parse(fs.readFileSync(manifestFile, 'utf8'))) {
      const input = {
        base: folder(c.base),
        tasks: c.tasks.map((t) => ({ adapter: folder(t.adapter), samples: file(t.samples), eval: t.eval ? file(t.eval) : undefined })),
      };
      const r = await page.evaluate(async ({ input, options }) => {
        // Files, as the page gives them: the engine reads each by ranges.
        const given = (x) => ({ name: x.name, file: new File([Uint8Array.from(atob(x.bytes), (ch) => ch.charCodeAt(0))], x.name) });
        const files = (f) => ({ name: f.name, files: f.files.map(given) });
        const one = (f) => f && given(f);
        const inp = { base: files(input.base), tasks: input.tasks.map((t) => ({ adapter: files(t.adapter), samples: one(t.samples), eval: one(t.eval) })) };
        const w = new Worker('worker.js', { type: 'module' });
        return new Promise((resolve) => {
          w.onmessage = (e) => {
            if (e.data.type === 'error' || e.data.type === 'done') {
              w.terminate();
              resolve({ type: e.data.type, kind: e.data.kind || null, message: e.data.message || null });
            }
          };
          w.onerror = (e) => resolve({ type: 'error', kind: 'worker', message: String(e.message) });
          w.postMessage({ cmd: 'merge', input: inp, options });
        });
      }, { input, options: c.options });
      results.push({ name: c.name, words: c.words, ...r });
      console.log(`hostile (page) ${c.name}: ${r.type} ${r.kind}: ${r.message}`);
    }
    fs.writeFileSync(path.join(out, 'hostile-results.json'), JSON.stringify(results, null, 2));
    await context.close();
  }
  // 9. Keyboard and screen readers: the file pickers are in the tab order and named by task, the
  // progress bar is labelled with a live status, task ids stay unique after a removal (headings
  // follow position), and a narrow screen gets one column.
  {
    const { context, page } = await newPage();
    const focused = await page.evaluate(() => {
      const i = document.getElementById('base-files');
      i.focus();
      return document.activeElement === i && getComputedStyle(i).display !== 'none';
    });
    assert.ok(focused, 'the base model picker takes keyboard focus');
    assert.equal(await page.getAttribute('#task-0-samples', 'aria-label'), 'Adapter 1: choose the samples file');
    assert.equal(await page.getAttribute('#bar', 'aria-label'), 'Merge progress');
    assert.equal(await page.getAttribute('#progress-text', 'role'), 'status');
    await page.click('#add-task');
    await page.click('.task:first-child .remove');
    await page.click('#add-task');
    const ids = await page.$$eval('.task input[id$="-adapter"]', (es) => es.map((e) => e.id));
    assert.deepEqual(ids, ['task-1-adapter', 'task-2-adapter', 'task-3-adapter'], 'task ids stay unique');
    assert.deepEqual(await page.$$eval('.task h4', (es) => es.map((e) => e.textContent)), ['Adapter 1', 'Adapter 2', 'Adapter 3']);
    assert.equal(await page.getAttribute('#task-3-adapter', 'aria-label'), 'Adapter 3: choose adapter files');
    await page.setViewportSize({ width: 480, height: 900 });
    const columns = await page.$eval('.task', (e) => getComputedStyle(e).gridTemplateColumns.split(' ').length);
    assert.equal(columns, 1, 'one column on a narrow screen');
    await context.close();
  }
  // 10. A static host that sends no headers (GitHub Pages): the page's own service worker
  // (sw.js) makes it cross-origin isolated after one reload, and the CPU path runs on threads.
  {
    const staticHost = await serve('dist', 0, false);
    try {
      const context = await browser.newContext({ acceptDownloads: true });
      const page = await context.newPage();
      await page.goto(`http://127.0.0.1:${staticHost.address().port}/`);
      // The page registers the worker and reloads itself once: poll across that navigation.
      for (let t = 0; !(await page.evaluate(() => crossOriginIsolated).catch(() => false)); t++) {
        assert.ok(t < 120, 'the service worker makes the page cross-origin isolated');
        await page.waitForTimeout(500);
      }
      await page.waitForLoadState('load');
      await giveFixtureFiles(page);
      await page.selectOption('#backend', 'cpu');
      const run = await mergeAndDownload(page, 'static-host');
      summary.staticHostThreads = run.threads;
      const cores = await page.evaluate(() => navigator.hardwareConcurrency);
      console.log(`static host (no headers): isolated by the service worker, ${run.threads} thread(s) of ${cores} cores`);
      if (cores > 1) assert.ok(run.threads > 1, 'the service worker\'s isolation lets the CPU path use threads');
      await context.close();
    } finally {
      staticHost.close();
    }
  }
  // 11. Offline after the first visit: the service worker (sw.js) caches the build; with the
  // network cut, the page reloads and merges the demo. Then a new deploy (a changed file, its
  // version written again by tools/precache.mjs) replaces the offline copy. On a copy of dist/.
  {
    const copy = path.join(out, 'offline-dist');
    fs.rmSync(copy, { recursive: true, force: true });
    fs.cpSync('dist', copy, { recursive: true });
    const host = await serve(copy);
    try {
      const context = await browser.newContext({ acceptDownloads: true });
      const page = await context.newPage();
      page.on('pageerror', (e) => console.error(`[page error] ${e.message}`));
      const site = `http://127.0.0.1:${host.address().port}/`;
      await page.goto(site);
      // Controlled once the worker is active, which is after it cached every file.
      const cached = async () => page.evaluate(async () => (navigator.serviceWorker.controller ? caches.keys() : null));
      let first = null;
      for (let t = 0; !(first = await cached().catch(() => null)); t++) {
        assert.ok(t < 240, 'the service worker takes control after caching the build');
        await page.waitForTimeout(500);
      }
      assert.equal(first.length, 1, `one offline copy: ${first}`);
      await context.setOffline(true);
      await page.reload();
      await page.waitForLoadState('load');
      const run = await mergeAndDownload(page, 'offline', '#demo');
      assert.ok(await page.locator('#quality-box').isVisible(), 'offline, the demo shows its quality too');
      console.log(`offline: the demo merged from the cached page and engine (${run.threads} thread(s))`);
      // A new deploy: the next visit online installs the new worker, which replaces the copy.
      await context.setOffline(false);
      const html = path.join(copy, 'index.html');
      fs.writeFileSync(html, fs.readFileSync(html, 'utf8').replace('</body>', '<!-- redeployed --></body>'));
      execFileSync('node', ['tools/precache.mjs', copy], { stdio: 'ignore' });
      await page.reload();
      let now = null;
      for (let t = 0; ; t++) {
        now = await cached().catch(() => null);
        if (now && now.length === 1 && now[0] !== first[0]) break;
        assert.ok(t < 240, `a new deploy replaces the offline copy (caches: ${now})`);
        await page.waitForTimeout(500);
      }
      await context.setOffline(true);
      await page.reload();
      await page.waitForLoadState('load');
      assert.ok((await page.content()).includes('redeployed'), 'offline, the page is the new deploy\'s');
      summary.offline = { first: first[0], redeployed: now[0] };
      console.log(`offline: a new deploy (${now[0]}) replaced the offline copy (${first[0]})`);
      await context.close();
    } finally {
      host.close();
    }
  }
  // Privacy: every request of every run went to the page's own origin.
  const foreign = summary.requests.filter((u) => !u.startsWith(`${origin}/`) && !u.startsWith('blob:') && !u.startsWith('data:'));
  assert.deepEqual(foreign, [], 'requests beyond the page\'s own files');
  assert.ok(summary.requests.some((u) => /\/pkg(-threads)?\/iteris_bg\.wasm$/.test(u)), 'the worker\'s requests are seen too');
  fs.writeFileSync(path.join(out, 'summary.json'), JSON.stringify(summary, null, 2));
  console.log(`browser tests passed; ${summary.requests.length} requests, all to ${origin}`);
} finally {
  await browser.close();
  server.close();
}
