// The quick exit: "Leave now" at the top of every client screen, or Esc pressed twice.
//
// In one step, well under half a second: the page goes blank, every camera and microphone track
// stops, the goodbyes registered with onQuickExit run (for example "left quickly", sent end to
// end to the therapist while the connection is still there), the page's own teardown closes its
// peer connections and its WebSocket after an ordinary `leave` (docs/protocol.md section 5), what
// the tab kept is forgotten, and location.replace swaps the page for the neutral one (the
// practice's choice, or the broker's own), so Back does not return to the session. Each waiting
// step has a budget: nothing can hold the exit up. docs/security.md, "The client's device and
// the person in the room".

import { stopAllMedia } from "./devices.js";
import { forgetKeptLink } from "./no_trace.js";

/** The broker's exit address: the practice's page (303) or a neutral one of its own. */
export const EXIT_PATH = "/today";
/** How long the goodbyes registered with onQuickExit may take, all together. */
export const GOODBYE_BUDGET_MS = 150;
/** How long the page's teardown may wait (for the broker to close the connection after `leave`). */
export const TEARDOWN_BUDGET_MS = 150;
/** Two presses of Esc this close together are the quick exit. */
export const ESC_TWICE_MS = 1000;

const goodbyes = new Set();
let pageTeardown = null;
let leaving = false;

/**
 * Run `callback` (it may return a promise) when the quick exit starts, after the tracks stopped
 * and before anything is closed. Goodbyes run together and are waited for GOODBYE_BUDGET_MS at
 * most; one that throws or takes longer does not hold the exit up. Returns a function that
 * unregisters it.
 */
export function onQuickExit(callback) {
  goodbyes.add(callback);
  return () => goodbyes.delete(callback);
}

/**
 * Wire the page's "Leave now" controls (any element with data-quick-exit; a link to EXIT_PATH, so
 * it still leaves without this script) and Esc pressed twice. `teardown` closes what the page holds
 * (peer connections, the signaling connection after its `leave`); it may return a promise.
 */
export function installQuickExit(teardown = null) {
  pageTeardown = teardown;
  for (const control of document.querySelectorAll("[data-quick-exit]")) {
    control.addEventListener("click", (event) => {
      event.preventDefault();
      quickExit();
    });
  }
  let lastEsc = -Infinity;
  document.addEventListener(
    "keydown",
    (event) => {
      if (event.key !== "Escape" || event.repeat) return;
      if (event.timeStamp - lastEsc <= ESC_TWICE_MS) quickExit();
      lastEsc = event.timeStamp;
    },
    true,
  );
}

/** Leave now: see the top of this file. Safe to call more than once (the first call wins). */
export async function quickExit() {
  if (leaving) return;
  leaving = true;
  document.documentElement.dataset.leaving = "yes"; // the stylesheet blanks the page at once
  try {
    stopAllMedia();
    await within(Promise.allSettled([...goodbyes].map((fn) => Promise.resolve().then(fn))), GOODBYE_BUDGET_MS);
    await within(Promise.resolve().then(() => pageTeardown?.()), TEARDOWN_BUDGET_MS);
  } catch (err) {
    console.warn(`event=quick_exit_step_failed name=${err?.name ?? "error"}`);
  } finally {
    stopAllMedia(); // anything a goodbye or the teardown opened meanwhile
    forgetKeptLink();
    location.replace(EXIT_PATH);
  }
}

/** `promise`, or nothing after `ms`: whichever comes first (a rejection counts as done). */
function within(promise, ms) {
  let timer;
  const late = new Promise((resolve) => {
    timer = setTimeout(resolve, ms);
  });
  return Promise.race([promise.catch(() => undefined), late]).finally(() => clearTimeout(timer));
}
