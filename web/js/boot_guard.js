// Any page whose modules never ran: a file lost on the way (Chromium fails the requests in flight
// with net::ERR_NETWORK_CHANGED when the machine's network changes), or one whose bytes differ
// from its pin, leaves the module graph unrun and the page on its first screen for good. This
// classic script, loaded by every page with a main module, runs whatever happens to the modules.
// At the page's load it looks for the main module's mark (its first act:
// document.documentElement.dataset.started = "yes"), reloads once if it is missing (a link's
// fragment is still in the address then: the module takes it out only when it runs; no page is
// the answer to a form, so a reload sends nothing again), and after a second failure shows the
// page's message to reload. It keeps one flag in this tab's sessionStorage between the two tries;
// the main module removes it, and so does the second failure.
//
// What a page provides: #boot-failed, hidden, shown on failure (its words from the catalogues),
// and optionally elements marked data-boot-hide, hidden then (what cannot work without modules).
(() => {
  "use strict";
  const RETRIED = "tt-boot-retried";
  const started = () => document.documentElement.dataset.started === "yes";
  // Until the main module runs, no form is sent by the browser itself: a GET would put its fields
  // (the login page's password) in the address.
  document.addEventListener(
    "submit",
    (event) => {
      if (!started()) event.preventDefault();
    },
    true,
  );
  window.addEventListener("load", () => {
    if (started()) return;
    if (sessionStorage.getItem(RETRIED) !== "yes") {
      sessionStorage.setItem(RETRIED, "yes");
      console.warn("event=boot_retry");
      window.location.reload();
      return;
    }
    sessionStorage.removeItem(RETRIED);
    console.warn("event=boot_failed");
    const failed = document.getElementById("boot-failed");
    if (failed) failed.hidden = false;
    for (const element of document.querySelectorAll("[data-boot-hide]")) element.hidden = true;
  });
})();
