"""The words people read, per language (issue 33; docs/i18n.md)."""
