// The language of a client page that does nothing else (the home page): the browser's language,
// and the switch (i18n.js).

import { startLanguage } from "./i18n.js";

await startLanguage();
