// Network pre-flight: a short WebRTC data-channel test against the broker's own peer.
//
// The broker sends pings on the "preflight" channel and times the echoes itself, so what this module reports is
// for display only; the broker keeps the result that counts. No camera or microphone is involved.
//
// Wire (JSON text on the channel):  broker -> page {t:"ping", n}   page -> broker {t:"pong", n}
//                                   broker -> page {t:"done", connected, rtt_ms, relayed}

const CHANNEL_LABEL = "preflight";
const MAX_MESSAGE = 256;
const GATHER_LIMIT_MS = 4000;

/** Resolve once ICE gathering completed (the broker does not take trickled candidates), or after a limit. */
function gatheringComplete(pc, limitMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(finish, limitMs);
    function finish() {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", onChange);
      resolve();
    }
    function onChange() {
      if (pc.iceGatheringState === "complete") finish();
    }
    pc.addEventListener("icegatheringstatechange", onChange);
  });
}

function parseMessage(data) {
  if (typeof data !== "string" || data.length > MAX_MESSAGE) return null;
  try {
    const message = JSON.parse(data);
    return message && typeof message === "object" ? message : null;
  } catch {
    return null;
  }
}

/**
 * Run the network pre-flight.
 *
 * @param {(offerSdp: string) => Promise<string>} sendOffer  posts the offer to the broker, returns its answer SDP
 * @param {{iceServers?: RTCIceServer[], relayOnly?: boolean, timeoutMs?: number}} [options]  timeoutMs counts from
 *        the broker's answer (the broker may keep an offer waiting a few seconds for a free slot)
 * @returns {Promise<{connected: boolean, pings: number, rttMs: number|null, relayed: boolean|null,
 *                    reason: string|null}>}  resolves on success and on network failure; rejects only when
 *          sendOffer rejects (for example the broker refused or is busy). The peer connection is always closed.
 */
export async function runPreflight(sendOffer, { iceServers = [], relayOnly = false, timeoutMs = 10000 } = {}) {
  const pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: relayOnly ? "relay" : "all" });
  let pings = 0;
  let timer = null;
  let fail = null;
  try {
    const channel = pc.createDataChannel(CHANNEL_LABEL, { ordered: true });
    const finished = new Promise((resolve) => {
      fail = (reason) => resolve({ connected: false, pings, rttMs: null, relayed: null, reason });
      channel.addEventListener("message", (event) => {
        const message = parseMessage(event.data);
        if (!message) return;
        if (message.t === "ping" && Number.isInteger(message.n) && channel.readyState === "open") {
          channel.send(JSON.stringify({ t: "pong", n: message.n }));
          pings += 1;
        } else if (message.t === "done") {
          resolve({
            connected: message.connected === true && pings > 0,
            pings,
            rttMs: typeof message.rtt_ms === "number" ? message.rtt_ms : null,
            relayed: typeof message.relayed === "boolean" ? message.relayed : null,
            reason: message.connected === true ? null : "no_echo",
          });
        }
      });
      channel.addEventListener("close", () => fail(pings > 0 ? "closed" : "not_connected"));
      pc.addEventListener("connectionstatechange", () => {
        if (pc.connectionState === "failed") fail("failed");
      });
    });

    await pc.setLocalDescription(await pc.createOffer());
    await gatheringComplete(pc, GATHER_LIMIT_MS);
    const answerSdp = await sendOffer(pc.localDescription.sdp);
    timer = setTimeout(() => fail(pings > 0 ? "no_result" : "timeout"), timeoutMs);
    await pc.setRemoteDescription({ type: "answer", sdp: answerSdp });
    return await finished;
  } finally {
    if (timer !== null) clearTimeout(timer);
    pc.close();
  }
}
