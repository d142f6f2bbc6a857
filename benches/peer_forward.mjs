// The forward-pass peer benchmark in headless Chromium: the same SmolLM2-135M-shaped Llama over
// the same batch of tokens, to the final hidden states (what a merge's calibration pass computes),
// in onnxruntime-web (the engine transformers.js runs on: WebAssembly, SIMD, threads; from npm)
// and in the page's engine (dist/pkg-threads and dist/pkg-threads-relaxed, its CPU path without
// and with relaxed SIMD), each in a Web Worker of one
// cross-origin-isolated page with the same threads. Prints tokens/s and GFLOP/s side by side, and
// how far apart the two engines' hidden states are.
//
//   python3 tools/make_peer_model.py target/peer-model        # once: weights + model.onnx
//   bash tools/build_web.sh                                   # dist/
//   node benches/peer_forward.mjs [target/peer-model] [--repeat N] [--threads T]
//
// GFLOP/s counts the multiply-adds of the projections (2 per weight per token) and of attention
// (q·kᵀ and p·v over every key of the sequence, as both engines compute them); not the norms.
// A second table times each matrix-product shape of a merge at that batch alone: the projections
// x · Wᵀ and the Gram matrices Xᵀ·Y of a stage's inputs (tools/make_peer_model.py's matmul_K.onnx
// against the engine's `matmul_bench`).
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { serve } from '../tools/serve.mjs';

const args = process.argv.slice(2);
const flag = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args.splice(i, 2)[1]) : dflt;
};
const repeat = flag('--repeat', 5);
const threads = flag('--threads', os.availableParallelism());
const modelDir = path.resolve(args[0] || 'target/peer-model');
const shape = JSON.parse(fs.readFileSync(path.join(modelDir, 'shape.json'), 'utf8'));
const config = JSON.parse(fs.readFileSync(path.join(modelDir, 'config.json'), 'utf8'));

// The bench's own site: a page, two workers, onnxruntime-web's files and the engine's, the model.
const site = path.resolve('target/peer-bench');
fs.rmSync(site, { recursive: true, force: true });
fs.mkdirSync(site, { recursive: true });
fs.cpSync('node_modules/onnxruntime-web/dist', path.join(site, 'ort'), { recursive: true });
for (const pkg of ['pkg-threads', 'pkg-threads-relaxed']) fs.cpSync(`dist/${pkg}`, path.join(site, pkg), { recursive: true });
fs.symlinkSync(modelDir, path.join(site, 'model'));
fs.writeFileSync(path.join(site, 'index.html'), `<!doctype html><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; connect-src 'self'">
<title>forward-pass peer benchmark</title>`);
fs.writeFileSync(path.join(site, 'ort_worker.js'), `
import * as ort from './ort/ort.wasm.min.mjs';
onmessage = async ({ data: { ids, sequences, tokens, repeat, threads, shapes } }) => {
  try {
    ort.env.wasm.wasmPaths = new URL('./ort/', location.href).href;
    ort.env.wasm.numThreads = threads;
    const t0 = performance.now();
    const model = await (await fetch('model/model.onnx')).arrayBuffer();
    const session = await ort.InferenceSession.create(model, { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
    const load = (performance.now() - t0) / 1000;
    const input = new ort.Tensor('int64', BigInt64Array.from(ids, (v) => BigInt(v)), [sequences, tokens]);
    const seconds = [];
    let hidden;
    for (let r = 0; r < repeat + 1; r++) {
      const t = performance.now();
      hidden = (await session.run({ input_ids: input })).hidden.data;
      if (r > 0) seconds.push((performance.now() - t) / 1000);  // the first run warms up
    }
    const matmuls = [];
    for (const mm of shapes) {
      const s = await ort.InferenceSession.create(await (await fetch('model/' + mm.file)).arrayBuffer(), { executionProviders: ['wasm'] });
      const x = () => new ort.Tensor('float32', Float32Array.from({ length: mm.m * mm.k }, (_, i) => ((i * 7919) % 1000) / 1000 - 0.5), [mm.m, mm.k]);
      const feeds = mm.kind === 'gram' ? { x: x(), x2: x() } : { x: x() };
      const t = [];
      for (let r = 0; r < repeat + 1; r++) {
        const t0 = performance.now();
        await s.run(feeds);
        if (r > 0) t.push((performance.now() - t0) / 1000);
      }
      matmuls.push(t);
    }
    postMessage({ seconds, load, hidden: Array.from(hidden.slice(0, 8)), threads: ort.env.wasm.numThreads, matmuls });
  } catch (e) { postMessage({ error: String(e && e.stack || e) }); }
};`);
fs.writeFileSync(path.join(site, 'engine_worker.js'), `
// engine_worker.js?PKG: the engine build in PKG/.
onmessage = async ({ data: { ids, sequences, repeat, threads, shapes } }) => {
  try {
    const { default: init, initThreadPool, forward_bench, matmul_bench, threads: poolThreads } = await import(\`./\${location.search.slice(1)}/iteris.js\`);
    const t0 = performance.now();
    await init();
    await initThreadPool(threads);
    const files = [];
    for (const name of ['config.json', 'tokenizer.json', 'model.safetensors'])
      files.push({ name, bytes: new Uint8Array(await (await fetch('model/' + name)).arrayBuffer()) });
    const load = (performance.now() - t0) / 1000;
    const out = JSON.parse(await forward_bench({ name: 'model', files }, Uint32Array.from(ids), sequences, repeat + 1, 'cpu', () => {}));
    const matmuls = [];
    for (const mm of shapes) matmuls.push(Array.from(await matmul_bench(mm.kind, mm.m, mm.k, mm.n, repeat + 1)).slice(1));
    postMessage({ seconds: out.seconds.slice(1), load, hidden: out.hidden, threads: poolThreads(), matmuls });
  } catch (e) { postMessage({ error: String(e && e.stack || e) }); }
};`);

const server = await serve(site);
const origin = `http://127.0.0.1:${server.address().port}`;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  // The same token ids for both engines (a fixed pseudo-random draw below the vocabulary).
  const n = shape.sequences * shape.tokens;
  let x = 12345;
  const ids = Array.from({ length: n }, () => (x = (x * 1103515245 + 12345) % 2 ** 31) % shape.vocab);
  const job = { ids, sequences: shape.sequences, tokens: shape.tokens, repeat, threads, shapes: shape.matmuls };
  // Each engine in a page of its own: one page's renderer does not hold two engines' memories.
  const run = async (worker) => {
    const page = await browser.newPage();
    page.on('console', (m) => console.error(`[page] ${m.text()}`));
    await page.goto(`${origin}/`);
    if (!(await page.evaluate(() => crossOriginIsolated))) throw new Error('the bench page is not cross-origin isolated');
    const out = await page.evaluate(([w, j]) => new Promise((ok) => {
      const wk = new Worker(w, { type: 'module' });
      wk.onmessage = (e) => { ok(e.data); wk.terminate(); };
      wk.onerror = (e) => ok({ error: e.message });
      wk.postMessage(j);
    }), [worker, job]);
    await page.close();
    return out;
  };
  // The page's threaded engine as browsers without relaxed SIMD run it, and with it (Chrome's).
  const results = {
    'onnxruntime-web': await run('ort_worker.js'),
    'iteris (page engine)': await run('engine_worker.js?pkg-threads'),
    'iteris, relaxed SIMD': await run('engine_worker.js?pkg-threads-relaxed'),
  };

  const d = config.hidden_size, ff = config.intermediate_size, layers = config.num_hidden_layers;
  const hd = config.head_dim, q = config.num_attention_heads * hd, kv = config.num_key_value_heads * hd;
  const perToken = layers * (2 * (d * q + 2 * d * kv + q * d + 3 * d * ff) + 4 * shape.tokens * q);
  const flops = perToken * n;
  console.log(`SmolLM2-135M-shaped Llama (${layers} layers, d=${d}), ${shape.sequences} x ${shape.tokens} tokens, ${threads} threads, ${os.cpus()[0].model}`);
  console.log('engine'.padEnd(22), 'median s'.padStart(9), 'tokens/s'.padStart(9), 'GFLOP/s'.padStart(8), 'load s'.padStart(7), ' threads');
  for (const [name, r] of Object.entries(results)) {
    if (r.error) { console.log(name.padEnd(22), 'failed:', r.error); continue; }
    const s = [...r.seconds].sort((a, b) => a - b)[Math.floor(r.seconds.length / 2)];
    console.log(name.padEnd(22), s.toFixed(3).padStart(9), (n / s).toFixed(0).padStart(9), (flops / s / 1e9).toFixed(1).padStart(8),
      r.load.toFixed(2).padStart(7), ` ${r.threads}`);
    r.median = s;
  }
  const [a, ...engines] = Object.values(results);
  const names = Object.keys(results);
  engines.forEach((b, e) => {
    if (a.error || b.error) return;
    const diff = Math.max(...a.hidden.map((v, i) => Math.abs(v - b.hidden[i])));
    console.log(`${names[e + 1]}: first hidden values agree with onnxruntime-web's within ${diff.toExponential(2)}; time / onnxruntime-web's: ${(b.median / a.median).toFixed(2)}x`);
  });
  const median = (v) => [...v].sort((x, y) => x - y)[Math.floor(v.length / 2)];
  if (!a.error && engines.every((b) => !b.error)) {
    console.log(`\nthe merge's matrix products (${shape.sequences * shape.tokens} rows), GFLOP/s`);
    console.log('product'.padEnd(44), names.map((n) => n.padStart(22)).join(''));
    shape.matmuls.forEach((mm, i) => {
      const f = mm.kind === 'gram' ? 2 * mm.k * mm.m * mm.k : 2 * mm.m * mm.k * mm.n;
      const label = mm.kind === 'gram' ? `${mm.name}: (${mm.m}x${mm.k})T (${mm.m}x${mm.k})` : `${mm.name}: (${mm.m}x${mm.k}) (${mm.k}x${mm.n})`;
      console.log(label.padEnd(44), [a, ...engines].map((r) => (f / median(r.matmuls[i]) / 1e9).toFixed(1).padStart(22)).join(''));
    });
  }
  fs.writeFileSync(path.join(site, 'results.json'), JSON.stringify({ shape, threads, flops, results }, null, 2));
} finally {
  await browser.close();
  server.close();
}
