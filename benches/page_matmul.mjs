// The page engine's matrix products alone, in headless Chromium: y = x · wᵀ for x (m, k) and a
// weight w (n, k), as a merge's projections run them (the engine's `matmul_bench`, CPU path, in a
// Web Worker of a cross-origin-isolated page with a pool of T threads). Build dist/ first
// (bash tools/build_web.sh). Usage:
//   node benches/page_matmul.mjs [--engine pkg-threads-relaxed] [--threads 2] [--repeat 5] [--sync] [M,K,N ...]
// Prints GFLOP/s (the median of the timed runs) per shape. --sync: instead, the microseconds one
// parallel op with no work takes (the pool's hand-off and wait, which every threaded op pays;
// `cargo bench --bench matmul -- sync` measures the CLI's). The default shapes are SmolLM2-135M's
// projections at the row counts a merge multiplies: 19 (one decoding step of 19 sequences), 310
// (a calibration batch), 2000 and 7430 (a whole merge pass in one chunk), and its LM head.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { serve } from '../tools/serve.mjs';

const args = process.argv.slice(2);
const option = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args.splice(i, 2)[1] : dflt;
};
const engine = option('--engine', 'pkg-threads-relaxed');
const threads = Number(option('--threads', os.availableParallelism()));
const repeat = Number(option('--repeat', 5));
const si = args.indexOf('--sync');
const kind = si >= 0 && args.splice(si, 1).length > 0 ? 'sync' : 'project';
const shapes = kind === 'sync' ? [[1, 1, 1]] : args.length
  ? args.map((s) => s.split(',').map(Number))
  : [19, 310, 2000, 7430].flatMap((m) => [[m, 576, 1536], [m, 1536, 576], [m, 576, 576]]).concat([[19, 576, 49152]]);

const site = path.resolve('target/page-matmul');
fs.rmSync(site, { recursive: true, force: true });
fs.mkdirSync(site, { recursive: true });
fs.cpSync(`dist/${engine}`, path.join(site, 'engine'), { recursive: true });
fs.writeFileSync(path.join(site, 'index.html'), `<!doctype html><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; connect-src 'self'">
<title>matrix-product benchmark</title>`);
fs.writeFileSync(path.join(site, 'worker.js'), `
onmessage = async ({ data: { shapes, threads, repeat, kind } }) => {
  try {
    const { default: init, initThreadPool, matmul_bench } = await import('./engine/iteris.js');
    await init();
    if (initThreadPool) await initThreadPool(threads);
    // One untimed round of every shape first: V8 runs a module's functions on its baseline
    // compiler (Liftoff) until they are hot enough for its optimizing one, and a fresh page's
    // first shape measured 30 GFLOP/s where the same shape later in the list ran at 55-62.
    for (const [m, k, n] of shapes) await matmul_bench(kind, m, k, n, 1);
    const seconds = [];
    // The first timed run warms up too.
    for (const [m, k, n] of shapes) seconds.push(Array.from(await matmul_bench(kind, m, k, n, repeat + 1)).slice(1));
    postMessage({ seconds });
  } catch (e) { postMessage({ error: String(e && e.stack || e) }); }
};`);

const server = await serve(site);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  const out = await page.evaluate((job) => new Promise((ok) => {
    const w = new Worker('worker.js', { type: 'module' });
    w.onmessage = (e) => ok(e.data);
    w.onerror = (e) => ok({ error: e.message });
    w.postMessage(job);
  }), { shapes, threads, repeat, kind });
  if (out.error) throw new Error(out.error);
  console.log(`${engine}, ${threads} threads, ${os.cpus()[0].model}`);
  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  if (kind === 'sync') {
    console.log(`one parallel op with no work: ${(median(out.seconds[0]) * 1e6).toFixed(1)} µs (median of ${repeat})`);
  } else {
    console.log('m'.padStart(6), 'k'.padStart(6), 'n'.padStart(6), 'GFLOP/s'.padStart(9));
    shapes.forEach(([m, k, n], i) => {
      const s = median(out.seconds[i]);
      console.log(String(m).padStart(6), String(k).padStart(6), String(n).padStart(6), (2 * m * k * n / s / 1e9).toFixed(1).padStart(9));
    });
  }
} finally {
  await browser.close();
  server.close();
}
