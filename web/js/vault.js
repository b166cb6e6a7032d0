// The therapist's vault: labels, notes and session secrets only the therapist's own devices can read.
//
// A random 256-bit vault key, made here, seals each item with AES-GCM; the additional data binds
// the item to the account, the session and the slot ("session", "secret" or a client seat's peer
// id), so the broker can neither read an item nor move it elsewhere. The broker keeps the vault key
// only wrapped under a key derived here from the password (PBKDF2-SHA256, a random salt, a high
// cost), which the broker never sees. On a device the unwrapped key lives in IndexedDB as a
// non-extractable CryptoKey until logout. docs/protocol.md 15.21-15.25, docs/security.md 3.5.

import { b64urlDecode, b64urlEncode } from "./e2ee.js";
import { apiMessage, t } from "./i18n.js";
import { storeTx } from "./idb.js";

export const ITERATIONS = 600_000;
const ITERATIONS_MIN = 100_000;
const ITERATIONS_MAX = 10_000_000;
export const LABEL_MAX = 100;
export const NOTE_MAX = 1000;
const LINK_KEY_RE = /^[A-Za-z0-9_-]{43}$/;
const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

// ---------------------------------------------------------------- crypto

function joined(...parts) {
  return encoder.encode(parts.join("\u0000"));
}

async function passwordKey(password, salt, iterations) {
  if (!Number.isInteger(iterations) || iterations < ITERATIONS_MIN || iterations > ITERATIONS_MAX) {
    throw new Error("vault record with an unexpected cost");
  }
  const base = await crypto.subtle.importKey("raw", encoder.encode(password.normalize("NFC")), "PBKDF2", false, [
    "deriveKey",
  ]);
  return crypto.subtle.deriveKey(
    { name: "PBKDF2", hash: "SHA-256", salt, iterations },
    base,
    { name: "AES-GCM", length: 256 },
    false,
    ["wrapKey", "unwrapKey"],
  );
}

/** The vault key wrapped under the password, as the broker stores it (docs/protocol.md 15.21). */
export async function wrapVaultKey(vaultKey, password, therapist) {
  const salt = crypto.getRandomValues(new Uint8Array(16));
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const kek = await passwordKey(password, salt, ITERATIONS);
  const params = { name: "AES-GCM", iv, additionalData: joined("broker vault key v1", "password", therapist) };
  const wrapped = new Uint8Array(await crypto.subtle.wrapKey("raw", vaultKey, kek, params));
  const blob = new Uint8Array(iv.length + wrapped.length);
  blob.set(iv);
  blob.set(wrapped, iv.length);
  return { v: 1, kdf: "pbkdf2-sha256", iterations: ITERATIONS, salt: b64urlEncode(salt), wrapped: b64urlEncode(blob) };
}

/** The vault key from its wrapped form and the password; throws when the password does not open it. */
export async function unwrapVaultKey(record, password, therapist, { extractable = false } = {}) {
  if (!record || record.v !== 1 || record.kdf !== "pbkdf2-sha256") throw new Error("unknown vault record");
  const kek = await passwordKey(password, b64urlDecode(record.salt), record.iterations);
  const blob = b64urlDecode(record.wrapped);
  const params = {
    name: "AES-GCM",
    iv: blob.slice(0, 12),
    additionalData: joined("broker vault key v1", "password", therapist),
  };
  return crypto.subtle.unwrapKey("raw", blob.slice(12), kek, params, { name: "AES-GCM" }, extractable, [
    "encrypt",
    "decrypt",
  ]);
}

function newVaultKey() {
  return crypto.subtle.generateKey({ name: "AES-GCM", length: 256 }, true, ["encrypt", "decrypt"]);
}

function itemData(therapist, session, slot) {
  return joined("broker vault item v1", therapist, session, slot);
}

export async function sealItem(key, therapist, session, slot, value) {
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const params = { name: "AES-GCM", iv, additionalData: itemData(therapist, session, slot) };
  const sealed = new Uint8Array(await crypto.subtle.encrypt(params, key, encoder.encode(JSON.stringify(value))));
  const blob = new Uint8Array(iv.length + sealed.length);
  blob.set(iv);
  blob.set(sealed, iv.length);
  return b64urlEncode(blob);
}

export async function openItem(key, therapist, session, slot, text) {
  const blob = b64urlDecode(text);
  const params = { name: "AES-GCM", iv: blob.slice(0, 12), additionalData: itemData(therapist, session, slot) };
  return JSON.parse(decoder.decode(await crypto.subtle.decrypt(params, key, blob.slice(12))));
}

// ---------------------------------------------------------------- the key on this device (IndexedDB)

function keysTx(mode, work) {
  return storeTx("broker-vault", "keys", "therapist", mode, work);
}

async function keepKey(therapist, key) {
  await keysTx("readwrite", (store) => store.put({ therapist, key }));
}

async function keptKey(therapist) {
  const record = await keysTx("readonly", (store) => store.get(therapist));
  return record?.key instanceof CryptoKey ? record.key : null;
}

/** Forget the vault key on this device (at logout). */
export async function forgetVaultKey() {
  await keysTx("readwrite", (store) => store.clear());
}

/** Non-extractable copy of a vault key, as kept on a device. */
async function deviceCopy(key) {
  const raw = await crypto.subtle.exportKey("raw", key);
  return crypto.subtle.importKey("raw", raw, { name: "AES-GCM" }, false, ["encrypt", "decrypt"]);
}

async function post(path, body, csrf) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw Object.assign(new Error(apiMessage(data, "dashboard.request_failed")), { data });
  return data;
}

/**
 * Open (or, the first time, make) the vault with the password just typed: called by the login
 * page after a successful login, before it leaves. Nothing new is sent to the broker but the
 * wrapped key of a new vault. Returns "opened", "created" or "locked".
 */
export async function openVaultWithPassword(password, therapist, csrf) {
  const response = await fetch("/api/vault", { credentials: "same-origin" });
  if (!response.ok) return "locked";
  const { vault } = await response.json();
  if (vault) {
    await keepKey(therapist, await unwrapVaultKey(vault, password, therapist));
    return "opened";
  }
  const key = await newVaultKey();
  await post("/api/vault", await wrapVaultKey(key, password, therapist), csrf);
  await keepKey(therapist, await deviceCopy(key));
  return "created";
}

// ---------------------------------------------------------------- the dashboard's labels

const vault = {
  api: null,
  therapist: "",
  key: null,
  record: null,
  labels: new Map(), // "session/slot" -> { label, note }
  unreadable: 0,
  drafts: new Map(),
  setCsrf: () => {},
  redraw: () => {},
};

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "onclick") node.addEventListener("click", value);
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of [].concat(children)) if (child) node.append(child);
  return node;
}

function field(id, text, input) {
  input.id = id;
  return el("div", { className: "field" }, [el("label", { for: id, text }), input]);
}

function panel() {
  const state = el("p", { id: "vault-state", className: "hint" });
  const lost = el("p", { id: "vault-lost", className: "warn", role: "alert", hidden: true });
  const unlock = el("form", { id: "vault-unlock", hidden: true, novalidate: true }, [
    field("vault-password", t("reauth.password"), el("input", { type: "password", autocomplete: "current-password" })),
    el("button", { type: "submit", text: t("vault.unlock") }),
  ]);
  unlock.addEventListener("submit", onUnlock);
  const change = el("form", { id: "password-form", novalidate: true }, [
    el("p", {
      className: "hint",
      text: t("vault.change_hint"),
    }),
    field("current-password", t("vault.current_password"), el("input", { type: "password", autocomplete: "current-password" })),
    field("new-password", t("vault.new_password"), el("input", { type: "password", autocomplete: "new-password" })),
    el("button", { type: "submit", id: "password-submit", text: t("vault.change_password") }),
    el("p", { id: "password-result", role: "status" }),
  ]);
  change.addEventListener("submit", onChangePassword);
  return el("section", { id: "vault", className: "card", "aria-labelledby": "vault-title" }, [
    el("h2", { id: "vault-title", text: t("vault.title") }),
    state,
    lost,
    unlock,
    el("details", { id: "password-change" }, [el("summary", { text: t("vault.change_summary") }), change]),
  ]);
}

function showState() {
  const state = document.getElementById("vault-state");
  if (!state) return;
  document.getElementById("vault-unlock").hidden = Boolean(vault.key);
  state.textContent = t(vault.key ? "vault.sealed" : "vault.locked");
  const lost = document.getElementById("vault-lost");
  lost.hidden = vault.unreadable === 0;
  lost.textContent = vault.unreadable ? t("vault.lost") : "";
}

/** Put the vault's panel on the dashboard and take the key kept on this device, if any. */
export async function initVault({ api, therapist, setCsrf, redraw }) {
  Object.assign(vault, { api, therapist, setCsrf, redraw });
  vault.key = await keptKey(therapist).catch(() => null);
  const problem = document.getElementById("problem");
  problem.after(panel());
  showState();
}

async function onUnlock(event) {
  event.preventDefault();
  const input = document.getElementById("vault-password");
  try {
    const { vault: record } = await vault.api("/api/vault");
    if (record) {
      vault.key = await unwrapVaultKey(record, input.value, vault.therapist);
    } else {
      const key = await newVaultKey();
      await vault.api("/api/vault", { body: await wrapVaultKey(key, input.value, vault.therapist) });
      vault.key = await deviceCopy(key);
    }
    await keepKey(vault.therapist, vault.key);
    input.value = "";
    input.removeAttribute("aria-invalid");
    showState();
    await vault.redraw();
  } catch (err) {
    if (err?.data) return;
    input.setAttribute("aria-invalid", "true");
    document.getElementById("vault-state").textContent = t("vault.wrong_password");
  }
}

async function onChangePassword(event) {
  event.preventDefault();
  const current = document.getElementById("current-password");
  const next = document.getElementById("new-password");
  const result = document.getElementById("password-result");
  const submit = document.getElementById("password-submit");
  result.textContent = "";
  if (!current.value || !next.value) {
    result.textContent = t("vault.enter_both");
    return;
  }
  submit.disabled = true;
  try {
    const { vault: record } = await vault.api("/api/vault");
    const body = { password: current.value, new_password: next.value };
    if (record) {
      let key;
      try {
        key = await unwrapVaultKey(record, current.value, vault.therapist, { extractable: true });
      } catch {
        result.textContent = t("vault.current_wrong");
        return;
      }
      body.vault = await wrapVaultKey(key, next.value, vault.therapist);
    }
    const data = await vault.api("/api/password", { body });
    vault.setCsrf(data.csrf);
    current.value = "";
    next.value = "";
    result.textContent = t("vault.changed");
  } catch (err) {
    result.textContent = err.message;
  } finally {
    submit.disabled = false;
  }
}

/**
 * Read the sealed items of the listed sessions: labels for the cards, and each session secret
 * (restored into this device's link keys when missing here, sealed into the vault when only here).
 */
export async function syncVault(sessions, keys, { background = false } = {}) {
  if (!vault.key) return;
  const data = await vault.api("/api/vault", { background });
  const labels = new Map();
  let unreadable = 0;
  for (const session of sessions) {
    const sid = session.session;
    const items = data.items?.[sid] ?? {};
    let secretOpened = false;
    for (const [slot, sealed] of Object.entries(items)) {
      try {
        const value = await openItem(vault.key, vault.therapist, sid, slot, sealed);
        if (slot !== "secret") {
          labels.set(`${sid}/${slot}`, { label: String(value.label ?? ""), note: String(value.note ?? "") });
        } else if (LINK_KEY_RE.test(value.key)) {
          secretOpened = true;
          if ((await keys.loadLinkKey(sid).catch(() => null)) !== value.key) {
            await keys.saveLinkKey(sid, value.key, session.expires, typeof value.group === "string" ? value.group : null);
          }
        }
      } catch {
        unreadable += 1;
      }
    }
    // None yet, or one sealed under a vault key lost to a password reset: this device's copy goes in.
    if (!secretOpened) {
      const local = await keys.loadLinkKey(sid).catch(() => null);
      if (local) await storeSecret(sid, local, await keys.loadGroupToken(sid).catch(() => null));
    }
  }
  // Sessions no longer open (the history's): their labels only, for the history's cards.
  const open = new Set(sessions.map((s) => s.session));
  for (const [sid, items] of Object.entries(data.items ?? {})) {
    if (open.has(sid)) continue;
    for (const [slot, sealed] of Object.entries(items)) {
      if (slot === "secret") continue;
      try {
        const value = await openItem(vault.key, vault.therapist, sid, slot, sealed);
        labels.set(`${sid}/${slot}`, { label: String(value.label ?? ""), note: String(value.note ?? "") });
      } catch {
        unreadable += 1;
      }
    }
  }
  vault.labels = labels;
  vault.unreadable = unreadable;
  showState();
}

/** The label the therapist gave a session ("session") or a seat (its peer id), or "" (vault locked, none). */
export function labelOf(session, slot) {
  return vault.key ? (vault.labels.get(`${session}/${slot}`)?.label ?? "") : "";
}

/** Seal a session's secret (and group token) into the vault, so the therapist's other devices have it. */
export async function storeSecret(session, key, group = null) {
  if (!vault.key) return;
  const sealed = await sealItem(vault.key, vault.therapist, session, "secret", { key, group });
  await vault.api("/api/vault/items", { body: { session, slot: "secret", sealed } });
}

/** The label and note of a session ("session") or a client seat (its peer id), editable. */
export function labelBlock(session, slot, name) {
  const box = el("div", { className: "vault-label", "data-slot": slot });
  if (!vault.key) return box;
  const id = `${session}/${slot}`;
  const current = vault.labels.get(id) ?? { label: "", note: "" };
  const draft = vault.drafts.get(id);
  if (current.label) box.append(el("p", { className: "label-text", text: current.label }));
  if (current.note) box.append(el("p", { className: "label-note", text: current.note }));
  const labelInput = el("input", { type: "text", className: "label-input", maxlength: LABEL_MAX });
  const noteInput = el("textarea", { className: "note-input", maxlength: NOTE_MAX, rows: 2 });
  labelInput.value = draft?.label ?? current.label;
  noteInput.value = draft?.note ?? current.note;
  const key = slot.replace(/[^A-Za-z0-9_-]/g, "");
  const form = el("form", { className: "label-form", hidden: !draft, novalidate: true }, [
    field(`label-${session}-${key}`, t("vault.label_for", { name }), labelInput),
    field(`note-${session}-${key}`, t("vault.note_for", { name }), noteInput),
    el("button", { type: "submit", className: "save-label", text: t("vault.save_label") }),
    el("button", {
      type: "button",
      className: "cancel-label",
      text: t("reauth.cancel"),
      onclick: () => {
        vault.drafts.delete(id);
        form.hidden = true;
        edit.hidden = false;
        edit.focus();
      },
    }),
  ]);
  const keepDraft = () => vault.drafts.set(id, { label: labelInput.value, note: noteInput.value });
  labelInput.addEventListener("input", keepDraft);
  noteInput.addEventListener("input", keepDraft);
  const edit = el("button", {
    type: "button",
    className: "edit-label link",
    hidden: Boolean(draft),
    "aria-label": t(current.label ? "vault.edit_label_for" : "vault.add_label_for", { name }),
    text: t(current.label ? "vault.edit_label" : "vault.add_label"),
    onclick: () => {
      keepDraft();
      form.hidden = false;
      edit.hidden = true;
      labelInput.focus();
    },
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = { label: labelInput.value.trim().slice(0, LABEL_MAX), note: noteInput.value.trim().slice(0, NOTE_MAX) };
    try {
      const sealed =
        value.label || value.note ? await sealItem(vault.key, vault.therapist, session, slot, value) : null;
      await vault.api("/api/vault/items", { body: { session, slot, sealed } });
      vault.labels.set(id, value);
      vault.drafts.delete(id);
      const fresh = labelBlock(session, slot, name);
      box.replaceWith(fresh);
      fresh.querySelector(".edit-label")?.focus();
    } catch (err) {
      if (err?.message) form.append(el("p", { className: "error", role: "alert", text: err.message }));
    }
  });
  box.append(edit, form);
  return box;
}
