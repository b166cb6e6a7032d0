// The broker's notice pages (a link or an address that cannot be used): their "Leave now" link
// becomes the quick exit (location.replace, Esc pressed twice), as on the join page.

import { installQuickExit } from "./quick_exit.js";

installQuickExit();
