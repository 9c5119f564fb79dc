"""IMAP4rev1/IMAP4rev2 for Porcupine: a sans-IO connection, the command grammar, a
response serializer, the session state table and a thin Twisted shell.

See docs/imap.md for the layout, the grammar coverage and the limits.
"""
