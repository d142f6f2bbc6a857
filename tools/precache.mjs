// Write the build's file list and version into its service worker (DIR/sw.js, from www/sw.js):
// every file under DIR but sw.js itself, and a hash of their paths and bytes. A deploy that
// changes any file changes the worker's bytes, so browsers install it again and replace their
// offline copy (see www/sw.js). Run by tools/build_web.sh; running it again is harmless.
// Usage: node tools/precache.mjs [DIR]   (default dist)
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';

const dir = path.resolve(process.argv[2] || 'dist');
const files = [];
(function walk(d) {
  for (const e of fs.readdirSync(d, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
    const p = path.join(d, e.name);
    if (e.isDirectory()) walk(p);
    else if (e.isFile()) files.push(path.relative(dir, p).split(path.sep).join('/'));
  }
})(dir);
const cached = files.filter((f) => f !== 'sw.js');
const hash = crypto.createHash('sha256');
for (const f of cached) hash.update(f).update('\0').update(fs.readFileSync(path.join(dir, f))).update('\0');
const version = hash.digest('hex').slice(0, 16);
// './' is the page as a navigation asks for it (the folder), beside index.html.
const list = ['./', ...cached];
const sw = path.join(dir, 'sw.js');
const src = fs.readFileSync(sw, 'utf8');
const line = /^const BUILD = \{.*\};$/m;
if (!line.test(src)) throw new Error(`${sw} has no "const BUILD = {...};" line to fill in`);
fs.writeFileSync(sw, src.replace(line, `const BUILD = ${JSON.stringify({ version, files: list })};`));
const bytes = cached.reduce((n, f) => n + fs.statSync(path.join(dir, f)).size, 0);
console.log(`${path.relative(process.cwd(), sw) || sw}: version ${version}, ${cached.length} files (${(bytes / 2 ** 20).toFixed(1)} MiB) cached for offline use`);
