// Which origins are pinned, and to which signing keys.
//
// Three sources, merged (an origin's keys are the union of all): the file `preconfigured.json`
// shipped inside the extension (a practice edits it before handing the extension out), the
// browser's managed storage (set by an administrator's policy: README), and the pins the user
// made from the popup (storage.local). Reading them makes no network request.

const api = globalThis.browser ?? globalThis.chrome;

/** An origin as the extension keys it (`https://host[:port]`), or null if it is not http(s). */
export function originOf(url) {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.origin : null;
  } catch {
    return null;
  }
}

function cleanList(list) {
  const out = [];
  for (const pin of Array.isArray(list) ? list : []) {
    const origin = originOf(pin?.origin);
    const keys = Array.isArray(pin?.keys) ? pin.keys.filter((k) => typeof k === "string" && /^[A-Za-z0-9_-]{43}$/.test(k)) : [];
    if (origin && keys.length) out.push({ origin, keys });
  }
  return out;
}

async function preconfigured() {
  try {
    const response = await fetch(api.runtime.getURL("preconfigured.json")); // inside the extension
    return cleanList((await response.json()).pins);
  } catch {
    return [];
  }
}

/** How long to wait for managed storage: Chromium may not answer at all while no policy is set. */
const MANAGED_WAIT_MS = 1000;
let managedLate = null;

async function managed() {
  const read = api.storage.managed.get("pins").then(
    (value) => cleanList(value.pins),
    () => [], // no policy set (Firefox throws when there is none)
  );
  const late = new Promise((resolve) => setTimeout(() => resolve(null), MANAGED_WAIT_MS));
  const first = await Promise.race([read, late]);
  if (first !== null) return first;
  managedLate = read; // a policy answered late: loadPins' caller is told through onManagedLate
  return [];
}

/** Resolves (with true) if managed storage answered after loadPins gave up waiting and has pins. */
export async function managedArrivedLate() {
  const pending = managedLate;
  return pending ? (await pending).length > 0 : false;
}

async function userPins() {
  return cleanList((await api.storage.local.get("pins")).pins);
}

/** origin -> {keys: [public key], sources: [where it was pinned]} */
export async function loadPins() {
  const merged = new Map();
  const sources = [
    ["preconfigured", await preconfigured()],
    ["managed", await managed()],
    ["user", await userPins()],
  ];
  for (const [source, list] of sources) {
    for (const { origin, keys } of list) {
      const entry = merged.get(origin) ?? { keys: [], sources: [] };
      entry.keys = [...new Set([...entry.keys, ...keys])];
      if (!entry.sources.includes(source)) entry.sources.push(source);
      merged.set(origin, entry);
    }
  }
  return merged;
}

/** Pin `origin` to `key` as the user chose (added to what is there). */
export async function addUserPin(origin, key) {
  const pins = await userPins();
  const entry = pins.find((p) => p.origin === origin);
  if (entry) entry.keys = [...new Set([...entry.keys, key])];
  else pins.push({ origin, keys: [key] });
  await api.storage.local.set({ pins });
}

/** Forget the user's own pin of `origin` (preconfigured and managed ones stay). */
export async function removeUserPin(origin) {
  const pins = (await userPins()).filter((p) => p.origin !== origin);
  await api.storage.local.set({ pins });
}
