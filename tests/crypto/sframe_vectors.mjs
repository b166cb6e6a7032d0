// Checks web/js/sframe.js under Node 20 against tests/vectors/sframe.json, and runs the frames
// tests/crypto/test_sframe.py hands it (encrypt for Python to open, open what Python sealed).
// Driven by test_sframe.py: reads {"ops": [...]} on stdin, prints {"checked", "failures", "results"}.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
// web/ has no package.json, so Node would read sframe.js as CommonJS: import its text as a module.
const source = readFileSync(here("../../web/js/sframe.js"));
const sf = await import("data:text/javascript;base64," + source.toString("base64"));
const V = JSON.parse(readFileSync(here("../vectors/sframe.json"), "utf8"));

const hex = (b) => Buffer.from(b).toString("hex");
const fromHex = (h) => new Uint8Array(Buffer.from(h, "hex"));
let checked = 0;
const failures = [];
function same(what, got, want) {
  checked++;
  if (String(got) !== String(want)) failures.push(`${what}: got ${got}, want ${want}`);
}
async function codeOf(promise) {
  try {
    await promise;
    return "accepted";
  } catch (err) {
    return err instanceof sf.SFrameError ? err.code : `${err.name}: ${err.message}`;
  }
}

same("cipher suite", sf.CIPHER_SUITE, V.cipher_suite);
same("replay window", sf.REPLAY_WINDOW, V.replay_window);
same("sender slots", sf.SENDER_SLOTS, V.sender_slots);
same("retired key grace", sf.RETIRED_KEY_GRACE_MS, V.retired_key_grace_ms);
same("vp8 clear bytes", `${sf.VP8_KEYFRAME_CLEAR_BYTES}/${sf.VP8_DELTA_CLEAR_BYTES}`, `${V.vp8_clear_bytes.key}/${V.vp8_clear_bytes.delta}`);
for (const h of V.headers) {
  same(`header ${h.kid}/${h.counter}`, hex(sf.encodeHeader(BigInt(h.kid), BigInt(h.counter))), h.header);
  const parsed = sf.decodeHeader(fromHex(h.header));
  same(`parse ${h.header}`, `${parsed.kid}/${parsed.counter}/${parsed.length}`, `${h.kid}/${h.counter}/${h.header.length / 2}`);
}
for (const k of V.kid_layout) {
  same(`kid ${k.slot}/${k.generation}`, sf.kidFor(k.slot, BigInt(k.generation)), k.kid);
  const parts = sf.kidParts(BigInt(k.kid));
  same(`kid parts ${k.kid}`, `${parts.slot}/${parts.generation}`, `${k.slot}/${k.generation}`);
}
for (const k of V.keys) {
  const key = await sf.deriveSenderKey(fromHex(k.base_key), BigInt(k.kid));
  same(`salt ${k.kid}`, hex(key.salt), k.salt);
}
for (const f of V.frames) {
  const key = await sf.deriveSenderKey(fromHex(f.base_key), BigInt(f.kid));
  same(`output ${f.kid}/${f.counter}`, hex(await sf.encryptFrame(key, BigInt(f.counter), fromHex(f.frame), f.clear_bytes)), f.output);
  const ring = new sf.Keyring();
  ring.add(key);
  const opened = await sf.decryptFrame(ring, fromHex(f.output), f.clear_bytes);
  same(`opened ${f.kid}/${f.counter}`, `${hex(opened.frame)}/${opened.kid}/${opened.counter}`, `${f.frame}/${f.kid}/${f.counter}`);
}
for (const n of V.negative) {
  const ring = new sf.Keyring();
  for (const k of n.keyring) ring.add(await sf.deriveSenderKey(fromHex(k.base_key), BigInt(k.kid)));
  for (const b of n.before) same(`${n.name} before`, await codeOf(ring.open(fromHex(b), n.clear_bytes)), "accepted");
  same(n.name, await codeOf(sf.decryptFrame(ring, fromHex(n.input), n.clear_bytes)), n.error);
}

// Frames handed over by the Python test: one keyring per base key and KID across the ops.
const rings = new Map();
const results = [];
const { ops } = JSON.parse(readFileSync(0, "utf8") || '{"ops": []}');
for (const op of ops) {
  const key = await sf.deriveSenderKey(fromHex(op.base_key), BigInt(op.kid));
  if (op.op === "encrypt") {
    results.push(hex(await sf.encryptFrame(key, BigInt(op.counter), fromHex(op.frame), op.clear_bytes)));
  } else {
    const id = `${op.base_key}/${op.kid}`;
    if (!rings.has(id)) rings.set(id, new sf.Keyring());
    rings.get(id).add(key);
    try {
      const opened = await rings.get(id).open(fromHex(op.input), op.clear_bytes);
      results.push({ frame: hex(opened.frame), kid: String(opened.kid), counter: String(opened.counter) });
    } catch (err) {
      results.push({ error: err instanceof sf.SFrameError ? err.code : `${err.name}: ${err.message}` });
    }
  }
}
process.stdout.write(JSON.stringify({ checked, failures, results }));
