"""IMAP4rev1 (RFC 3501) for Porcupine: the protocol package.

Message-level logic lives in pure modules: ``_message`` (ENVELOPE, BODYSTRUCTURE,
sections), ``_search`` (the SEARCH evaluator) and ``_sequence`` (sequence sets).
"""
