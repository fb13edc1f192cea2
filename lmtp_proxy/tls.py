"""
TLS settings built from the configuration with Twisted's own TLS
(C{twisted.internet.ssl}, which needs the C{tls} extra: pyOpenSSL and
service_identity). Nothing here checks a certificate itself: the listener
uses L{CertificateOptions}, a backend L{optionsForClientTLS} (the chain and
the name, checked by OpenSSL and service_identity).

The files are read when a configuration is loaded (L{checkFiles}: start,
C{lmtp-proxy check}, each reload, so a broken file is refused like any
other mistake) and again the first time a configuration in force needs
them: a reload makes a new configuration, so a renewed certificate takes
effect without a restart.
"""

import re

from twisted.logger import Logger

from lmtp_proxy.config import ConfigError

_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)

log = Logger()


def _ssl(source, path):
    """
    C{twisted.internet.ssl}, or a L{ConfigError} naming the missing extra.
    """
    try:
        import service_identity  # noqa: F401 optionsForClientTLS checks names with it
        from OpenSSL import crypto  # noqa: F401
        from twisted.internet import ssl
    except ImportError as e:
        raise ConfigError(
            source, None, path,
            "TLS needs the optional libraries: pip install 'lmtp-proxy[tls]' (%s)" % (e,),
        ) from None
    return ssl


def _reason(error):
    """
    One line for an OpenSSL or decoding error: the library's reasons, never
    the data.
    """
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        reasons = [item[-1] for item in args[0] if isinstance(item, tuple) and item[-1]]
        if reasons:
            return "; ".join(reasons)
    return str(error) or type(error).__name__


def _read(path, what, source, keyPath):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(
            source, None, keyPath, "cannot read the %s %s: %s" % (what, path, e.strerror or e)
        ) from None


def _certificates(ssl, path, source, keyPath):
    data = _read(path, "certificate file", source, keyPath)
    blocks = _CERTIFICATE.findall(data)
    if not blocks:
        raise ConfigError(source, None, keyPath, "%s holds no PEM certificate" % (path,))
    try:
        return [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise ConfigError(source, None, keyPath, "%s: bad certificate: %s" % (path, _reason(e))) from None


def _key(ssl, path, source, keyPath):
    from OpenSSL.crypto import FILETYPE_PEM

    data = _read(path, "key file", source, keyPath)
    try:
        return ssl.KeyPair.load(data, FILETYPE_PEM)
    except Exception as e:
        raise ConfigError(
            source, None, keyPath,
            "%s: not a PEM private key without a passphrase: %s" % (path, _reason(e)),
        ) from None


def serverOptions(config):
    """
    The listener's L{CertificateOptions}: the chain in C{config.tls_certificate}
    (leaf first) with the key in C{config.tls_key}.

    @raise ConfigError: for a file that cannot be read or used, or a key
        that does not match the certificate.
    """
    ssl = _ssl(config.source, "config.tls")
    chain = _certificates(ssl, config.tls_certificate, config.source, "config.tls.certificate")
    key = _key(ssl, config.tls_key, config.source, "config.tls.key")
    options = ssl.CertificateOptions(
        privateKey=key.original,
        certificate=chain[0].original,
        extraCertChain=[c.original for c in chain[1:]],
        # A client that kept its session (Postfix's
        # lmtp_tls_session_cache_database) resumes it instead of a full
        # handshake per connection, as with Dovecot's and Postfix's own
        # servers. Tickets keep no state here (Twisted's server-side session
        # cache, its other way, has a crash on record).
        enableSessionTickets=True,
    )
    try:
        # Building the context is what checks that the key matches.
        options.getContext()
    except Exception as e:
        raise ConfigError(
            config.source, None, "config.tls",
            "%s and %s cannot be used together: %s"
            % (config.tls_certificate, config.tls_key, _reason(e)),
        ) from None
    return options


def clientOptions(backend, source="<config>"):
    """
    What L{startTLS} and L{wrapClientTLS} need for C{backend}: with
    C{verify}, L{optionsForClientTLS} for its C{server_name} (or C{host})
    trusting C{ca_file} (or the system's store); without, a connection that
    checks nothing.

    @raise ConfigError: for a file that cannot be read or used.
    """
    path = "backends.%s" % (backend.name,)
    ssl = _ssl(source, path + ".tls")
    client = None
    if backend.client_certificate is not None:
        chain = _certificates(ssl, backend.client_certificate, source, path + ".client_certificate")
        key = _key(ssl, backend.client_key, source, path + ".client_key")
        client = ssl.PrivateCertificate.fromCertificateAndKeyPair(chain[0], key)
    if not backend.verify:
        if client is None:
            return ssl.CertificateOptions(verify=False)
        return ssl.CertificateOptions(
            privateKey=client.privateKey.original, certificate=client.original, verify=False
        )
    name = backend.server_name or backend.host
    if name is None:
        raise ConfigError(
            source, None, path + ".server_name",
            "missing; a unix socket backend with verify needs the name its certificate has",
        )
    trust = None
    if backend.ca_file is not None:
        trust = ssl.trustRootFromCertificates(
            _certificates(ssl, backend.ca_file, source, path + ".ca_file")
        )
    try:
        return ssl.optionsForClientTLS(name, trustRoot=trust, clientCertificate=client)
    except Exception as e:
        raise ConfigError(source, None, path, "cannot set up TLS: %s" % (_reason(e),)) from None


def checkFiles(config):
    """
    Read every certificate, key and users file C{config} names.

    @raise ConfigError: for the first that cannot be used.
    """
    if config.tls_certificate is not None:
        serverOptions(config)
    for backend in config.backends.values():
        if backend.tls != "none":
            clientOptions(backend, config.source)
    if config.auth_users_file is not None:
        from lmtp_proxy.access import readUsersFile

        readUsersFile(config.auth_users_file, config.source)


class _PerConfig:
    """
    What was built from the configuration in force, built again for a new
    one. A new configuration's files were checked when it was loaded; one
    that broke since keeps what the previous configuration had, as a
    refused reload would.
    """

    def __init__(self, build, what):
        self._build = build
        self._what = what
        self._key = None
        self._value = None

    def get(self, key, *args):
        if self._key is not key:
            try:
                self._value = self._build(*args)
            except ConfigError as e:
                if self._value is None:
                    raise
                log.error("keeping the previous {what}: {error}", what=self._what, error=e)
            self._key = key
        return self._value


_server = _PerConfig(serverOptions, "listener certificate")
_clients = {}


def serverOptionsFor(config):
    """
    The listener's TLS options for the configuration C{config} in force.
    """
    return _server.get(config, config)


def clientOptionsFor(backend):
    """
    The TLS options for C{backend} (a L{lmtp_proxy.config.Backend}) of the
    configuration in force.
    """
    # Backends of older configurations are dropped: only the last few
    # reloads' connections can still be opening.
    if len(_clients) > 256:
        _clients.clear()
    cache = _clients.get(backend.name)
    if cache is None:
        cache = _clients[backend.name] = _PerConfig(clientOptions, "certificates of backend " + backend.name)
    return cache.get(backend, backend)


def prepare(config):
    """
    Build the TLS options of C{config} now rather than at first use.

    @raise ConfigError: for a file that cannot be used.
    """
    if config.tls_certificate is not None:
        serverOptionsFor(config)
    for backend in config.backends.values():
        if backend.tls != "none":
            clientOptionsFor(backend)


def describeFailure(error):
    """
    Why a TLS connection ended before its handshake completed, in one line.
    """
    if type(error).__name__ in ("ConnectionDone", "ConnectionLost"):
        return "connection closed during the TLS handshake"
    return _reason(error)


def describeSession(transport):
    """
    The TLS version and cipher of C{transport}'s connection, for the log.
    """
    try:
        handle = transport.getHandle()
        return "%s, %s" % (handle.get_protocol_version_name(), handle.get_cipher_name())
    except Exception:
        return "TLS"
