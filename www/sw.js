// A service worker of the page's own, for static hosts that cannot send headers (GitHub Pages):
// it passes every same-origin response on with the two headers that make the page cross-origin
// isolated (COOP: same-origin, COEP: require-corp). Cause: browsers give SharedArrayBuffer, and
// so WebAssembly threads, only to cross-origin-isolated pages
// (https://developer.mozilla.org/en-US/docs/Web/API/Window/crossOriginIsolated). The page fetches
// nothing from other origins (its Content-Security-Policy says so), so the headers change nothing
// else. It goes when the host sends the headers itself (tools/serve.mjs does): app.js registers it
// only where the page is not already isolated.
self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));
self.addEventListener('fetch', (event) => {
  const request = event.request;
  if (new URL(request.url).origin !== self.location.origin) return;
  // A request the browser may only answer from its cache cannot be fetched here.
  if (request.cache === 'only-if-cached' && request.mode !== 'same-origin') return;
  event.respondWith(fetch(request).then((response) => {
    if (response.status === 0) return response;
    const headers = new Headers(response.headers);
    headers.set('Cross-Origin-Opener-Policy', 'same-origin');
    headers.set('Cross-Origin-Embedder-Policy', 'require-corp');
    headers.set('Cross-Origin-Resource-Policy', 'same-origin');
    return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
  }));
});
