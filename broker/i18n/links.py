"""The client's language in an invite link: ``/j/<token>?lang=<tag>#<link key>``.

The tag sits in the query, so the broker sees it with the path (docs/security.md): it says which
language the page starts in and nothing else about the client. It is not in the fragment because
the broker's own pages for a link that does not work (docs/protocol.md section 4) are shown before
any script runs, and a tag in the query is one the page can also keep on its neutral address for
a reload (web/js/no_trace.js).
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.i18n.catalogue import LANGUAGE_TAG, messages


def link_language_problem(tag: str, enabled: Iterable[str]) -> str | None:
    """Why ``tag`` cannot go in a client link (None: it can)."""
    offered = list(enabled)
    if LANGUAGE_TAG.fullmatch(tag) is None:
        return messages().text("link.language_not_a_tag", tag=tag)
    if tag not in offered:
        return messages().text("link.language_not_offered", tag=tag, offered=", ".join(offered))
    return None
