// The engine runs here, off the page's thread, so the page stays responsive during a merge.
// Messages in: { cmd: 'merge' | 'compare', input, options, threads, relaxed, profile } (see app.js; profile:
// `?profile=1`, where the CPU path's time went, per op, returned with the result). Messages out: { type: 'version' | 'progress' | 'warning' | 'done' | 'compared' | 'error' }.
// One worker serves one merge; the page terminates it to cancel.
//
// Three builds of the engine: pkg-threads/ runs the CPU path on a pool of `threads` Web Workers
// over shared memory, which only a cross-origin-isolated page may create (SharedArrayBuffer);
// pkg-threads-relaxed/ is the same with relaxed SIMD's fused multiply-add in its f32 product,
// for browsers that validate it (a module with those instructions fails to compile elsewhere;
// `?relaxed=0` in the page's address skips it); pkg/ runs the CPU path on this one thread.
let engine = null;
async function load(threads, relaxed) {
  const threaded = threads > 1 && self.crossOriginIsolated && typeof SharedArrayBuffer === 'function';
  const pkg = !threaded ? 'pkg' : relaxed && relaxedSimd() ? 'pkg-threads-relaxed' : 'pkg-threads';
  engine = await import(`./${pkg}/iteris.js`);
  await engine.default();
  if (threaded) await engine.initThreadPool(threads);
  return pkg;
}

// Whether this browser has relaxed SIMD: a module of one function, (v128, v128, v128) -> v128,
// whose body is f32x4.relaxed_madd (0xfd 0x105) of its three parameters.
function relaxedSimd() {
  return WebAssembly.validate(new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version 1
    0x01, 0x08, 0x01, 0x60, 0x03, 0x7b, 0x7b, 0x7b, 0x01, 0x7b, // type section: (v128 ×3) -> v128
    0x03, 0x02, 0x01, 0x00, // function section: one function of type 0
    0x0a, 0x0d, 0x01, 0x0b, 0x00, 0x20, 0x00, 0x20, 0x01, 0x20, 0x02, 0xfd, 0x85, 0x02, 0x0b, // code
  ]));
}

self.onmessage = async (event) => {
  const { cmd, input, options, threads, relaxed, profile } = event.data;
  try {
    const pkg = await load(threads, relaxed);
    const { merge, compare, version } = engine;
    if (profile) engine.profile_start();
    postMessage({ type: 'version', version: version(), threads: engine.threads(), engine: pkg });
    const progress = (pass, passes, label, done, all) => postMessage({ type: 'progress', pass, passes, label, done, all });
    const warn = (text) => postMessage({ type: 'warning', text });
    if (cmd === 'compare') {
      const table = await compare(input, JSON.stringify(options), progress, warn);
      postMessage({ type: 'compared', table });
      return;
    }
    const r = await merge(input, JSON.stringify(options), progress, warn);
    postMessage({ type: 'done', zip: r.zip, report: r.report, backend: r.backend, notes: Array.from(r.notes), wasmMemoryBytes: engine.memory_bytes(), profile: profile ? engine.profile_table() : null }, [r.zip.buffer]);
  } catch (err) {
    postMessage({ type: 'error', ...describe(err) });
  }
};

// Errors from the engine carry a `kind` (see src/wasm.rs). A trap of the WebAssembly module
// (RuntimeError) is a panic (a bug: its message was recorded) or an allocation that failed (the
// browser's memory ran out).
function describe(err) {
  if (err && err.kind) return { kind: err.kind, message: err.message };
  if (err instanceof WebAssembly.RuntimeError || err instanceof RangeError) {
    let panic = null, file = null;
    try { panic = engine.last_panic(); file = engine.panic_file(); } catch (_) { /* the module is unusable */ }
    // A panic inside a third-party parser (the tokenizers crate) while it read an input file:
    // that file is malformed, which is the person's to fix, not a bug of ours.
    if (panic && file) return { kind: 'input', message: `${file}: the tokenizer library failed on this file, which is malformed (${panic})` };
    if (panic) return { kind: 'bug', message: panic };
    return { kind: 'memory', message: String(err.message || err) };
  }
  if (err instanceof WebAssembly.CompileError || err instanceof WebAssembly.LinkError) {
    return { kind: 'engine', message: String(err.message || err) };
  }
  return { kind: 'bug', message: String((err && err.message) || err) };
}
