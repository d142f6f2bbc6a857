// The page's CPU path in headless Chromium, single-thread engine against the threaded one: the
// bundled demo's merge (four adapters of a tiny Llama, no held-out evaluation), any model given
// as folders, or a model made by tools/make_model.rs with its held-out files (--made DIR). Build
// dist/ first (bash tools/build_web.sh). Usage:
//   node benches/page_merge.mjs [MODEL_DIR ADAPTER_DIR SAMPLES ... | --made DIR] [--repeat N] [--threaded] [--published] [--profile] [--no-relaxed]
// Prints, per engine (--threaded: the threaded one only), the median of N merges (default 3) as
// the page times them (from the click to the result), the threads that ran, the peak WebAssembly
// memory, and the memory plan's figure for each phase beside the memory measured at its end.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';
import { serve } from '../tools/serve.mjs';

const args = process.argv.slice(2);
const ri = args.indexOf('--repeat');
const repeat = ri >= 0 ? Number(args.splice(ri, 2)[1]) : 3;
const ti = args.indexOf('--threaded');
const threadedOnly = ti >= 0 && args.splice(ti, 1).length > 0;
// IterIS as published (no balancing, no self-calibration, the delta objective): one pass.
const pi = args.indexOf('--published');
const publishedOnly = pi >= 0 && args.splice(pi, 1).length > 0;
// The engine's time per op (the page's ?profile=1), printed after each merge.
const fi = args.indexOf('--profile');
const profile = fi >= 0 && args.splice(fi, 1).length > 0;
// The threaded engine without relaxed SIMD (the page's ?relaxed=0), as browsers without it run.
const ni = args.indexOf('--no-relaxed');
const noRelaxed = ni >= 0 && args.splice(ni, 1).length > 0;
const mi = args.indexOf('--made');
const made = mi >= 0 ? args.splice(mi, 2)[1] : null;
const filesOf = (dir) => fs.readdirSync(dir).filter((f) => fs.statSync(path.join(dir, f)).isFile()).map((f) => path.resolve(dir, f));
let base, tasks;
if (made) {
  base = path.join(made, 'base');
  tasks = [0, 1, 2].map((i) => ({ adapter: path.join(made, `adapter${i}`), samples: path.join(made, `samples${i}.txt`), eval: path.join(made, `eval${i}.jsonl`) }));
} else if (args.length) {
  base = args[0];
  tasks = [];
  for (let i = 1; i + 1 < args.length; i += 2) tasks.push({ adapter: args[i], samples: args[i + 1] });
} else {
  base = 'demo/base';
  tasks = ['add', 'kind', 'rev', 'sort'].map((t) => ({ adapter: `demo/adapters/${t}`, samples: `demo/samples/${t}.txt` }));
}

const server = await serve('dist');
const origin = `http://127.0.0.1:${server.address().port}`;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const results = {};
try {
  const engines = [['single-thread', '?threads=1'], ['threaded', '']].slice(threadedOnly ? 1 : 0);
  for (const [engine, query] of engines) {
    const runs = [];
    for (let r = 0; r < repeat; r++) {
      const context = await browser.newContext();
      const page = await context.newPage();
      const params = [query.slice(1), profile ? 'profile=1' : '', noRelaxed ? 'relaxed=0' : ''].filter(Boolean).join('&');
      await page.goto(`${origin}/${params ? '?' + params : ''}`);
      await page.setInputFiles('#base-files', filesOf(base));
      // The page starts with two adapter slots.
      for (let k = 2; k < tasks.length; k++) await page.click('#add-task');
      for (let k = 0; k < tasks.length; k++) {
        await page.setInputFiles(`#task-${k}-adapter`, filesOf(tasks[k].adapter));
        await page.setInputFiles(`#task-${k}-samples`, path.resolve(tasks[k].samples));
        if (tasks[k].eval) await page.setInputFiles(`#task-${k}-eval`, path.resolve(tasks[k].eval));
      }
      await page.selectOption('#backend', 'cpu');
      if (publishedOnly) {
        await page.selectOption('#balance', 'off');
        await page.fill('#self-calibrate', '0');
        await page.selectOption('#objective', 'delta');
      }
      await page.click('#merge');
      await page.waitForSelector('#results:not([hidden]), #message:not([hidden]):not(.info):not(.warning)', { timeout: 1_800_000 });
      if (!(await page.locator('#results').isVisible())) throw new Error(`${engine}: ${await page.locator('#message').textContent()}`);
      runs.push({
        seconds: Number(await page.getAttribute('#ran', 'data-seconds')),
        threads: Number(await page.getAttribute('#threads', 'data-threads')),
        engine: await page.getAttribute('#threads', 'data-engine'),
        wasmMemoryBytes: Number(await page.getAttribute('#ran', 'data-wasm-memory-bytes')),
        memory: JSON.parse(await page.getAttribute('#ran', 'data-memory-phases')),
        timings: JSON.parse(await page.getAttribute('#ran', 'data-timings')),
      });
      if (profile) console.error(`${engine}, run ${r + 1}, per op:\n${await page.getAttribute('#ran', 'data-profile')}`);
      await context.close();
    }
    results[engine] = {
      medianSeconds: median(runs.map((r) => r.seconds)),
      seconds: runs.map((r) => r.seconds),
      threads: runs[0].threads,
      engine: runs[0].engine,
      // The merge's phases as the engine timed them (merge_report.json's timings_s), last run.
      phaseSeconds: runs[runs.length - 1].timings,
      peakWasmMiB: Math.max(...runs.map((r) => r.wasmMemoryBytes)) / 2 ** 20,
      // The last run's phases: the plan's largest figure up to each phase against the memory then
      // (WebAssembly memory only grows).
      phasesMiB: (() => {
        const { plan, peaks } = runs[runs.length - 1].memory;
        let soFar = 0;
        return peaks.filter((m) => plan.some((p) => p.phase === m.phase)).map((m) => {
          soFar = Math.max(soFar, plan.find((p) => p.phase === m.phase).host_bytes);
          return { phase: m.phase, planned: Math.round(soFar / 2 ** 20), measured: Math.round(m.bytes / 2 ** 20), ratio: +(soFar / m.bytes).toFixed(2) };
        });
      })(),
    };
  }
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify({ base, tasks: tasks.length, repeat, ...results }, null, 2));
