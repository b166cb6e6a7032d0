"""The audit log: its format, writer, flood control, verification and setup."""
