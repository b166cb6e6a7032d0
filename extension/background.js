// The extension's background: for each tab showing a pinned origin, check every page, script,
// stylesheet, image and font it loads against the origin's signed web manifest.
//
// Firefox (webRequest.filterResponseData): each response is held back until its bytes and headers
// match; a mismatch never reaches the page, and the tab shows the warning page (fail closed).
// Chromium (no access to response bodies): each response's headers are read as it arrives, its
// bytes are fetched again and compared once it has loaded, and the page's own pins are compared;
// on a mismatch the page's media and connections are stopped and the tab shows the warning page
// (detect and stop). Requests leave only for a pinned origin (its manifest, and the re-fetches).

import { addUserPin, loadPins, managedArrivedLate, originOf, removeUserPin } from "./lib/pins.js";
import {
  MANIFEST_PATH,
  Mismatch,
  SIGNATURES_PATH,
  checkBody,
  checkHeaders,
  checkPins,
  checkRedirect,
  fingerprint,
  parseCanonical,
  trustedManifest,
  validPinnedSigners,
} from "./lib/verify.js";

const api = globalThis.browser ?? globalThis.chrome;
/** Firefox can hold a response back and read it; Chromium cannot. */
const BLOCKING = typeof api.webRequest.filterResponseData === "function";
/** What a page loads that is code or shown as the page: each must be a file of the manifest. */
const CHECKED = new Set(["main_frame", "sub_frame", "script", "stylesheet", "image", "font", "object", "imageset"]);
/** How long the page's own stop may take before the tab is navigated away regardless. */
const STOP_WAIT_MS = 250;

let pins = new Map();
/** Refreshes run one after another (two at once would register the content scripts twice). */
let refreshing = Promise.resolve();
let pinsReady = refreshPins();
/** tabId -> the check of the document the tab shows (TabCheck). */
const tabs = new Map();

function refreshPins() {
  refreshing = refreshing.catch(() => {}).then(async () => {
    pins = await loadPins();
    try {
      await registerContentScripts();
    } catch {
      /* the checks go on without the page's mark and its stop; the next refresh tries again */
    }
    managedArrivedLate().then((late) => {
      if (late) pinsReady = refreshPins();
    });
  });
  return refreshing;
}

/** The content scripts run only on pinned origins' pages (match patterns cannot name a port). */
async function registerContentScripts() {
  const hosts = [...new Set([...pins.keys()].map((o) => `${new URL(o).protocol}//${new URL(o).hostname}/*`))];
  const registered = await api.scripting.getRegisteredContentScripts();
  if (registered.length) await api.scripting.unregisterContentScripts({ ids: registered.map((s) => s.id) });
  if (!hosts.length) return;
  await api.scripting.registerContentScripts([
    { id: "isolated", matches: hosts, js: ["content/isolated.js"], runAt: "document_start" },
    { id: "main", matches: hosts, js: ["content/main_world.js"], runAt: "document_start", world: "MAIN" },
  ]);
}

api.storage.onChanged.addListener(() => {
  pinsReady = refreshPins();
});

// ------------------------------------------------------------------ the manifest of a pinned origin

async function fetchBytes(url) {
  const response = await fetch(url, { credentials: "omit", cache: "no-store", redirect: "error" });
  if (!response.ok) throw new Mismatch("unreachable", `${new URL(url).pathname} answered ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function loadManifest(origin, keys) {
  try {
    const [manifest, signatures] = await Promise.all([
      fetchBytes(origin + MANIFEST_PATH),
      fetchBytes(origin + SIGNATURES_PATH),
    ]);
    return await trustedManifest(manifest, signatures, keys);
  } catch (err) {
    throw err instanceof Mismatch ? err : new Mismatch("unreachable", "the signed manifest could not be fetched");
  }
}

/** The check of one document in one tab, from its navigation until the next. */
class TabCheck {
  constructor(tabId, origin, keys) {
    this.tabId = tabId;
    this.origin = origin;
    this.manifest = loadManifest(origin, keys);
    this.manifest.catch((err) => this.fail(err));
    this.failure = null;
    this.documentChecked = false;
    this.pending = new Set(); // Chromium: re-fetches not compared yet
  }

  fail(err) {
    if (this.failure) return;
    this.failure = err instanceof Mismatch ? err : new Mismatch("error", String(err?.message ?? err));
    showFailure(this).catch(() => {});
  }
}

function checkFor(details) {
  if (details.tabId < 0) return null; // the extension's own requests, and anything not in a tab
  if (details.type === "main_frame") {
    const origin = originOf(details.url);
    const pin = origin ? pins.get(origin) : undefined;
    if (!pin) {
      tabs.delete(details.tabId);
      return null;
    }
    const check = new TabCheck(details.tabId, origin, pin.keys);
    tabs.set(details.tabId, check);
    return check;
  }
  const known = tabs.get(details.tabId);
  if (known) return known;
  // Chromium ends an idle service worker (and Firefox may suspend an event page), and with it
  // this map: a request from a pinned origin's page in a tab not known (any more) is checked again.
  const from = originOf(details.initiator ?? details.documentUrl ?? "");
  const pin = from ? pins.get(from) : undefined;
  if (!pin) return null;
  const check = new TabCheck(details.tabId, from, pin.keys);
  check.documentChecked = true; // checked by the worker that saw it load (a mismatch would have stopped it)
  tabs.set(details.tabId, check);
  return check;
}

// ------------------------------------------------------------------ stop and warn

function warningUrl(check) {
  const params = new URLSearchParams({ origin: check.origin, code: check.failure.code, detail: check.failure.detail });
  return api.runtime.getURL(`pages/warning.html?${params}`);
}

async function showFailure(check) {
  const { tabId } = check;
  await api.action.setBadgeBackgroundColor({ tabId, color: "#b00020" }).catch(() => {});
  await api.action.setBadgeText({ tabId, text: "!" }).catch(() => {});
  await api.action.setTitle({ tabId, title: `stopped: ${check.failure.detail}` }).catch(() => {});
  // The page stops its media and connections itself first (content/main_world.js), then leaves:
  // a document navigated away from keeps no track and no connection open.
  const stopped = api.tabs.sendMessage(tabId, { type: "stop" }).catch(() => null);
  await Promise.race([stopped, new Promise((resolve) => setTimeout(resolve, STOP_WAIT_MS))]);
  await api.tabs.update(tabId, { url: warningUrl(check) });
}

async function showVerified(check, version) {
  const { tabId } = check;
  await api.action.setBadgeBackgroundColor({ tabId, color: "#1b5e20" }).catch(() => {});
  await api.action.setBadgeText({ tabId, text: "✓" }).catch(() => {});
  await api.action.setTitle({ tabId, title: `verified build ${version}` }).catch(() => {});
}

// ------------------------------------------------------------------ checks common to both browsers

function sameOriginOrFail(check, details) {
  const url = new URL(details.url);
  if (url.origin === check.origin) return true;
  if (url.protocol === "data:" || url.protocol === "blob:") return false;
  check.fail(new Mismatch("other_origin", `the page loads a ${details.type} from ${url.origin}`));
  return false;
}

function checkResponseHeaders(manifest, details, pathname) {
  // A page sent elsewhere (the quick exit to the practice's exit address) leaves the pinned
  // origin: nothing of that origin runs there. A script or style sent elsewhere is refused.
  if (details.statusCode >= 300 && details.statusCode < 400 && details.type !== "main_frame") {
    const location = details.responseHeaders.find((h) => h.name.toLowerCase() === "location")?.value;
    checkRedirect(location, pathname);
  }
  checkHeaders(manifest, details.responseHeaders, pathname);
}

// ------------------------------------------------------------------ Firefox: hold back and check

function concat(chunks) {
  const total = chunks.reduce((n, c) => n + c.byteLength, 0);
  const out = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    out.set(new Uint8Array(chunk), at);
    at += chunk.byteLength;
  }
  return out;
}

/** requestId -> the response's status and headers, until its body is checked (Firefox). */
const heldHeaders = new Map();

function holdBack(check, details) {
  const filter = api.webRequest.filterResponseData(details.requestId);
  const chunks = [];
  const pathname = new URL(details.url).pathname;
  filter.ondata = (event) => chunks.push(event.data);
  filter.onstop = async () => {
    const response = heldHeaders.get(details.requestId);
    heldHeaders.delete(details.requestId);
    try {
      const { manifest } = await check.manifest;
      if (check.failure) throw check.failure;
      if (!response) throw new Mismatch("header", `${pathname}: no response headers were seen`);
      checkResponseHeaders(manifest, response, pathname);
      await checkBody(manifest, pathname, concat(chunks));
      for (const chunk of chunks) filter.write(chunk);
      if (details.type === "main_frame") check.documentChecked = true;
    } catch (err) {
      check.fail(err); // nothing of the body reaches the page
    }
    filter.close();
  };
  filter.onerror = () => heldHeaders.delete(details.requestId); // redirected or aborted: nothing reached the page
}

function firefoxBeforeRequest(details) {
  const check = checkFor(details);
  if (!check || !CHECKED.has(details.type)) return {};
  if (check.failure) return { cancel: true };
  if (!sameOriginOrFail(check, details)) return { cancel: true };
  holdBack(check, details);
  return {};
}

/**
 * Headers are kept for the body's check (the response is not held here: waiting for the manifest
 * at this point stalled the manifest's own fetch now and then); a redirect, which has no body, is
 * checked here once the manifest is known.
 */
function firefoxHeadersReceived(details) {
  const check = tabs.get(details.tabId);
  if (!check || !CHECKED.has(details.type) || new URL(details.url).origin !== check.origin) return {};
  heldHeaders.set(details.requestId, { statusCode: details.statusCode, responseHeaders: details.responseHeaders });
  if (details.statusCode < 300 || details.statusCode >= 400) return {};
  return check.manifest.then(
    ({ manifest }) => {
      checkResponseHeaders(manifest, details, new URL(details.url).pathname);
      return {};
    },
  ).catch((err) => {
    check.fail(err);
    return { cancel: true };
  });
}

// ------------------------------------------------------------------ Chromium: observe, re-fetch, compare

function chromiumBeforeRequest(details) {
  const check = checkFor(details);
  if (check && CHECKED.has(details.type) && !check.failure) sameOriginOrFail(check, details);
}

function chromiumHeadersReceived(details) {
  const check = tabs.get(details.tabId);
  if (!check || !CHECKED.has(details.type) || new URL(details.url).origin !== check.origin) return;
  check.manifest
    .then(({ manifest }) => checkResponseHeaders(manifest, details, new URL(details.url).pathname))
    .catch((err) => check.fail(err));
}

function chromiumCompleted(details) {
  const check = tabs.get(details.tabId);
  if (!check || !CHECKED.has(details.type) || new URL(details.url).origin !== check.origin) return;
  if (details.statusCode >= 300 && details.statusCode < 400) return;
  const compared = (async () => {
    const { manifest } = await check.manifest;
    // The same address again, without cookies: what the page ran cannot be read in Chromium.
    const response = await fetch(details.url, { credentials: "omit", cache: "no-store", redirect: "manual" });
    await checkBody(manifest, new URL(details.url).pathname, new Uint8Array(await response.arrayBuffer()));
    if (details.type === "main_frame") check.documentChecked = true;
  })().catch((err) => check.fail(err));
  check.pending.add(compared);
  compared.finally(() => check.pending.delete(compared));
}

// ------------------------------------------------------------------ messages from the pages

/** A pinned page, once loaded, sends its pins; the answer says whether it is verified so far. */
async function pageStatus(tabId, pinsOfPage) {
  await pinsReady;
  const check = tabs.get(tabId);
  if (!check) return { status: "not_pinned" };
  try {
    const { manifest } = await check.manifest;
    if (pinsOfPage) checkPins(manifest, check.origin, pinsOfPage);
    while (check.pending.size) await Promise.all([...check.pending]);
    if (check.failure) return { status: "stopped", code: check.failure.code };
    if (!check.documentChecked) return { status: "checking" };
    await showVerified(check, manifest.version);
    return { status: "verified", version: manifest.version };
  } catch (err) {
    check.fail(err);
    return { status: "stopped", code: check.failure.code };
  }
}

/** For the popup: what the tab shows, and if not pinned, what pinning it would pin. */
async function describeTab(tab) {
  await pinsReady;
  const origin = originOf(tab.url);
  if (!origin) return { pinnable: false };
  const pin = pins.get(origin);
  const check = tabs.get(tab.id);
  if (pin) {
    let version = null;
    try {
      version = check && !check.failure ? (await check.manifest).manifest.version : null;
    } catch {
      /* shown as not verified */
    }
    return {
      origin,
      pinned: true,
      sources: pin.sources,
      keys: await Promise.all(pin.keys.map(async (key) => ({ key, fingerprint: await fingerprint(key) }))),
      status: check?.failure ? `stopped: ${check.failure.detail}` : version ? `verified build ${version}` : "checking",
    };
  }
  return { origin, pinned: false, pinnable: true };
}

/** The user asked to pin this origin: fetch its manifest (a request the user asked for) and show its signers. */
async function offerPin(origin) {
  const [manifestBytes, signatureBytes] = await Promise.all([
    fetchBytes(origin + MANIFEST_PATH),
    fetchBytes(origin + SIGNATURES_PATH),
  ]);
  const signatures = parseCanonical(signatureBytes, "signatures.json");
  const signers = await validPinnedSigners(manifestBytes, signatures, Object.keys(signatures));
  const manifest = parseCanonical(manifestBytes, "manifest.json");
  return {
    version: String(manifest.version ?? ""),
    signers: await Promise.all(signers.map(async (key) => ({ key, fingerprint: await fingerprint(key) }))),
  };
}

api.runtime.onMessage.addListener((message, sender, reply) => {
  const answer = (async () => {
    switch (message?.type) {
      case "page":
        return pageStatus(sender.tab?.id ?? -1, message.pins);
      case "describe":
        return describeTab(message.tab);
      case "offer":
        return offerPin(message.origin);
      case "pin":
        await addUserPin(message.origin, message.key);
        pinsReady = refreshPins();
        await pinsReady;
        return { ok: true };
      case "unpin":
        await removeUserPin(message.origin);
        pinsReady = refreshPins();
        await pinsReady;
        return { ok: true };
      default:
        return { error: "unknown message" };
    }
  })();
  answer.then(reply, (err) => reply({ error: String(err?.message ?? err) }));
  return true;
});

// ------------------------------------------------------------------ "does this look like a broker?"

/** Tabs whose page is not pinned but was served with the broker's headers. */
const offered = new Set();

/** An unpinned page served with the broker's headers: the badge offers to pin it (nothing is fetched). */
function offerOnHeaders(details) {
  if (details.type !== "main_frame" || details.tabId < 0) return;
  offered.delete(details.tabId);
  const origin = originOf(details.url);
  if (!origin || pins.has(origin)) return;
  const names = new Set(details.responseHeaders.map((h) => h.name.toLowerCase()));
  const csp = details.responseHeaders.find((h) => h.name.toLowerCase() === "content-security-policy")?.value ?? "";
  if (names.has("integrity-policy") && csp.includes("require-trusted-types-for")) offered.add(details.tabId);
}

// Shown once the page has loaded: a navigation resets a tab's badge.
api.tabs.onUpdated.addListener((tabId, change) => {
  if (change.status !== "complete" || !offered.has(tabId)) return;
  api.action.setBadgeText({ tabId, text: "pin?" }).catch(() => {});
  api.action.setTitle({ tabId, title: "This may be a practice's call page: pin its signing key?" }).catch(() => {});
});
api.tabs.onRemoved.addListener((tabId) => {
  offered.delete(tabId);
  tabs.delete(tabId);
});

// ------------------------------------------------------------------ listeners

const ALL = { urls: ["http://*/*", "https://*/*"] };
if (BLOCKING) {
  api.webRequest.onBeforeRequest.addListener(
    (details) => pinsReady.then(() => firefoxBeforeRequest(details)),
    ALL,
    ["blocking"],
  );
  api.webRequest.onHeadersReceived.addListener(
    (details) => {
      offerOnHeaders(details);
      return pinsReady.then(() => firefoxHeadersReceived(details));
    },
    ALL,
    ["blocking", "responseHeaders"],
  );
} else {
  api.webRequest.onBeforeRequest.addListener((details) => {
    pinsReady.then(() => chromiumBeforeRequest(details));
  }, ALL);
  api.webRequest.onHeadersReceived.addListener(
    (details) => {
      offerOnHeaders(details);
      pinsReady.then(() => chromiumHeadersReceived(details));
    },
    ALL,
    ["responseHeaders", "extraHeaders"],
  );
  api.webRequest.onCompleted.addListener((details) => {
    pinsReady.then(() => chromiumCompleted(details));
  }, ALL);
}
