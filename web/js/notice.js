// The broker's notice pages (a link or an address that cannot be used): a client's link shown
// there leaves the address bar and the tab's history at once (an early link is still a good one),
// and "Leave now" becomes the quick exit (location.replace, Esc pressed twice), as on the join page.

import { JOIN_PATH } from "./no_trace.js";
import { installQuickExit } from "./quick_exit.js";

if (/^\/j\/[^/]+\/?$/.test(location.pathname) || location.hash) {
  history.replaceState(null, "", location.pathname.startsWith("/j/") ? JOIN_PATH : location.pathname);
}
installQuickExit();
