// The shared whiteboard (issue 34; docs/protocol.md 7.11): pen, text, eraser, undo and clear,
// carried over the pairs' data channels only, never through the broker.
//
// The therapist's page holds the board. It opens it for every client not on hold, sends each the
// whole board ({"t": "board", "op": "reset"} and then every item) when it opens it, when that
// client's connection is new and when its hold ends, and every change as it happens. A client
// draws only while the therapist allows it (call_tools.js) and sends its changes to the
// therapist's page alone, which checks the permission and passes them on to the other clients
// with `by` (whose item it is). A client takes board messages only from the therapist. Nothing
// goes to a held client (7.9). Nothing is kept: closing the board or the page forgets it; the
// therapist may save a picture of it on their own device (a PNG download made in the page).

import { show, showAttribute, t } from "./i18n.js";
import { announce, el, setPressed } from "./ui.js";

/** Coordinates on the wire run from 0 to SCALE across the board (whatever its size on screen). */
export const SCALE = 10000;
const WIDTH = 1200;
const HEIGHT = 750;
/** Points (x, y pairs) at most in one message, so it stays far below the channel's 8192 bytes. */
const POINTS_PER_MESSAGE = 300;
const MAX_ITEMS = 2000;
const MAX_ITEM_POINTS = 20000;
export const MAX_TEXT = 200;
/** How often a stroke being drawn is sent: the others see it grow as it is drawn. */
const FLUSH_MS = 40;
const ID = /^[a-z0-9]{1,16}$/;
const MAX_PEER = 64;
const TOOLS = ["pen", "eraser"];
const INK = "#1b2b30";
const WIDTHS = { pen: 4, eraser: 30 };

function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function coordinate(value) {
  return Number.isInteger(value) && value >= 0 && value <= SCALE;
}

export class Whiteboard {
  #call;
  #therapist;
  #permissions;
  #open = false;
  #items = new Map(); // "<author>/<id>" -> {author, id, kind, tool, pts, x, y, text}
  #mine = []; // ids of this page's items, newest last (for undo)
  #tool = "pen";
  #stroke = null; // the stroke being drawn here: {id, pending: [x, y, ...]}
  #flushTimer = 0;
  #synced = new Map(); // the therapist's side: client -> the connection it has the whole board on
  #frame = 0;
  #off = [];

  constructor(call, { therapist, permissions }) {
    this.#call = call;
    this.#therapist = therapist;
    this.#permissions = permissions;
    this.els = this.#build();
    const on = (type, fn) => this.#off.push(call.on(type, fn));
    on("peer", ({ peer }) => this.#syncPeer(peer));
    on("held", ({ peer, held }) => {
      if (held) this.#synced.delete(peer);
      this.#syncPeer(peer);
      // A client back from its hold asks for the board: what the therapist's page sent as it released
      // it may have arrived before this page knew it was back, and been dropped as a held peer's.
      if (!this.#therapist && !held && call.describe(peer).role === "therapist") {
        call.sendMessage(peer, { t: "board", op: "sync" });
      }
    });
    on("left", ({ peer }) => this.#synced.delete(peer));
    on("message", ({ peer, role, message }) => {
      if (message.t === "board") this.#onMessage(peer, role, message);
    });
    this.#off.push(permissions.onChange(() => this.#renderTools()));
    this.#renderTools();
  }

  /** Whether the board is open on this page. */
  get open() {
    return this.#open;
  }

  #build() {
    const button = el("button", { type: "button", "aria-pressed": "false", "data-testid": "toggle-whiteboard" }, [
      el("span", { className: "icon icon-board", "aria-hidden": "true" }),
      show(el("span", { className: "label" }), "tools.board.open"),
    ]);
    button.hidden = !this.#therapist;
    button.addEventListener("click", () => {
      if (this.#therapist) this.#setOpen(!this.#open);
      else this.#showPanel(this.els.panel.hidden);
    });
    const toolButton = (tool, key) => {
      const b = show(el("button", { type: "button", "aria-pressed": "false", "data-testid": `board-${tool}` }), key);
      b.addEventListener("click", () => this.#choose(tool));
      return b;
    };
    const pen = toolButton("pen", "tools.board.pen");
    const text = toolButton("text", "tools.board.text");
    const eraser = toolButton("eraser", "tools.board.eraser");
    const textField = el("input", {
      id: "board-text",
      type: "text",
      maxlength: String(MAX_TEXT),
      autocomplete: "off",
      "data-testid": "board-text-field",
    });
    const textLabel = show(el("label", { for: "board-text" }), "tools.board.text_field");
    const textRow = el("span", { className: "board-text", hidden: true }, [textLabel, textField]);
    const undo = show(el("button", { type: "button", "data-testid": "board-undo" }), "tools.board.undo");
    undo.addEventListener("click", () => this.undo());
    const clear = show(el("button", { type: "button", "data-testid": "board-clear" }), "tools.board.clear");
    clear.addEventListener("click", () => this.clear());
    const save = show(el("button", { type: "button", "data-testid": "board-save" }), "tools.board.save");
    save.hidden = !this.#therapist;
    save.addEventListener("click", () => this.save());
    const close = show(el("button", { type: "button", className: "quiet", "data-testid": "board-close" }), "tools.board.close");
    close.addEventListener("click", () => (this.#therapist ? this.#setOpen(false) : this.#showPanel(false)));
    const drawing = el("div", { className: "board-tools", role: "group" }, [pen, text, eraser, textRow, undo, clear]);
    showAttribute(drawing, "aria-label", "tools.board.tools");
    const viewOnly = show(el("p", { className: "hint", hidden: true, "data-testid": "board-view-only" }), "tools.board.view_only");
    const canvas = el("canvas", { width: String(WIDTH), height: String(HEIGHT), role: "img", "data-testid": "board-canvas" });
    showAttribute(canvas, "aria-label", "tools.board.canvas");
    this.#wireCanvas(canvas);
    const title = show(el("h2", { id: "board-title" }), "tools.board.title");
    const hint = show(el("p", { className: "hint" }), "tools.board.hint");
    const panel = el("section", { className: "board-panel", hidden: true, "aria-labelledby": "board-title", "data-testid": "whiteboard" }, [
      el("div", { className: "board-head" }, [title, save, close]),
      hint,
      drawing,
      viewOnly,
      el("div", { className: "board-surface" }, [canvas]),
    ]);
    return { button, panel, canvas, pen, text, eraser, textRow, textField, drawing, viewOnly, undo, clear };
  }

  // ------------------------------------------------------------------ opening and closing

  /** The therapist's side: open or close the board for everyone. */
  #setOpen(open) {
    if (this.#open === open) return;
    this.#open = open;
    if (!open) {
      this.#items.clear(); // nothing is kept
      this.#mine = [];
      for (const peer of this.#synced.keys()) this.#call.sendMessage(peer, { t: "board", op: "close" });
      this.#synced.clear();
    } else for (const peer of this.#call.peers()) this.#syncPeer(peer);
    this.#showPanel(open);
    this.#redraw();
  }

  #showPanel(visible) {
    const { panel, button } = this.els;
    panel.hidden = !visible;
    setPressed(button, visible);
    panel.closest(".call")?.classList.toggle("board-open", visible);
  }

  /** The therapist's side: give client `peer` the whole board if it lacks it on its current connection. */
  #syncPeer(peer) {
    if (!this.#therapist || !this.#open) return;
    const info = this.#call.describe(peer);
    if (info.role !== "client" || this.#call.isHeld(peer)) return;
    if (this.#synced.get(peer) === info.connection) return;
    if (!this.#call.sendMessage(peer, { t: "board", op: "reset" })) return;
    for (const item of this.#items.values()) for (const message of this.#itemMessages(item)) this.#call.sendMessage(peer, message);
    this.#synced.set(peer, info.connection);
  }

  #itemMessages(item) {
    const by = item.author;
    if (item.kind === "text") return [{ t: "board", op: "text", id: item.id, x: item.x, y: item.y, text: item.text, by }];
    const out = [];
    for (let i = 0; i < item.pts.length || i === 0; i += 2 * POINTS_PER_MESSAGE) {
      out.push({ t: "board", op: "stroke", id: item.id, tool: item.tool, pts: item.pts.slice(i, i + 2 * POINTS_PER_MESSAGE), by });
    }
    return out;
  }

  /** Send a change made here (or passed on) to whoever should have it. */
  #broadcast(message, except = null) {
    if (this.#therapist) {
      for (const [peer] of this.#synced) {
        if (peer === except) continue;
        if (this.#call.isHeld(peer) || !this.#call.sendMessage(peer, message)) this.#synced.delete(peer);
      }
    } else {
      const therapist = this.#call.peers().find((p) => this.#call.describe(p).role === "therapist");
      if (therapist && !this.#call.isHeld(therapist)) this.#call.sendMessage(therapist, message);
    }
  }

  // ------------------------------------------------------------------ messages

  #onMessage(peer, role, message) {
    if (this.#call.isHeld(peer)) return; // private time: nothing from or to a held peer
    if (this.#therapist) {
      if (role === "client" && message.op === "sync") {
        this.#synced.delete(peer); // a client that asks lacks the board: send it again
        this.#syncPeer(peer);
        return;
      }
      // A client's change: only while the board is open and that client may draw.
      if (role !== "client" || !this.#open || !this.#permissions.allowed(peer, "draw")) return;
      if (!["stroke", "text", "undo", "clear"].includes(message.op)) return;
      const passed = this.#apply(peer, message);
      if (passed) this.#broadcast({ ...passed, by: peer }, peer);
      return;
    }
    if (role !== "therapist") return; // a client takes the board from the therapist only
    if (message.op === "reset") {
      this.#items.clear();
      this.#open = true;
      this.els.button.hidden = false;
      if (this.els.panel.hidden) announce(t("tools.board.opened"));
      this.#showPanel(true);
      this.#redraw();
    } else if (message.op === "close") {
      this.#open = false;
      this.#items.clear();
      this.#mine = [];
      this.els.button.hidden = true;
      this.#showPanel(false);
      this.#redraw();
    } else if (this.#open) {
      const by = typeof message.by === "string" && message.by.length <= MAX_PEER ? message.by : peer;
      this.#apply(by, message);
    }
  }

  /** Apply one change by `author`; the well-formed message to pass on, or null. */
  #apply(author, message) {
    const { op, id } = message;
    if (op === "clear") {
      this.#items.clear();
      this.#redraw();
      return { t: "board", op: "clear" };
    }
    if (typeof id !== "string" || !ID.test(id)) return null;
    const key = `${author}/${id}`;
    if (op === "undo") {
      if (!this.#items.delete(key)) return null;
      this.#redraw();
      return { t: "board", op: "undo", id };
    }
    if (!this.#items.has(key) && this.#items.size >= MAX_ITEMS) return null;
    if (op === "stroke") {
      const { tool, pts } = message;
      if (!TOOLS.includes(tool) || !Array.isArray(pts) || pts.length % 2 || pts.length > 2 * POINTS_PER_MESSAGE) return null;
      if (!pts.every(coordinate)) return null;
      const item = this.#items.get(key) ?? { author, id, kind: "stroke", tool, pts: [] };
      if (item.kind !== "stroke" || item.pts.length + pts.length > 2 * MAX_ITEM_POINTS) return null;
      item.pts.push(...pts);
      this.#items.set(key, item);
      this.#redraw();
      return { t: "board", op: "stroke", id, tool, pts };
    }
    if (op === "text") {
      const { x, y, text } = message;
      if (!coordinate(x) || !coordinate(y) || typeof text !== "string" || !text.trim() || text.length > MAX_TEXT) return null;
      if (this.#items.has(key)) return null;
      this.#items.set(key, { author, id, kind: "text", x, y, text });
      this.#redraw();
      return { t: "board", op: "text", id, x, y, text };
    }
    return null;
  }

  // ------------------------------------------------------------------ drawing here

  #mayDraw() {
    return this.#open && this.#permissions.mine("draw") && !this.#call.selfHeld;
  }

  #choose(tool) {
    this.#tool = tool;
    this.#renderTools();
    if (tool === "text") this.els.textField.focus();
  }

  #renderTools() {
    const { pen, text, eraser, textRow, drawing, viewOnly } = this.els;
    setPressed(pen, this.#tool === "pen");
    setPressed(text, this.#tool === "text");
    setPressed(eraser, this.#tool === "eraser");
    textRow.hidden = this.#tool !== "text";
    const may = this.#permissions.mine("draw");
    drawing.hidden = !may;
    viewOnly.hidden = may;
  }

  #point(canvas, event) {
    const rect = canvas.getBoundingClientRect();
    const clamp = (v) => Math.min(SCALE, Math.max(0, Math.round(v * SCALE)));
    return [clamp((event.clientX - rect.left) / rect.width), clamp((event.clientY - rect.top) / rect.height)];
  }

  #wireCanvas(canvas) {
    canvas.addEventListener("pointerdown", (event) => {
      if (!this.#mayDraw()) return;
      event.preventDefault();
      const [x, y] = this.#point(canvas, event);
      if (this.#tool === "text") {
        const text = this.els.textField.value.trim().slice(0, MAX_TEXT);
        if (!text) {
          announce(t("tools.board.text_hint"));
          return;
        }
        this.#local({ t: "board", op: "text", id: newId(), x, y, text });
        this.els.textField.value = "";
        return;
      }
      canvas.setPointerCapture?.(event.pointerId);
      this.#stroke = { id: newId(), tool: this.#tool, pending: [x, y] };
      this.#flush();
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!this.#stroke) return;
      this.#stroke.pending.push(...this.#point(canvas, event));
      if (!this.#flushTimer) this.#flushTimer = setTimeout(() => this.#flush(), FLUSH_MS);
    });
    const end = () => {
      if (!this.#stroke) return;
      this.#flush();
      this.#stroke = null;
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
  }

  /** Send the points of the stroke being drawn that have not gone out yet. */
  #flush() {
    clearTimeout(this.#flushTimer);
    this.#flushTimer = 0;
    const stroke = this.#stroke;
    if (!stroke) return;
    while (stroke.pending.length) {
      const pts = stroke.pending.splice(0, 2 * POINTS_PER_MESSAGE);
      this.#local({ t: "board", op: "stroke", id: stroke.id, tool: stroke.tool, pts });
    }
  }

  /** A change made on this page: applied here, remembered for undo, sent on. */
  #local(message) {
    if (!this.#mayDraw()) return;
    const applied = this.#apply(this.#call.peerId, message);
    if (!applied) return;
    if ((message.op === "stroke" || message.op === "text") && this.#mine.at(-1) !== message.id) this.#mine.push(message.id);
    this.#broadcast(this.#therapist ? { ...applied, by: this.#call.peerId } : applied);
  }

  /** Take back this page's latest item still on the board. */
  undo() {
    while (this.#mine.length) {
      const id = this.#mine.pop();
      if (this.#items.has(`${this.#call.peerId}/${id}`)) {
        this.#local({ t: "board", op: "undo", id });
        return;
      }
    }
  }

  /** Clear the board for everyone. */
  clear() {
    this.#mine = [];
    this.#local({ t: "board", op: "clear" });
  }

  /** The therapist's side: a PNG of the board, downloaded on this device only. */
  save() {
    const copy = document.createElement("canvas");
    copy.width = WIDTH;
    copy.height = HEIGHT;
    const ctx = copy.getContext("2d");
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, WIDTH, HEIGHT);
    ctx.drawImage(this.els.canvas, 0, 0);
    copy.toBlob((blob) => {
      if (!blob) return;
      const url = URL.createObjectURL(blob);
      const link = el("a", { href: url, download: `whiteboard-${new Date().toISOString().slice(0, 10)}.png` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    }, "image/png");
  }

  /** What is on the board, for tests and the screen reader's summary: {strokes, texts}. */
  summary() {
    let strokes = 0;
    let texts = 0;
    for (const item of this.#items.values()) {
      if (item.kind === "text") texts += 1;
      else strokes += 1;
    }
    return { strokes, texts };
  }

  #redraw() {
    const { canvas, panel } = this.els;
    const { strokes, texts } = this.summary();
    panel.dataset.strokes = String(strokes);
    panel.dataset.texts = String(texts);
    if (this.#frame) return;
    this.#frame = requestAnimationFrame(() => {
      this.#frame = 0;
      this.#paint(canvas);
    });
  }

  #paint(canvas) {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, WIDTH, HEIGHT);
    const x = (v) => (v * WIDTH) / SCALE;
    const y = (v) => (v * HEIGHT) / SCALE;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    for (const item of this.#items.values()) {
      ctx.globalCompositeOperation = item.kind === "stroke" && item.tool === "eraser" ? "destination-out" : "source-over";
      if (item.kind === "text") {
        ctx.fillStyle = INK;
        ctx.font = "28px system-ui, sans-serif";
        ctx.textBaseline = "middle";
        ctx.fillText(item.text, x(item.x), y(item.y));
        continue;
      }
      const { pts } = item;
      ctx.strokeStyle = INK;
      ctx.fillStyle = INK;
      ctx.lineWidth = WIDTHS[item.tool];
      if (pts.length === 2) {
        ctx.beginPath();
        ctx.arc(x(pts[0]), y(pts[1]), ctx.lineWidth / 2, 0, 2 * Math.PI);
        ctx.fill();
        continue;
      }
      ctx.beginPath();
      ctx.moveTo(x(pts[0]), y(pts[1]));
      for (let i = 2; i < pts.length; i += 2) ctx.lineTo(x(pts[i]), y(pts[i + 1]));
      ctx.stroke();
    }
    ctx.globalCompositeOperation = "source-over";
  }

  destroy() {
    clearTimeout(this.#flushTimer);
    for (const off of this.#off) off();
  }
}
