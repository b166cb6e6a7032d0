// The client's pages in the client's language (issue 33; docs/i18n.md).
//
// One catalogue per language, web/i18n/<tag>.json: a flat map from a key to an ICU MessageFormat
// message (the subset we use: {name}, {name, number}, {name, plural, one {…} other {…}} with #
// and =N cases, and <strong>…</strong> for emphasis). Each catalogue is fetched with the
// SHA-384 that `broker web-manifest build` wrote into catalogues.js, itself pinned by the pages'
// import map: a changed catalogue does not load. Plurals follow CLDR through Intl.PluralRules,
// numbers and dates go through Intl.
//
// The language: the one the link names (?lang=, set by the therapist when scheduling), else the
// first of the browser's languages we have, else English. The switch on every client page changes
// it for this page only: nothing is stored (no_trace.js). Every text put on the page through
// `show` or a data-i18n attribute remembers its key, so a switch re-renders it in place and
// leaves what the client entered or ticked as it was.

import { CATALOGUES, DEFAULT_LANGUAGE } from "./catalogues.js";

/** The catalogues this page may use (a subset of the shipped ones; see `setAvailable`). */
let available = Object.keys(CATALOGUES);
let current = DEFAULT_LANGUAGE;
/** language tag -> {key: message} */
const loaded = new Map();
const listeners = new Set();

/** The language shown now (a BCP 47 tag of a shipped catalogue). */
export function language() {
  return current;
}

/** The shipped catalogues the page offers, each {tag, name, dir}. */
export function languages() {
  return available.map((tag) => ({ tag, name: CATALOGUES[tag].name, dir: CATALOGUES[tag].dir }));
}

/** The shipped catalogue that best matches `wanted` (a tag such as "es-MX"), or null. */
export function match(wanted) {
  if (typeof wanted !== "string" || wanted === "") return null;
  const lower = wanted.toLowerCase();
  const exact = available.find((tag) => tag.toLowerCase() === lower);
  if (exact) return exact;
  const base = lower.split("-")[0];
  return available.find((tag) => tag.toLowerCase() === base) ?? null;
}

/** The language to start with: the link's tag, else the browser's languages in order, else English. */
export function chooseLanguage(linkTag = new URLSearchParams(location.search).get("lang")) {
  for (const wanted of [linkTag, ...(navigator.languages ?? [navigator.language])]) {
    const found = match(wanted);
    if (found) return found;
  }
  return DEFAULT_LANGUAGE;
}

/**
 * Offer only the practice's languages (joined.policy.languages; the default one always stays):
 * the switch shows them, and a page showing another one moves to the best of them.
 */
export async function limitLanguages(tags) {
  const shipped = Object.keys(CATALOGUES);
  available = shipped.filter((tag) => tags.includes(tag) || tag === DEFAULT_LANGUAGE);
  if (!available.includes(current)) await setLanguage(chooseLanguage());
  installSwitch();
}

/** How long one try at a catalogue may take, and how many tries: a page never waits on it forever. */
const LOAD_WAIT_MS = 5000;
const LOAD_TRIES = 3;

async function load(tag) {
  if (loaded.has(tag)) return loaded.get(tag);
  const entry = CATALOGUES[tag];
  let failure = null;
  for (let attempt = 1; attempt <= LOAD_TRIES; attempt++) {
    try {
      const response = await fetch(entry.url, {
        integrity: entry.integrity,
        credentials: "same-origin",
        cache: "no-store",
        signal: AbortSignal.timeout(LOAD_WAIT_MS),
      });
      if (!response.ok) throw new Error(`catalogue ${tag}: HTTP ${response.status}`);
      const messages = await response.json();
      loaded.set(tag, messages);
      return messages;
    } catch (error) {
      failure = error;
      // Bytes that differ from the pin will differ again: only a slow or lost answer is tried again.
      if (error?.name !== "TimeoutError" && !String(error?.message).includes("HTTP 5")) break;
      console.warn(`event=catalogue_retry language=${tag} attempt=${attempt}`);
    }
  }
  throw failure;
}

/**
 * Switch the page to `tag`: load its catalogue (and the default one, for missing keys), set the
 * document's lang and dir, re-render every text that came from a catalogue, and tell listeners.
 */
export async function setLanguage(tag) {
  let chosen = CATALOGUES[tag] ? tag : DEFAULT_LANGUAGE;
  try {
    await load(DEFAULT_LANGUAGE);
    await load(chosen);
  } catch {
    // A catalogue whose bytes differ from its pin (or that did not arrive) is not used: the page
    // stays in the language it has, the English written in it.
    console.warn(`event=catalogue_refused language=${chosen}`);
    if (chosen === current || !loaded.has(current)) return current;
    chosen = current;
  }
  current = chosen;
  document.documentElement.lang = chosen;
  document.documentElement.dir = CATALOGUES[chosen].dir;
  translateTree(document);
  for (const listener of listeners) listener(chosen);
  return chosen;
}

/** Call `listener(tag)` after every language switch (to re-render texts not kept by key). */
export function onLanguageChange(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

function message(key) {
  const own = loaded.get(current)?.[key];
  if (typeof own === "string") return own;
  const fallback = loaded.get(DEFAULT_LANGUAGE)?.[key];
  if (typeof fallback === "string") return fallback;
  console.warn(`event=missing_message key=${key}`);
  return key;
}

/**
 * `key`'s plain text in language `tag`, whatever the page shows (a message written for someone else,
 * such as the email to a client in their link's language); the page's language if `tag` has no
 * catalogue or it does not load.
 */
export async function textIn(tag, key, args = {}) {
  if (!CATALOGUES[tag]) return t(key, args);
  try {
    await load(DEFAULT_LANGUAGE);
    await load(tag);
  } catch {
    return t(key, args);
  }
  const own = loaded.get(tag)?.[key];
  const text = typeof own === "string" ? own : loaded.get(DEFAULT_LANGUAGE)?.[key];
  if (typeof text !== "string") return t(key, args);
  return format(text, args, typeof own === "string" ? tag : DEFAULT_LANGUAGE).replace(/<\/?strong>/g, "");
}

/** `key`'s message in the default language (English), as written, or null before it loads: to tell
 * a setting left at its default (e.g. the policy's signal label) from a practice's own words. */
export function defaultText(key) {
  const text = loaded.get(DEFAULT_LANGUAGE)?.[key];
  return typeof text === "string" ? text : null;
}

/** Whether the catalogues loaded so far have `key` (in the current or the default language). */
export function has(key) {
  return typeof loaded.get(current)?.[key] === "string" || typeof loaded.get(DEFAULT_LANGUAGE)?.[key] === "string";
}

/**
 * What to show for a refusal of the JSON API ({error, message}, docs/protocol.md 15): the broker
 * writes its sentences in English, so a page in another language shows its catalogue's sentence
 * for the code (`api.<code>`) instead; in English, the broker's own (often more precise) one.
 * `fallbackKey` when the answer had neither.
 */
export function apiMessage(data, fallbackKey = null) {
  const code = typeof data?.error === "string" ? data.error : "";
  const own = typeof loaded.get(current)?.[`api.${code}`] === "string";
  if (code && current !== DEFAULT_LANGUAGE && own) return t(`api.${code}`);
  if (typeof data?.message === "string" && data.message) return data.message;
  return fallbackKey ? t(fallbackKey) : "";
}

/** The plain text of `key` with `args` in the current language (emphasis tags dropped). */
export function t(key, args = {}) {
  return parts(key, args)
    .map((part) => (typeof part === "string" ? part : part.text))
    .join("");
}

/** `key`'s text as parts: strings, and {strong: true, text} for the <strong> runs. */
function parts(key, args) {
  const text = format(message(key), args, current);
  const out = [];
  const tag = /<strong>(.*?)<\/strong>/gs;
  let at = 0;
  for (const found of text.matchAll(tag)) {
    if (found.index > at) out.push(text.slice(at, found.index));
    out.push({ strong: true, text: found[1] });
    at = found.index + found[0].length;
  }
  if (at < text.length) out.push(text.slice(at));
  return out;
}

/**
 * Put `key`'s text into `node` and remember the key (and the arguments) on it, so that a language
 * switch re-renders it. Arguments that are DOM nodes are put in place (slots: {time} as an element
 * of the page); <strong> runs become <strong> elements. Never innerHTML.
 */
export function show(node, key, args = {}) {
  node.dataset.i18n = key;
  const plain = {};
  const slots = {};
  for (const [name, value] of Object.entries(args)) {
    if (value instanceof Element) {
      value.dataset.i18nSlot = name;
      slots[name] = value;
      plain[name] = `\u0000${name}\u0000`;
    } else plain[name] = value;
  }
  if (Object.keys(plain).length && Object.keys(slots).length === 0) node.dataset.i18nArgs = JSON.stringify(plain);
  else delete node.dataset.i18nArgs;
  const children = [];
  for (const part of parts(key, plain)) {
    const text = typeof part === "string" ? part : part.text;
    const pieces = text.split("\u0000");
    const built = [];
    pieces.forEach((piece, i) => {
      if (i % 2 === 1 && slots[piece]) built.push(slots[piece]);
      else if (piece) built.push(document.createTextNode(piece));
    });
    if (typeof part === "string") children.push(...built);
    else {
      const strong = document.createElement("strong");
      strong.append(...built);
      children.push(strong);
    }
  }
  node.replaceChildren(...children);
  return node;
}

/** Translate an attribute (aria-label, title) by key, remembered for a switch. */
export function showAttribute(node, attribute, key, args = {}) {
  const kept = JSON.parse(node.dataset.i18nAttrs ?? "{}");
  kept[attribute] = [key, args];
  node.dataset.i18nAttrs = JSON.stringify(kept);
  node.setAttribute(attribute, t(key, args));
}

/** Re-render every element under `root` that came from a catalogue (data-i18n, data-i18n-attrs). */
export function translateTree(root) {
  for (const node of root.querySelectorAll("[data-i18n]")) {
    const slots = {};
    for (const slot of node.querySelectorAll("[data-i18n-slot]")) {
      if (slot.parentElement.closest("[data-i18n]") === node) slots[slot.dataset.i18nSlot] = slot;
    }
    const args = node.dataset.i18nArgs ? JSON.parse(node.dataset.i18nArgs) : {};
    show(node, node.dataset.i18n, { ...args, ...slots });
  }
  for (const node of root.querySelectorAll("[data-i18n-attrs]")) {
    for (const [attribute, [key, args]] of Object.entries(JSON.parse(node.dataset.i18nAttrs))) {
      node.setAttribute(attribute, t(key, args));
    }
  }
}

// ------------------------------------------------------------------ message format

/**
 * Format an ICU MessageFormat message (our subset) with `args` for language `tag`. Unknown
 * arguments stay as {name}; a malformed message is shown as written rather than throwing.
 */
export function format(text, args, tag) {
  try {
    return render(parse(text), args, tag, null);
  } catch {
    return text;
  }
}

function parse(text) {
  let at = 0;
  function nodes(stopAtBrace) {
    const out = [];
    let literal = "";
    while (at < text.length) {
      const ch = text[at];
      if (ch === "'" && text[at + 1] === "'") {
        literal += "'";
        at += 2;
      } else if (ch === "'" && (text[at + 1] === "{" || text[at + 1] === "}" || text[at + 1] === "#")) {
        const end = text.indexOf("'", at + 1);
        literal += text.slice(at + 1, end < 0 ? text.length : end);
        at = end < 0 ? text.length : end + 1;
      } else if (ch === "{") {
        if (literal) out.push(literal);
        literal = "";
        at++;
        out.push(argument());
      } else if (ch === "}") {
        if (!stopAtBrace) throw new Error("unbalanced }");
        break;
      } else if (ch === "#") {
        if (literal) out.push(literal);
        literal = "";
        out.push({ hash: true });
        at++;
      } else {
        literal += ch;
        at++;
      }
    }
    if (literal) out.push(literal);
    return out;
  }
  function word() {
    const found = /^\s*([^\s,{}]+)\s*/.exec(text.slice(at));
    if (!found) throw new Error("expected a name");
    at += found[0].length;
    return found[1];
  }
  function argument() {
    const name = word();
    if (text[at] === "}") {
      at++;
      return { name };
    }
    if (text[at] !== ",") throw new Error("expected , or }");
    at++;
    const type = word();
    if (text[at] === "}") {
      at++;
      return { name, type };
    }
    if (text[at] !== ",") throw new Error("expected ,");
    at++;
    if (type !== "plural") throw new Error(`unsupported type ${type}`);
    const cases = {};
    for (;;) {
      const found = /^\s*/.exec(text.slice(at));
      at += found[0].length;
      if (text[at] === "}") {
        at++;
        break;
      }
      const selector = word();
      if (text[at] !== "{") throw new Error("expected {");
      at++;
      cases[selector] = nodes(true);
      if (text[at] !== "}") throw new Error("expected }");
      at++;
    }
    if (!cases.other) throw new Error("plural without other");
    return { name, type, cases };
  }
  const tree = nodes(false);
  if (at < text.length) throw new Error("trailing text");
  return tree;
}

function render(tree, args, tag, count) {
  let out = "";
  for (const node of tree) {
    if (typeof node === "string") out += node;
    else if (node.hash) out += count === null ? "#" : new Intl.NumberFormat(tag).format(count);
    else if (!(node.name in args)) out += `{${node.name}}`;
    else if (node.type === "number") out += new Intl.NumberFormat(tag).format(Number(args[node.name]));
    else if (node.type === "plural") {
      const value = Number(args[node.name]);
      const chosen = node.cases[`=${value}`] ?? node.cases[new Intl.PluralRules(tag).select(value)] ?? node.cases.other;
      out += render(chosen, args, tag, value);
    } else out += String(args[node.name]);
  }
  return out;
}

// ------------------------------------------------------------------ the switch

/**
 * Fill every language switch of the page (a <select data-language-switch>) with the offered
 * languages, each named in its own language, and switch when the client picks one.
 */
let switchWired = false;

export function installSwitch() {
  for (const select of document.querySelectorAll("select[data-language-switch]")) {
    const options = languages().map(({ tag, name }) => {
      const option = document.createElement("option");
      option.value = tag;
      option.lang = tag;
      option.textContent = name;
      return option;
    });
    select.replaceChildren(...options);
    select.value = current;
    select.closest("[data-language-box]")?.removeAttribute("hidden");
    if (!select.dataset.wired) {
      select.dataset.wired = "yes";
      select.addEventListener("change", () => setLanguage(select.value));
    }
  }
  if (switchWired) return;
  switchWired = true;
  onLanguageChange((tag) => {
    for (const select of document.querySelectorAll("select[data-language-switch]")) select.value = tag;
  });
}

/** Start a client page in its language: choose it, load it, show the switch. */
export async function startLanguage() {
  const chosen = await setLanguage(chooseLanguage());
  installSwitch();
  return chosen;
}
