// In a pinned origin's page, in the page's own world, before any of its scripts: keep a list of
// the camera/microphone streams, peer connections and sockets the page opens, so that on a
// mismatch (Chromium runs a script before the extension can compare it) they all end at once:
// every track stopped, every connection closed, and no new one opened. The background then
// navigates the tab away, which ends anything this list missed.
(() => {
  const streams = new Set();
  const connections = new Set();
  let stopped = false;

  function stopStream(stream) {
    for (const track of stream.getTracks()) track.stop();
  }

  function keep(proto, name, onStream) {
    const original = proto?.[name];
    if (typeof original !== "function") return;
    proto[name] = async function (...args) {
      if (stopped) throw new DOMException("stopped by the web manifest check", "NotAllowedError");
      const stream = await original.apply(this, args);
      onStream(stream);
      return stream;
    };
  }

  const track = (stream) => (stopped ? stopStream(stream) : streams.add(stream));
  keep(globalThis.MediaDevices?.prototype, "getUserMedia", track);
  keep(globalThis.MediaDevices?.prototype, "getDisplayMedia", track);

  function watchConstructor(name, close) {
    const Original = globalThis[name];
    if (typeof Original !== "function") return;
    const Watched = new Proxy(Original, {
      construct(target, args, newTarget) {
        if (stopped) throw new DOMException("stopped by the web manifest check", "NotAllowedError");
        const made = Reflect.construct(target, args, newTarget === Watched ? target : newTarget);
        connections.add([made, close]);
        return made;
      },
    });
    Original.prototype.constructor = Watched;
    globalThis[name] = Watched;
  }

  watchConstructor("RTCPeerConnection", (pc) => pc.close());
  watchConstructor("WebSocket", (ws) => ws.close());
  watchConstructor("EventSource", (source) => source.close());

  function stop() {
    stopped = true;
    for (const stream of streams) stopStream(stream);
    for (const [made, close] of connections) {
      try {
        close(made);
      } catch {
        /* already closed */
      }
    }
    streams.clear();
    connections.clear();
    document.dispatchEvent(new Event("broker-web-verify:stopped"));
  }

  document.addEventListener("broker-web-verify:stop", stop, { capture: true });
})();
