// The page's engine (dist/pkg, built by tools/build_web.sh) on its CPU path, timed in Node: the
// same V8 WebAssembly engine as Chromium, without a page around it. Usage:
//   node benches/wasm_merge.mjs [MODEL_DIR ADAPTER_DIR SAMPLES ...] [--repeat N]
// Without arguments it merges the bundled demo (four adapters of a tiny Llama). Prints the median
// wall time of N merges (default 3) and the wasm memory the module grew to.
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { initSync, merge, simd } from '../dist/pkg/iteris.js';

const args = process.argv.slice(2);
const ri = args.indexOf('--repeat');
const repeat = ri >= 0 ? Number(args.splice(ri, 2)[1]) : 3;

const folder = (dir) => ({
  name: path.basename(dir),
  files: fs.readdirSync(dir).filter((f) => fs.statSync(path.join(dir, f)).isFile())
    .map((f) => ({ name: f, bytes: new Uint8Array(fs.readFileSync(path.join(dir, f))) })),
});
const file = (p) => ({ name: path.basename(p), bytes: new Uint8Array(fs.readFileSync(p)) });

let base, tasks;
if (args.length) {
  base = folder(args[0]);
  tasks = [];
  for (let i = 1; i + 1 < args.length; i += 2) tasks.push({ adapter: folder(args[i]), samples: file(args[i + 1]) });
} else {
  base = folder('demo/base');
  tasks = ['add', 'kind', 'rev', 'sort'].map((t) => ({ adapter: folder(`demo/adapters/${t}`), samples: file(`demo/samples/${t}.txt`) }));
}

const wasm = initSync({ module: fs.readFileSync(new URL('../dist/pkg/iteris_bg.wasm', import.meta.url)) });
const times = [];
for (let r = 0; r < repeat; r++) {
  const t0 = performance.now();
  await merge({ base, tasks }, JSON.stringify({ backend: 'cpu' }), () => {}, () => {});
  times.push((performance.now() - t0) / 1000);
}
times.sort((a, b) => a - b);
console.log(JSON.stringify({
  merges: repeat,
  median_s: +times[Math.floor(times.length / 2)].toFixed(3),
  all_s: times.map((t) => +t.toFixed(3)),
  wasm_memory_mib: +(wasm.memory.buffer.byteLength / 2 ** 20).toFixed(1),
  simd: simd(),
}));
