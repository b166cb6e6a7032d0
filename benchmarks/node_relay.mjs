// P1's second peer: the bare relay of relay.py, on Node.js and the `ws` package.
//
// Does exactly what relay.py's bare aiohttp relay does, no more: peers connect to /ws?peer=ID;
// each text frame goes, unchanged, to the peer named in the JSON field `to` (dropped when no such
// peer is connected); /healthz answers "ok"; frames up to 64 KiB; no compression; a ping every 20 s.
//
// Usage: node node_relay.mjs PORT MODULES_DIR
// MODULES_DIR holds node_modules/ws (relay.py installs it there from the npm registry at run time;
// it is never committed). One process, one event loop, as the Python relays.

import { createServer } from "node:http";
import { createRequire } from "node:module";
import { join } from "node:path";

const [portArg, modulesDir] = process.argv.slice(2);
if (!portArg || !modulesDir) {
  console.error("usage: node node_relay.mjs PORT MODULES_DIR");
  process.exit(2);
}
// ws is resolved from MODULES_DIR, not from beside this file: the install stays out of the repository.
const require = createRequire(join(modulesDir, "package.json"));
const { WebSocketServer } = require("ws");

const MAX_PAYLOAD = 64 * 1024;
const HEARTBEAT_MS = 20_000;

const peers = new Map();
const http = createServer((request, response) => {
  if (request.url === "/healthz") {
    response.writeHead(200, { "content-type": "text/plain" });
    response.end("ok");
  } else {
    response.writeHead(404);
    response.end();
  }
});
const sockets = new WebSocketServer({ noServer: true, maxPayload: MAX_PAYLOAD, perMessageDeflate: false });

http.on("upgrade", (request, socket, head) => {
  const url = new URL(request.url, "http://relay");
  const me = url.searchParams.get("peer");
  if (url.pathname !== "/ws" || !me) {
    socket.destroy();
    return;
  }
  sockets.handleUpgrade(request, socket, head, (ws) => {
    peers.set(me, ws);
    ws.on("message", (data, isBinary) => {
      if (isBinary) return;
      let to;
      try {
        to = JSON.parse(data).to;
      } catch {
        to = undefined;
      }
      if (typeof to !== "string") {
        ws.terminate(); // the aiohttp relay's handler ends on a frame without a string `to`, dropping the peer
        return;
      }
      const target = peers.get(to);
      if (target !== undefined) target.send(data, { binary: false });
    });
    ws.on("close", () => {
      if (peers.get(me) === ws) peers.delete(me);
    });
  });
});

// aiohttp's heartbeat=20: a ping every 20 s to each peer (the load generator answers with a pong).
setInterval(() => {
  for (const ws of peers.values()) ws.ping();
}, HEARTBEAT_MS).unref();

http.listen(Number(portArg), "127.0.0.1");
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
