"""
lmtp-proxy: an LMTP (RFC 2033) proxy that delivers each recipient to the
backend its routing table names.
"""

__version__ = "1.0.0"
