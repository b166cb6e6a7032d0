// On a pinned origin's page (the extension's own world): once the page has loaded, send the
// background what the page pins (scripts, stylesheets, the import map) and mark a verified page
// for its own code to read (web/js/verified_peer.js): `data-verified-build` on <html>, and the
// event "broker-web-verified" on the document. On "stop", ask the page's world to end its media
// and connections (content/main_world.js) and answer once it has.
(() => {
  const api = globalThis.browser ?? globalThis.chrome;

  function pinsOfPage() {
    const pins = [];
    for (const script of document.querySelectorAll("script[src]")) {
      pins.push({ url: script.src, integrity: script.integrity });
    }
    for (const link of document.querySelectorAll("link[rel~='stylesheet'], link[rel~='modulepreload']")) {
      pins.push({ url: link.href, integrity: link.integrity });
    }
    for (const map of document.querySelectorAll("script[type='importmap']")) {
      try {
        for (const [url, integrity] of Object.entries(JSON.parse(map.textContent).integrity ?? {})) {
          pins.push({ url: new URL(url, document.baseURI).href, integrity: String(integrity) });
        }
      } catch {
        pins.push({ url: location.href, integrity: "an import map that is not JSON" });
      }
    }
    return pins;
  }

  async function report() {
    const answer = await api.runtime.sendMessage({ type: "page", pins: pinsOfPage() });
    if (answer?.status === "verified") {
      document.documentElement.dataset.verifiedBuild = answer.version;
      document.dispatchEvent(new Event("broker-web-verified"));
    }
  }

  api.runtime.onMessage.addListener((message, _sender, reply) => {
    if (message?.type !== "stop") return false;
    document.addEventListener("broker-web-verify:stopped", () => reply({ stopped: true }), { once: true });
    document.dispatchEvent(new Event("broker-web-verify:stop"));
    return true;
  });

  if (document.readyState === "complete") report();
  else window.addEventListener("load", () => report(), { once: true });
})();
