"""Therapist accounts: rows, passwords, second factors and login throttling."""
