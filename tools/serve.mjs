// A static file server for dist/ on localhost, sending the page's Content-Security-Policy as a
// header too (a <meta> policy does not cover the worker), and the headers that make the page
// cross-origin isolated (threads). Used by tools/serve.sh and the browser
// tests. Usage: node tools/serve.mjs [dir] [port]
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The page's own policy, from its <meta> tag in index.html: one definition, also sent as a header. */
function policyOf(root) {
  const html = fs.readFileSync(path.join(root, 'index.html'), 'utf8');
  const m = html.match(/http-equiv="Content-Security-Policy"\s+content="([^"]+)"/);
  if (!m) throw new Error(`${root}/index.html has no Content-Security-Policy <meta> tag`);
  return m[1];
}

const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8', '.wasm': 'application/wasm', '.json': 'application/json',
  '.txt': 'text/plain; charset=utf-8', '.jsonl': 'text/plain; charset=utf-8', '.svg': 'image/svg+xml',
};

/** Serve `dir` on 127.0.0.1:`port` (0: any free port), with the cross-origin isolation headers
 * unless `isolate` is false (as a static host serves); resolves to the listening server. */
export function serve(dir, port = 0, isolate = process.env.ITERIS_ISOLATE !== '0') {
  const root = path.resolve(dir);
  const csp = policyOf(root);
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://localhost');
    let file = path.join(root, decodeURIComponent(url.pathname));
    if (file !== root && !file.startsWith(root + path.sep)) { res.writeHead(403).end(); return; }
    if (fs.existsSync(file) && fs.statSync(file).isDirectory()) file = path.join(file, 'index.html');
    fs.readFile(file, (err, data) => {
      if (err) { res.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found'); return; }
      res.writeHead(200, {
        'Content-Type': TYPES[path.extname(file)] || 'application/octet-stream',
        'Content-Security-Policy': csp,
        'Referrer-Policy': 'no-referrer',
        'X-Content-Type-Options': 'nosniff',
        'Cache-Control': 'no-cache',
        // Cross-origin isolation: the browser then allows shared memory, so the engine's CPU path
        // runs on threads (www/worker.js). ITERIS_ISOLATE=0 serves without, as a static host
        // does (the page's service worker www/sw.js then adds them).
        ...(!isolate ? {} : {
          'Cross-Origin-Opener-Policy': 'same-origin',
          'Cross-Origin-Embedder-Policy': 'require-corp',
        }),
      });
      res.end(data);
    });
  });
  return new Promise((ok, fail) => {
    server.once('error', fail);
    server.listen(port, '127.0.0.1', () => ok(server));
  });
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const [dir = 'dist', port = '8080'] = process.argv.slice(2);
  let server;
  try {
    server = await serve(dir, Number(port));
  } catch (e) {
    // One line, not a stack trace: the usual cause is another server on the port.
    const why = e.code === 'EADDRINUSE' ? `port ${port} is in use by another program` : e.message;
    console.error(`error: cannot serve the page on 127.0.0.1:${port}: ${why}; choose another port, e.g. PORT=8081 bash tools/serve.sh`);
    process.exit(1);
  }
  console.log(`iteris page: http://127.0.0.1:${server.address().port}/  (serving ${dir}; Ctrl-C stops)`);
}
