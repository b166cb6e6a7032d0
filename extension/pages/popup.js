// The toolbar popup: the state of the current tab; on an unpinned site, pinning it. Fetching
// the site's manifest happens only when the person asks (the "Show its signing key" button).
const api = globalThis.browser ?? globalThis.chrome;

function line(parent, text, className) {
  const p = document.createElement("p");
  p.textContent = text;
  if (className) p.className = className;
  parent.append(p);
  return p;
}

async function main() {
  const [tab] = await api.tabs.query({ active: true, currentWindow: true });
  const state = await api.runtime.sendMessage({ type: "describe", tab: { id: tab.id, url: tab.url } });
  const status = document.getElementById("status");
  if (!state.origin) {
    status.textContent = "Nothing to check on this page.";
    return;
  }
  if (state.pinned) {
    status.textContent = `${state.origin}: ${state.status}`;
    const keys = document.getElementById("keys");
    for (const { key, fingerprint } of state.keys) line(keys, `Pinned key ${fingerprint}`, "key").title = key;
    line(keys, `Pinned by: ${state.sources.join(", ")}`, "muted");
    document.getElementById("unpin").hidden = !state.sources.includes("user");
    document.getElementById("unpin").addEventListener("click", async () => {
      await api.runtime.sendMessage({ type: "unpin", origin: state.origin });
      window.close();
    });
    return;
  }
  status.textContent = `${state.origin} is not pinned: nothing is checked here.`;
  document.getElementById("offer").hidden = false;
  document.getElementById("fetch").addEventListener("click", async () => {
    const signers = document.getElementById("signers");
    signers.replaceChildren();
    const offer = await api.runtime.sendMessage({ type: "offer", origin: state.origin });
    if (offer.error || !offer.signers?.length) {
      line(signers, offer.error ?? "This site serves no signed manifest: it cannot be pinned.");
      return;
    }
    line(signers, `Build ${offer.version}, signed by:`);
    for (const { key, fingerprint } of offer.signers) {
      line(signers, fingerprint, "key");
      line(signers, key, "key muted");
      const pin = document.createElement("button");
      pin.type = "button";
      pin.textContent = "Pin this key";
      pin.addEventListener("click", async () => {
        await api.runtime.sendMessage({ type: "pin", origin: state.origin, key });
        window.close();
      });
      signers.append(pin);
    }
  });
}

main();
