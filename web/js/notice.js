// The broker's notice pages (a link or an address that cannot be used): a client's link shown
// there leaves the address bar and the tab's history at once (an early link is still a good one),
// and "Leave now" becomes the quick exit (location.replace, Esc pressed twice), as on the join page.

import { startLanguage } from "./i18n.js";
import { JOIN_PATH } from "./no_trace.js";
import { installQuickExit } from "./quick_exit.js";

// Read the link's language tag before the address loses it (the broker rendered the page in
// English; the catalogue shows it in the client's language).
const language = startLanguage();

if (/^\/j\/[^/]+\/?$/.test(location.pathname) || location.hash) {
  history.replaceState(null, "", location.pathname.startsWith("/j/") ? JOIN_PATH : location.pathname);
}
installQuickExit();
await language;
