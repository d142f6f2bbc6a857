// The page's service worker. Two jobs:
//
// 1. Offline use. On install it caches every file of the build (the page, both engines, the demo),
//    listed in BUILD with the build's version, a hash of those files that tools/precache.mjs writes
//    in at build time. A cache is named by its version; a new deploy changes the version, so the
//    browser installs this worker again (its bytes changed), which caches the new files and
//    deletes the older caches once it takes over. Same-origin GET requests are answered from the
//    cache first, then the network; a page navigation the network cannot answer gets the cached
//    page.
// 2. Cross-origin isolation on static hosts that cannot send headers (GitHub Pages): every
//    same-origin response is passed on with the two headers that isolate the page (COOP:
//    same-origin, COEP: require-corp). Cause: browsers give SharedArrayBuffer, and so WebAssembly
//    threads, only to cross-origin-isolated pages
//    (https://developer.mozilla.org/en-US/docs/Web/API/Window/crossOriginIsolated). The page
//    fetches nothing from other origins (its Content-Security-Policy says so), so the headers
//    change nothing else. This job goes when such hosts send the headers themselves.
//
// tools/precache.mjs replaces the next line; where it has not run (www/ served as it is), nothing
// is cached and the worker only adds the headers.
const BUILD = { version: 'unbuilt', files: [] };
const CACHE = `iteris-${BUILD.version}`;

self.addEventListener('install', (event) => {
  // `cache: 'reload'`: the files themselves, not what the browser's HTTP cache holds of them.
  const fill = async () => {
    if (BUILD.files.length === 0) return;
    const cache = await caches.open(CACHE);
    await cache.addAll(BUILD.files.map((f) => new Request(f, { cache: 'reload' })));
  };
  event.waitUntil(fill().then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => {
  const prune = async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith('iteris-') && name !== CACHE) await caches.delete(name);
    }
    await self.clients.claim();
  };
  event.waitUntil(prune());
});

function isolated(response) {
  if (response.status === 0) return response; // opaque: its headers cannot be read or set
  const headers = new Headers(response.headers);
  headers.set('Cross-Origin-Opener-Policy', 'same-origin');
  headers.set('Cross-Origin-Embedder-Policy', 'require-corp');
  headers.set('Cross-Origin-Resource-Policy', 'same-origin');
  return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
}

async function answer(request) {
  const cache = BUILD.files.length ? await caches.open(CACHE) : null;
  // The page is also loaded with a query (?threads=1): the same file.
  const navigate = request.mode === 'navigate';
  const hit = cache && (await cache.match(request, { ignoreSearch: navigate }));
  if (hit) return isolated(hit);
  try {
    return isolated(await fetch(request));
  } catch (e) {
    const page = navigate && cache && (await cache.match('./', { ignoreSearch: true }));
    if (page) return isolated(page);
    throw e;
  }
}

self.addEventListener('fetch', (event) => {
  const request = event.request;
  if (request.method !== 'GET' || new URL(request.url).origin !== self.location.origin) return;
  // A request the browser may only answer from its cache cannot be fetched here.
  if (request.cache === 'only-if-cached' && request.mode !== 'same-origin') return;
  event.respondWith(answer(request));
});
