# twistd plugin for lmtp-proxy.
#
# Only a ServiceMaker lives here, and it imports lmtp_proxy.service lazily,
# as twisted/plugins/twisted_names.py does: twistd imports every plugin file
# to list them.  There must be no twisted/__init__.py and no
# twisted/plugins/__init__.py in this project.

from twisted.application.service import ServiceMaker

LMTPProxy = ServiceMaker(
    "lmtp-proxy",
    "lmtp_proxy.service",
    "An LMTP (RFC 2033) proxy that routes each recipient to its backend.",
    "lmtp-proxy",
)
