// The discreet "I can't talk freely" signal and "left quickly" (issue 29; docs/protocol.md 7.5).
//
// The client's side: a control that does not look like an alarm (its place and words are the
// practice's choice, joined.policy.safety; by default an item of the call's "More" menu), and the
// client's code word typed alone as a chat message, each send the therapist
// {"t": "safety", "reason": ..., "plan": <sealed plan>} over their pair's own data channel,
// encrypted end to end: the broker relays nothing, so nothing of it is in any broker log or
// audit entry. Nothing on the client's screen changes: the menu closes as after any item, and a
// code word sent in chat shows in the client's chat as every message does, but reaches the
// therapist only (never the other clients of a couple, family or group). On the quick exit,
// sendLeftQuickly() tells the therapist "left quickly" the same way before the page goes.
//
// The therapist's side: a quiet notice on the therapist's own screen ("Sam may not be able to talk
// freely", "Sam left quickly"), with that client's safety plan opened with its seat key, and the
// plan again when that client's connection drops.

import { language, show, showAttribute } from "./i18n.js";
import { isCodeWord, keptPlan, planList, showSignalLabel } from "./safety_plan.js";
import { announce, el, fill } from "./ui.js";

/** The reasons a safety message gives (docs/protocol.md 7.5). */
export const SAFETY_REASONS = Object.freeze(["signal", "code_word", "left_quickly"]);
const RETRY_MS = 1000;
const RETRY_FOR_MS = 30000;
/** How long sendLeftQuickly() waits at most for its message to leave the page. */
const FLUSH_MS = 150;

// ==================================================================== the client's side

let current = null; // the client's Call while it lasts

function therapistOf(call) {
  return call.peers().find((peer) => call.describe(peer).role === "therapist") ?? null;
}

function safetyMessage(reason) {
  return { t: "safety", reason, plan: keptPlan().sealed };
}

/** Send to the therapist now, or as soon as its channel is open again (up to 30 s). Shows nothing. */
function deliver(call, reason) {
  const attempt = () => {
    if (call !== current) return true; // that call is over
    const therapist = therapistOf(call);
    return therapist !== null && call.sendMessage(therapist, safetyMessage(reason));
  };
  if (attempt()) return;
  const started = Date.now();
  const timer = setInterval(() => {
    if (attempt() || Date.now() - started > RETRY_FOR_MS) clearInterval(timer);
  }, RETRY_MS);
}

/**
 * The client's call: the signal's control for the call's control bar (CallView `extraControls`)
 * and the chat's sender (CallView `sendChat`), which keeps a code word away from other clients.
 */
export function clientSafety(call, safety) {
  current = call;
  return { controls: signalControls(call, safety ?? {}), sendChat: (text) => sendChat(call, text) };
}

/** Forget the call (the page is done with it). */
export function endClientSafety() {
  current = null;
}

/**
 * Tell the therapist this client used the quick exit, before the page closes its connections;
 * resolves once the message has left the page (or after 150 ms at most). False if it could not go
 * (no call, no open channel to the therapist): the therapist then sees an ordinary leave.
 */
export async function sendLeftQuickly() {
  const call = current;
  const therapist = call ? therapistOf(call) : null;
  if (!therapist || !call.sendMessage(therapist, safetyMessage("left_quickly"))) return false;
  const until = Date.now() + FLUSH_MS;
  while (call.unsent(therapist) > 0 && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 5));
  return true;
}

/** As Call.sendChat, except that the code word, typed alone, goes to the therapist only, with the signal. */
function sendChat(call, text) {
  if (!isCodeWord(text, keptPlan().codeWord)) return call.sendChat(text);
  const therapist = therapistOf(call);
  if (therapist) call.sendMessage(therapist, { t: "chat", text: String(text).trim().slice(0, call.maxChatChars) });
  deliver(call, "code_word");
  return call.canChat ? 1 : 0; // what the client's screen shows is what any message shows
}

function signalControls(call, safety) {
  const place = safety.signal_place ?? "menu";
  if (place === "none") return [];
  const send = () => deliver(call, "signal");
  if (place === "controls") {
    const button = el("button", { type: "button", "data-testid": "safety-signal" }, [
      el("span", { className: "icon icon-report", "aria-hidden": "true" }),
      showSignalLabel(el("span", { className: "label" }), safety),
    ]);
    button.addEventListener("click", send);
    return [button];
  }
  return [callMenu(safety, send)];
}

/** The call's "More" menu, with the signal as its item. */
function callMenu(safety, send) {
  const item = showSignalLabel(el("button", { type: "button", role: "menuitem", "data-testid": "safety-signal" }), safety);
  const list = el("div", { className: "menu-list", role: "menu", id: "call-menu", hidden: true }, [item]);
  showAttribute(list, "aria-label", "safety.more");
  const button = el(
    "button",
    { type: "button", "aria-haspopup": "menu", "aria-expanded": "false", "aria-controls": "call-menu", "data-testid": "call-menu" },
    [el("span", { className: "icon icon-more", "aria-hidden": "true" }), show(el("span", { className: "label" }), "safety.more")],
  );
  const wrap = el("div", { className: "call-menu" }, [button, list]);
  const setOpen = (open) => {
    list.hidden = !open;
    button.setAttribute("aria-expanded", open ? "true" : "false");
  };
  button.addEventListener("click", () => {
    setOpen(list.hidden);
    if (!list.hidden) item.focus();
  });
  item.addEventListener("click", () => {
    send();
    setOpen(false);
    button.focus();
  });
  wrap.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !list.hidden) {
      setOpen(false);
      button.focus();
    }
  });
  wrap.addEventListener("focusout", (event) => {
    if (!wrap.contains(event.relatedTarget)) setOpen(false);
  });
  return wrap;
}

// ==================================================================== the therapist's side

// Each notice's words: safety.notice.<reason>.title (with the client's {name}) and .line, in the catalogue.

/**
 * The therapist's notices. `labelFor(peer)` names a client; `plans` is the page's SealedPlans
 * (safety_plan.js); `root` the notices' container, on the therapist's screen only.
 */
export class TherapistSafety {
  #call;
  #labelFor;
  #plans;
  #root;
  #notices = new Map(); // peer -> {node, reason}
  #seats = new Map(); // peer -> {state, connected} as the waiting room last said
  #leftQuickly = new Set();
  #off;

  constructor(call, { labelFor, plans, root }) {
    this.#call = call;
    this.#labelFor = labelFor;
    this.#plans = plans;
    this.#root = root;
    this.#off = call.on("message", ({ peer, role, message }) => this.#onMessage(peer, role, message));
  }

  #onMessage(peer, role, message) {
    if (message.t !== "safety" || role !== "client" || !SAFETY_REASONS.includes(message.reason)) return;
    if (message.reason === "left_quickly") this.#leftQuickly.add(peer);
    const sealed = typeof message.plan === "string" ? message.plan : null;
    this.#show(peer, message.reason, sealed);
  }

  /** The waiting room changed: an admitted client whose connection dropped gets their plan shown again. */
  seatsChanged(seats) {
    for (const seat of seats) {
      const before = this.#seats.get(seat.peer);
      this.#seats.set(seat.peer, { state: seat.state, connected: seat.connected });
      const dropped = before?.state === "admitted" && before.connected && seat.state === "admitted" && !seat.connected;
      if (dropped && !this.#leftQuickly.has(seat.peer) && this.#plans.get(seat.peer)) this.#show(seat.peer, "dropped", null);
      if (seat.connected && this.#notices.get(seat.peer)?.reason === "dropped") this.#dismiss(seat.peer);
      if (seat.connected && seat.state !== "left") this.#leftQuickly.delete(seat.peer);
    }
  }

  async #show(peer, reason, sealed) {
    const who = this.#labelFor(peer);
    const title = show(el("strong"), `safety.notice.${reason}.title`, { name: who });
    const line = show(el("span"), `safety.notice.${reason}.line`);
    const plan = show(el("div", { className: "plan" }), "safety.opening_plan");
    const dismiss = show(el("button", { type: "button", className: "quiet small" }), "safety.dismiss");
    const node = el("div", { className: "safety-notice", dataset: { peer, reason }, "data-testid": "safety-notice" }, [
      el("p", {}, [title, " ", line, " ", el("span", { className: "hint", text: timeNow() })]),
      plan,
      dismiss,
    ]);
    dismiss.addEventListener("click", () => this.#dismiss(peer));
    this.#notices.get(peer)?.node.remove();
    this.#notices.set(peer, { node, reason });
    this.#root.prepend(node);
    this.#root.hidden = false;
    announce(title.textContent);
    fill(plan, await this.#planFor(peer, sealed));
  }

  /** The plan the message carried (it opens only for this seat), else the one from the checklist. */
  async #planFor(peer, sealed) {
    const fromChecklist = this.#plans.get(peer);
    for (const candidate of [sealed, fromChecklist?.sealed]) {
      if (!candidate) continue;
      try {
        return planList(await this.#plans.open(peer, candidate));
      } catch (err) {
        if (err.message === "sealed with the link key") {
          return show(el("p", { className: "hint" }), "safety.plan_sealed");
        }
      }
    }
    if (sealed || fromChecklist) return show(el("p", { className: "warn" }), "safety.plan_not_opened");
    return show(el("p", { className: "hint" }), "safety.no_plan");
  }

  #dismiss(peer) {
    this.#notices.get(peer)?.node.remove();
    this.#notices.delete(peer);
    this.#root.hidden = this.#notices.size === 0;
  }

  clear() {
    this.#off();
    for (const peer of [...this.#notices.keys()]) this.#dismiss(peer);
    this.#seats.clear();
  }
}

function timeNow() {
  return `(${new Date().toLocaleTimeString(language(), { hour: "2-digit", minute: "2-digit" })})`;
}
