// Small DOM helpers shared by the screens: build elements without innerHTML,
// switch screens with focus moved to the new heading, and announce status
// changes to screen readers through one aria-live region.

import { t } from "./i18n.js";

/** The element with this id; throws if the page lacks it (a wiring bug, not a user error). */
export function byId(id) {
  const found = document.getElementById(id);
  if (!found) throw new Error(`missing element #${id}`);
  return found;
}

/**
 * Create an element. attrs: plain attributes, plus `text` (textContent),
 * `on` ({event: handler}), `dataset` ({key: value}), booleans set or omit the attribute.
 */
export function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of [].concat(children)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace all children of a node. */
export function fill(node, children) {
  node.replaceChildren(...[].concat(children).filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

/**
 * Like fill, for a list keyed by `data-key` attribute `key`: a child whose new rendering is the same
 * as what is shown stays the very element (a button keeps its listeners, its focus, and a click on
 * it in progress), and nothing is touched when every child stayed.
 */
export function fillKeyed(node, children, key) {
  const shown = new Map([...node.children].map((c) => [c.getAttribute(key), c]));
  const next = [].concat(children).filter((c) => c !== null && c !== undefined && c !== false);
  const kept = next.map((c) => {
    const old = shown.get(c.getAttribute(key));
    return old?.isEqualNode(c) ? old : c;
  });
  const same = kept.length === node.children.length && kept.every((c, i) => node.children[i] === c);
  if (!same) node.replaceChildren(...kept);
  return node;
}

export function setText(idOrNode, text) {
  const node = typeof idOrNode === "string" ? byId(idOrNode) : idOrNode;
  node.textContent = text;
  return node;
}

/**
 * Show one screen (a <section class="screen">) and hide the others. The
 * screen's first heading gets focus so keyboard and screen-reader users land
 * on the new content; the document title follows (except on the client's pages).
 */
export function showScreen(id, { focus = true } = {}) {
  const target = byId(id);
  for (const screen of document.querySelectorAll(".screen")) screen.hidden = screen !== target;
  document.body.dataset.screen = id.replace(/^screen-/, "");
  const heading = target.querySelector("h1, h2");
  if (heading) {
    if (!heading.hasAttribute("tabindex")) heading.setAttribute("tabindex", "-1");
    // The client's pages keep their neutral title (body data-fixed-title): the tab and the
    // browser's history show it to whoever uses the device next.
    if (!("fixedTitle" in document.body.dataset)) document.title = t("page.screen_title", { heading: heading.textContent.trim() });
    if (focus) heading.focus({ preventScroll: false });
  }
  return target;
}

let politeTimer = null;

/** Say something to screen-reader users (and keep it in the visible caption line if the page has one). */
export function announce(text, { urgent = false } = {}) {
  const region = document.getElementById(urgent ? "announcer-urgent" : "announcer");
  if (!region) return;
  // Clearing first makes repeated identical messages be read again.
  region.textContent = "";
  clearTimeout(politeTimer);
  politeTimer = setTimeout(() => {
    region.textContent = text;
  }, 50);
}

/** A toggle button's pressed state and label, kept in sync. */
export function setPressed(button, pressed, label) {
  button.setAttribute("aria-pressed", pressed ? "true" : "false");
  if (label) {
    const span = button.querySelector(".label");
    (span ?? button).textContent = label;
  }
}

/**
 * Ask a yes/no question in a modal <dialog>; resolves true when confirmed.
 * Uses the dialog already in the page (id) so no markup is built from strings.
 */
export function confirmDialog(id) {
  const dialog = byId(id);
  return new Promise((resolve) => {
    const done = (value) => {
      dialog.removeEventListener("close", onClose);
      resolve(value);
    };
    const onClose = () => done(dialog.returnValue === "confirm");
    dialog.addEventListener("close", onClose);
    dialog.returnValue = "";
    dialog.showModal();
  });
}

/** Appointment time in the person's time zone, in `locale` (the page's language; default: the browser's). */
export function formatTime(unixSeconds, { withDate = true, locale = undefined } = {}) {
  const date = new Date(unixSeconds * 1000);
  const options = withDate
    ? { weekday: "long", day: "numeric", month: "long", hour: "numeric", minute: "2-digit" }
    : { hour: "numeric", minute: "2-digit" };
  return new Intl.DateTimeFormat(locale, options).format(date);
}

/** Wait a little; used for gentle retries, never for correctness. */
export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
