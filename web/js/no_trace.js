// Leave no trace on the client's device (docs/security.md, "The client's device and the person
// in the room").
//
// The join page uses no localStorage, IndexedDB, Cache Storage or service worker (the broker's
// CSP forbids workers). What it keeps, it keeps in this tab's sessionStorage, only so that a
// reload finds its way back: the invite token (read here) and the link key (join.js). As soon as
// the page has read the token, its address becomes JOIN_PATH, in the address bar and in the
// tab's history (the fragment is already gone: e2ee.js). A reload of JOIN_PATH uses what the tab
// kept; any other way of arriving there (a history entry opened again, a tab the browser
// reopened after it was closed, Back from another site) forgets it and shows a plain notice.
// The quick exit, a leave and the session's end forget it too.

import { tokenFromPath } from "./protocol.js";

/** The join page's address once it has read its link (the broker serves the join page there too). */
export const JOIN_PATH = "/j";
/** The checklist item (by id) next to which the page says what it can tell about this browser. */
export const PRIVATE_WINDOW_ITEM = "private_window";

const KEPT_TOKEN = "tt.invite-token";

/** How this document was reached: "navigate", "reload", "back_forward" (or "navigate" if unknown). */
function navigationType() {
  return performance.getEntriesByType?.("navigation")?.[0]?.type ?? "navigate";
}

/**
 * The invite token of this page, and the address moved to JOIN_PATH at once: from a /j/<token>
 * path, or on a reload of JOIN_PATH from what this tab kept. Null when neither (what the tab kept
 * is then forgotten). Read the link key from the fragment before calling this.
 */
export function takeInviteToken() {
  const fromPath = tokenFromPath();
  if (fromPath) {
    history.replaceState(null, "", JOIN_PATH + languageQuery());
    keepInviteToken(fromPath);
    return fromPath;
  }
  const kept = sessionStorage.getItem(KEPT_TOKEN);
  if (kept && location.pathname === JOIN_PATH && navigationType() === "reload") return kept;
  forgetKeptLink();
  return null;
}

/**
 * The link's language tag (?lang=es), kept on JOIN_PATH so that a reload starts in it: a language
 * is all it says (i18n.js). Anything else in the query goes.
 */
function languageQuery() {
  const tag = new URLSearchParams(location.search).get("lang");
  return tag && /^[a-z]{2,3}(-[A-Z][a-z]{3})?(-([A-Z]{2}|[0-9]{3}))?$/.test(tag) ? `?lang=${tag}` : "";
}

/** What a reload should join with from now on: a group link's join names the seat's own token. */
export function keepInviteToken(token) {
  sessionStorage.setItem(KEPT_TOKEN, token);
}

/** Forget everything this tab kept for a reload (the invite token, the link key). */
export function forgetKeptLink() {
  try {
    sessionStorage.clear();
  } catch {
    /* storage turned off: nothing was kept */
  }
}

/**
 * Make a field the client types into forgettable: no autofill and no form history (and a fresh
 * random name each time, so an entry a browser saved anyway is never offered under it again), no
 * online spelling service, no autocorrect dictionary, and the opt-out some password managers honour.
 */
export function shieldField(field) {
  field.setAttribute("autocomplete", "off");
  field.setAttribute("name", `f${crypto.getRandomValues(new Uint32Array(2)).join("")}`);
  field.setAttribute("spellcheck", "false");
  field.setAttribute("autocorrect", "off");
  field.setAttribute("data-1p-ignore", "");
  field.setAttribute("data-lpignore", "true");
}

/** shieldField for every text field and text area under `root`. */
export function shieldFields(root = document) {
  for (const field of root.querySelectorAll("textarea, input:not([type]), input[type=text]")) shieldField(field);
}

/**
 * What the page can tell about this browser (as a catalogue key: i18n.js), said without promising more: it cannot tell a
 * private window for sure (browsers hide it on purpose), but it can tell when this site's data is
 * marked to be kept for good (navigator.storage.persisted()). `remembered`: the client asked this
 * browser to remember how they join (media_mode.js), the one thing it then keeps.
 */
export async function storageNote({ remembered = false } = {}) {
  let persisted = null;
  try {
    persisted = (await navigator.storage?.persisted?.()) ?? null;
  } catch {
    persisted = null;
  }
  if (persisted === true) return "storage.persisted";
  return remembered ? "storage.remembered" : "storage.not_persisted";
}
