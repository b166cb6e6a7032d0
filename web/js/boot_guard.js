// The client's page when its modules never ran: a file lost on a bad network (or one whose bytes
// differ from its pin) leaves the module graph unrun and the page on "Opening your session…" for
// good. This classic script runs whatever happens to the modules: at the page's load it looks for
// join.js's mark, reloads once if it is missing (the link is still in the address then: join.js
// takes it out only when it runs), and after a second failure shows the page's plain message to
// reload. It keeps one flag in this tab's sessionStorage between the two tries; join.js removes it.
(() => {
  "use strict";
  const RETRIED = "tt-boot-retried";
  window.addEventListener("load", () => {
    if (document.documentElement.dataset.started === "yes") return;
    if (sessionStorage.getItem(RETRIED) !== "yes") {
      sessionStorage.setItem(RETRIED, "yes");
      console.warn("event=boot_retry");
      window.location.reload();
      return;
    }
    sessionStorage.removeItem(RETRIED);
    console.warn("event=boot_failed");
    const failed = document.getElementById("boot-failed");
    const lead = document.getElementById("loading-lead");
    if (failed) failed.hidden = false;
    if (lead) lead.hidden = true;
  });
})();
