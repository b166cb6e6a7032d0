// The client's safety plan (docs/protocol.md 7.4.3): what a client may leave, in the checklist,
// for the moment they cannot talk freely: a code word or phrase that means so, whether the
// therapist may call back if the call drops, and how.
//
// It is sealed here for the therapist alone, exactly as the emergency details are: AES-256-GCM
// under a key of its own from the key the client's link carries, bound to the session and the
// seat, so the broker keeps and forwards only ciphertext and another client of a couple or family
// cannot open it. broker/crypto/safety_plan.py implements the same; the `safety_plan` vectors in
// tests/vectors/e2ee.json keep the two identical. The client's page keeps the code word in memory
// only, to recognise it in chat (safety_signal.js); the form's fields are cleared once sent and
// learn nothing into form history (autocomplete off, never inside a submitted <form>).
//
// The therapist's side opens each seat's plan with that seat's key and shows it beside the
// emergency details (SealedPlans), and again with every safety notice (safety_signal.js).

import { b64urlDecode, b64urlEncode, lp } from "./e2ee.js";
import { defaultText, show } from "./i18n.js";
import { byId, el } from "./ui.js";

const PLAN_INFO = "safety-plan v1";
const PLAN_LABEL = "tt-safety-plan v1";
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
const LINK_KEY_BYTES = 32;
/** The longest code word, and "how to call back", in characters (code points) after trimming. */
export const MAX_CODE_WORD_CHARS = 100;
export const MAX_HOW_CHARS = 500;

/** A sealed plan that does not open, or whose plaintext is not the object of 7.4.3. */
export class SafetyPlanError extends Error {
  constructor(message) {
    super(message);
    this.name = "SafetyPlanError";
  }
}

/** UTF-8 bytes, refusing lone surrogates as Python does (lp() checks; its 4-byte prefix is dropped). */
function utf8(text) {
  return lp(text).subarray(4);
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** K_plan = HKDF-SHA256(link key, salt = session id, info = "safety-plan v1"): raw 32 bytes. */
export async function deriveSafetyPlanKey(linkKey, sessionId) {
  if (!(linkKey instanceof Uint8Array) || linkKey.length !== LINK_KEY_BYTES) throw new Error("a link key is 32 bytes");
  const ikm = await crypto.subtle.importKey("raw", linkKey, "HKDF", false, ["deriveBits"]);
  const params = { name: "HKDF", hash: "SHA-256", salt: utf8(sessionId), info: utf8(PLAN_INFO) };
  return new Uint8Array(await crypto.subtle.deriveBits(params, ikm, 256));
}

function planAad(sessionId, peerId) {
  return concat([lp(PLAN_LABEL), lp(sessionId), lp(peerId)]);
}

/** {"code_word","call_back","how"} as JSON.stringify writes it; an Error for an empty plan or a long field. */
export function safetyPlanPlaintext({ codeWord = "", callBack = null, how = "" }) {
  const word = String(codeWord).trim();
  const way = String(how).trim();
  if ([...word].length > MAX_CODE_WORD_CHARS) throw new Error(`a code word has at most ${MAX_CODE_WORD_CHARS} characters`);
  if ([...way].length > MAX_HOW_CHARS) throw new Error(`how to call back has at most ${MAX_HOW_CHARS} characters`);
  if (callBack !== null && typeof callBack !== "boolean") throw new Error("call_back is true, false or null");
  if (!word && !way && callBack === null) throw new Error("an empty safety plan is not sealed");
  return JSON.stringify({ code_word: word, call_back: callBack, how: way });
}

/** Seal a plan for the therapist, bound to this seat. The nonce option is for test vectors only. */
export async function sealSafetyPlan(linkKey, sessionId, peerId, plan, { nonce = null } = {}) {
  const iv = nonce ?? crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
  if (!(iv instanceof Uint8Array) || iv.length !== NONCE_BYTES) throw new Error(`nonce must be ${NONCE_BYTES} bytes`);
  const key = await crypto.subtle.importKey("raw", await deriveSafetyPlanKey(linkKey, sessionId), "AES-GCM", false, ["encrypt"]);
  const params = { name: "AES-GCM", iv, additionalData: planAad(sessionId, peerId) };
  const sealed = new Uint8Array(await crypto.subtle.encrypt(params, key, utf8(safetyPlanPlaintext(plan))));
  return b64urlEncode(concat([iv, sealed]));
}

/** The plan a client sealed, as {codeWord, callBack, how}; SafetyPlanError if it does not open or is not a plan. */
export async function openSafetyPlan(linkKey, sessionId, peerId, sealed) {
  let blob;
  try {
    blob = b64urlDecode(sealed);
  } catch {
    throw new SafetyPlanError("a sealed safety plan is base64url");
  }
  if (blob.length < NONCE_BYTES + TAG_BYTES) throw new SafetyPlanError("a sealed safety plan is too short");
  const key = await crypto.subtle.importKey("raw", await deriveSafetyPlanKey(linkKey, sessionId), "AES-GCM", false, ["decrypt"]);
  const params = { name: "AES-GCM", iv: blob.subarray(0, NONCE_BYTES), additionalData: planAad(sessionId, peerId) };
  let plain;
  try {
    plain = await crypto.subtle.decrypt(params, key, blob.subarray(NONCE_BYTES));
  } catch {
    throw new SafetyPlanError("the safety plan failed authentication: altered, or sealed for another seat or session");
  }
  let value;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(plain));
  } catch {
    throw new SafetyPlanError("the safety plan is not JSON text");
  }
  if (!value || typeof value !== "object" || Array.isArray(value)) throw new SafetyPlanError("the safety plan is not a JSON object");
  const { code_word: codeWord = "", call_back: callBack = null, how = "" } = value;
  if (typeof codeWord !== "string" || typeof how !== "string" || (callBack !== null && typeof callBack !== "boolean")) {
    throw new SafetyPlanError("the safety plan's members are not of their types");
  }
  return { codeWord, callBack, how };
}

/**
 * The form of a code word and of a chat message that are compared (7.4.3): NFKC, lower case, runs
 * of white space as one space, white space and punctuation removed at both ends.
 */
export function normaliseCodeWord(text) {
  return String(text)
    .normalize("NFKC")
    .toLowerCase()
    .replace(/\s+/gu, " ")
    .replace(/^[\s\p{P}]+|[\s\p{P}]+$/gu, "");
}

/** Whether a whole chat message is the code word (never a message that merely contains it). */
export function isCodeWord(message, codeWord) {
  const wanted = normaliseCodeWord(codeWord ?? "");
  return wanted !== "" && normaliseCodeWord(message) === wanted;
}

// ==================================================================== the client's checklist

/** What this page sealed and keeps for the call: the sealed plan and the code word (memory only). */
const kept = { sealed: null, codeWord: "" };

/** The plan this page sealed at its checklist (or null), and its code word ("" if none). */
export function keptPlan() {
  return { sealed: kept.sealed, codeWord: kept.codeWord };
}

/**
 * Put the discreet signal's words into `node`: the practice's own (the policy's [safety]
 * signal_label), or the catalogue's in the page's language when the practice kept the default.
 */
export function showSignalLabel(node, safety) {
  const own = safety?.signal_label;
  if (!own || own === defaultText("safety.signal_default")) return show(node, "safety.signal_default");
  delete node.dataset.i18n;
  node.textContent = own;
  return node;
}

/** Show the plan's fields in the checklist if the practice offers them, and name the signal in its hint. */
export function setupPlanForm(safety) {
  const offered = safety?.plan !== false;
  byId("safety-plan").hidden = !offered;
  const place = safety?.signal_place ?? "menu";
  const hint = byId("plan-signal-hint");
  if (place === "menu" || place === "controls") {
    show(hint, `plan.signal_${place}`, { label: showSignalLabel(el("span"), safety) });
  } else {
    delete hint.dataset.i18n;
    hint.replaceChildren();
  }
  byId("plan-code-word").addEventListener("input", checkCodeWord);
  return offered;
}

function checkCodeWord() {
  const input = byId("plan-code-word");
  const unusable = input.value.trim() !== "" && normaliseCodeWord(input.value) === "";
  byId("plan-code-word-problem").hidden = !unusable;
}

/** Seal what the client filled in (null if nothing, or the form is not offered) and keep the code word. */
export async function sealPlanForm(linkKey, sessionId, peerId) {
  if (byId("safety-plan").hidden) return null;
  const choice = byId("plan-call-back").value;
  const plan = {
    codeWord: byId("plan-code-word").value,
    callBack: choice === "yes" ? true : choice === "no" ? false : null,
    how: byId("plan-how").value,
  };
  if (!plan.codeWord.trim() && !plan.how.trim() && plan.callBack === null) return null;
  const sealed = await sealSafetyPlan(linkKey, sessionId, peerId, plan);
  kept.sealed = sealed;
  kept.codeWord = plan.codeWord.trim();
  return sealed;
}

/** Empty the form's fields (once sent, and when the page tears down). */
export function clearPlanForm() {
  byId("plan-code-word").value = "";
  byId("plan-how").value = "";
  byId("plan-call-back").value = "";
}

/** Forget the plan and the code word this page kept (the session is over for this page). */
export function forgetPlan() {
  kept.sealed = null;
  kept.codeWord = "";
  clearPlanForm();
}

// ==================================================================== the therapist's side

/**
 * Each client seat's sealed plan, opened with that seat's key (the therapist's page): rendered
 * beside the emergency details, and looked up by safety_signal.js for its notices.
 */
export class SealedPlans {
  #entries = new Map(); // key ("<seat>" or "<seat>/other") -> {sealed, value, error}
  #sessionId;
  #keyFor;
  #changed;

  /** keyFor(peer): that client's pair link key (a promise), or null without the session secret. */
  constructor(sessionId, keyFor, changed) {
    this.#sessionId = sessionId;
    this.#keyFor = keyFor;
    this.#changed = changed;
  }

  /** A seat's checklist result came (again): open its plan if it is new. */
  update(key, peer, sealed) {
    if (!sealed || this.#entries.get(key)?.sealed === sealed) return;
    const entry = { sealed, value: null, error: null };
    this.#entries.set(key, entry);
    this.open(peer, sealed)
      .then((value) => (entry.value = value))
      .catch((err) => (entry.error = err.message))
      .finally(() => this.#changed());
  }

  /** Open a sealed plan of client `peer` (from its checklist, or from a safety message). */
  async open(peer, sealed) {
    const key = await this.#keyFor(peer);
    if (!key) throw new SafetyPlanError("sealed with the link key");
    return openSafetyPlan(key, this.#sessionId, peer, sealed);
  }

  /** The seat's plan as opened: {sealed, value, error}, or undefined if it left none. */
  get(key) {
    return this.#entries.get(key);
  }

  clear() {
    this.#entries.clear();
  }

  /** Beside the emergency details: the plan, or why it cannot be read; null if the client left none. */
  render(key, hasKey) {
    const entry = this.#entries.get(key);
    if (!entry) return null;
    let body;
    if (!hasKey) body = show(el("p", { className: "hint" }), "plan.sealed_hint");
    else if (entry.error) body = show(el("p", { className: "warn" }), "plan.not_opened");
    else if (!entry.value) body = show(el("p", { className: "hint" }), "plan.opening");
    else body = planList(entry.value);
    return el("details", { className: "emergency safety-plan" }, [show(el("summary"), "plan.therapist_summary"), body]);
  }
}

/** The plan as a definition list, plain text only. */
export function planList(plan) {
  // The client's own words as written; the rest from the catalogue (keys).
  const callBack = plan.callBack === true ? "plan.list.yes" : plan.callBack === false ? "plan.list.no_call_back" : "plan.list.not_said";
  const said = (text, key) => (text ? el("dd", { text }) : show(el("dd"), key));
  const pair = (term, value) => el("div", {}, [show(el("dt"), term), value]);
  return el("dl", { "data-testid": "safety-plan-opened" }, [
    pair("plan.list.code_word", said(plan.codeWord, "plan.list.none")),
    pair("plan.list.call_back", show(el("dd"), callBack)),
    pair("plan.list.how", said(plan.how, "plan.list.not_said")),
  ]);
}
