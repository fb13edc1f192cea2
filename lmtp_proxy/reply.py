"""
LMTP replies: what both ends of the proxy send and receive.

The server and the backend client both speak in L{Reply}s, so they share
this module rather than one importing the other (as C{twisted.names} keeps
its wire format in C{dns.py}).
"""

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(\s|$)")


@dataclass(frozen=True)
class Reply:
    """
    One SMTP/LMTP reply: a code and its text lines.
    """

    code: int
    lines: tuple = ("",)

    @property
    def positive(self):
        return 200 <= self.code < 300

    @property
    def transient(self):
        return 400 <= self.code < 500

    def withEnhancedCode(self):
        """
        Return this reply with an enhanced status code (RFC 3463) on every
        line, adding the generic C{X.0.0} where the backend sent none.
        """
        lines = self.lines
        if len(lines) == 1 and _ENHANCED.match(lines[0]):
            return self
        if all(_ENHANCED.match(line) for line in lines):
            return self
        prefix = "%d.0.0" % (self.code // 100,)
        return Reply(
            self.code,
            tuple(
                line if _ENHANCED.match(line) else (prefix + " " + line).rstrip()
                for line in self.lines
            ),
        )

    def toBytes(self):
        """
        Encode as the bytes of a reply on the wire.
        """
        if len(self.lines) == 1:
            return b"%d %s\r\n" % (self.code, self.lines[0].encode("utf-8", "replace"))
        last = len(self.lines) - 1
        return b"".join(
            b"%d%s%s\r\n"
            % (self.code, b" " if i == last else b"-", line.encode("utf-8", "replace"))
            for i, line in enumerate(self.lines)
        )

    def __str__(self):
        return " / ".join("%d %s" % (self.code, line) for line in self.lines)


def reply(code, text):
    """
    Build a one-line L{Reply}.
    """
    return Reply(code, (text,))
