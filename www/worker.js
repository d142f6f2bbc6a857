// The engine runs here, off the page's thread, so the page stays responsive during a merge.
// Messages in: { cmd: 'merge' | 'compare', input, options } (see app.js). Messages out: { type: 'version' | 'progress' | 'warning' | 'done' | 'compared' | 'error' }.
// One worker serves one merge; the page terminates it to cancel.
import init, { merge, compare, version, last_panic, panic_file } from './pkg/iteris.js';

// The module's memory only grows, so its size after a merge is the merge's peak.
const ready = init();
const wasmMemoryBytes = async () => (await ready).memory.buffer.byteLength;

self.onmessage = async (event) => {
  const { cmd, input, options } = event.data;
  try {
    await ready;
    postMessage({ type: 'version', version: version() });
    const progress = (pass, passes, label, done, all) => postMessage({ type: 'progress', pass, passes, label, done, all });
    const warn = (text) => postMessage({ type: 'warning', text });
    if (cmd === 'compare') {
      const table = await compare(input, JSON.stringify(options), progress, warn);
      postMessage({ type: 'compared', table });
      return;
    }
    const r = await merge(input, JSON.stringify(options), progress, warn);
    postMessage({ type: 'done', zip: r.zip, report: r.report, backend: r.backend, notes: Array.from(r.notes), wasmMemoryBytes: await wasmMemoryBytes() }, [r.zip.buffer]);
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
    try { panic = last_panic(); file = panic_file(); } catch (_) { /* the module is unusable */ }
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
