// The engine runs here, off the page's thread, so the page stays responsive during a merge.
// Messages in: { cmd: 'merge' | 'compare', input, options } (see app.js). Messages out: { type: 'version' | 'progress' | 'warning' | 'done' | 'compared' | 'error' }.
// One worker serves one merge; the page terminates it to cancel.
//
// Two builds of the engine: pkg-threads/ runs the CPU path on a pool of `threads` Web Workers over
// shared memory, which only a cross-origin-isolated page may create (SharedArrayBuffer); pkg/ runs
// it on this one thread.
let engine = null;
async function load(threads) {
  const threaded = threads > 1 && self.crossOriginIsolated && typeof SharedArrayBuffer === 'function';
  engine = await import(threaded ? './pkg-threads/iteris.js' : './pkg/iteris.js');
  await engine.default();
  if (threaded) await engine.initThreadPool(threads);
}

self.onmessage = async (event) => {
  const { cmd, input, options, threads } = event.data;
  try {
    await load(threads);
    const { merge, compare, version } = engine;
    postMessage({ type: 'version', version: version(), threads: engine.threads() });
    const progress = (pass, passes, label, done, all) => postMessage({ type: 'progress', pass, passes, label, done, all });
    const warn = (text) => postMessage({ type: 'warning', text });
    if (cmd === 'compare') {
      const table = await compare(input, JSON.stringify(options), progress, warn);
      postMessage({ type: 'compared', table });
      return;
    }
    const r = await merge(input, JSON.stringify(options), progress, warn);
    postMessage({ type: 'done', zip: r.zip, report: r.report, backend: r.backend, notes: Array.from(r.notes), wasmMemoryBytes: engine.memory_bytes() }, [r.zip.buffer]);
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
