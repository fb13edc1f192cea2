"""
A throwaway certificate authority, made at test time with the
C{cryptography} library (which the C{tls} extra brings): no key is ever
checked into the repository, where it could be taken for a real one.
"""

import datetime
import ipaddress
import os

from twisted.trial.unittest import FailTest, SkipTest


def requireTLS():
    """
    Skip (or fail under CI=true) when the C{tls} extra is not installed.
    """
    try:
        import bcrypt  # noqa: F401
        import cryptography  # noqa: F401
        import OpenSSL  # noqa: F401
        import service_identity  # noqa: F401
    except ImportError as e:
        reason = "the tls extra is not installed (pip install '.[tls]'): %s" % (e,)
        if os.environ.get("CI") == "true":
            raise FailTest("CI=true and " + reason)
        raise SkipTest(reason)


class Authority:
    """
    A CA that writes PEM files into C{directory}.

    @ivar caFile: the CA's certificate.
    """

    def __init__(self, directory, name="lmtp-proxy test CA"):
        requireTLS()
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ec, self._oid = x509, hashes, ec, NameOID
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._name = subject
        self._certificate = (
            self._builder(subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.caFile = self._write(name.replace(" ", "-") + ".pem", self._pem(self._certificate))

    def _builder(self, subject, publicKey):
        x509 = self._x509
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(getattr(self, "_name", subject))
            .public_key(publicKey)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    @staticmethod
    def _pem(certificate):
        from cryptography.hazmat.primitives.serialization import Encoding

        return certificate.public_bytes(Encoding.PEM)

    def _write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)
        return path

    def issue(self, name, hosts=("localhost", "127.0.0.1")):
        """
        A certificate for C{hosts} (names or IP addresses) and its key.

        @return: C{(certificateFile, keyFile)}.
        """
        from cryptography.hazmat.primitives import serialization

        x509 = self._x509
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        alternatives = []
        for host in hosts:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alternatives.append(x509.DNSName(host))
        certificate = (
            self._builder(
                x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, hosts[0])]),
                key.public_key(),
            )
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .sign(self._key, self._hashes.SHA256())
        )
        keyPEM = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return (
            self._write(name + ".pem", self._pem(certificate)),
            self._write(name + ".key", keyPEM),
        )


def hashPassword(password):
    """
    A bcrypt hash of C{password} (text) for a users file, at bcrypt's
    lowest cost, which keeps the tests fast.
    """
    import bcrypt

    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(4)).decode("ascii")
