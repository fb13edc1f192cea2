"""
The server's message reader against a reference that reads the whole
message at once, over random messages each split into reads in many ways.

The reader sees a message piece by piece, as TCP hands it over, and decides
on each piece where the message ends and whether it holds bytes a backend
could read differently from us. The reference below decides the same on the
whole byte string, one byte at a time, as simply as it can be written; the
two must agree however the bytes are split.
"""

import random

from twisted.trial import unittest

from tests.test_server import LINE_LIMIT, PlainDelivery, Session, envelope

CR, LF, DOT = 13, 10, 46
# Weighted towards CRLF and plain text, so that most messages are clean and
# the refused ones are refused for one reason, not several.
TOKENS = [b"\r\n", b"\n", b"\r", b".", b"..", b"x", b"\r\n.\r\n", b"\r\n.", b".\r\n"]
WEIGHTS = [8, 1, 1, 3, 2, 6, 1, 2, 2]
LONG_LINE = b"y" * 700
RECIPIENTS = [b"u@a.test", b"v@a.test"]
# What the client pipelines behind the final dot, and the reply codes it
# gets: the reader must hand it back to the command reader whole.
TAILS = [
    (b"NOOP\r\n", [250]),
    (b"RSET\r\nNOOP\r\n", [250, 250]),
    (b"NOOP\r\nQUIT\r\n", [250, 221]),
    (
        b"MAIL FROM:<t@example.test>\r\nRCPT TO:<w@a.test>\r\nDATA\r\n"
        b"second\r\n.\r\nNOOP\r\n",
        [250, 250, 354, 250, 250],
    ),
]


def reference(stream, maxSize=0):
    """
    Read the message C{stream} (what the client sends after its DATA line)
    as a whole.

    @return: the body up to the end (still dot-stuffed, the CRLF before the
        final dot included), the code it is refused with or C{None}, and
        what follows the final dot.
    """
    # The CRLF that ended the DATA line frames a dot on the first line.
    framed = b"\r\n" + stream
    end = framed.find(b"\r\n.\r\n") + 2
    body = framed[2:end]
    code = None
    for i in range(2, end):
        byte = framed[i]
        if byte == LF and framed[i - 1] != CR:
            code = 554
        if byte == DOT and framed[i - 1] in (CR, LF) and framed[i + 1] == CR:
            code = 554
    if code is None and any(len(line) + 1 > LINE_LIMIT for line in body.split(b"\n")):
        code = 554
    if code is None and maxSize and len(body) > maxSize:
        code = 552
    return body, code, framed[end + 3 :]


def splits(data, rng):
    """
    Ways to split C{data} into reads: whole, a byte at a time, in two at
    every point (for a long message, at every point next to a CR, LF or dot
    and at twenty others), and three random ways.
    """
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    cuts = range(1, len(data))
    if len(data) > 200:
        near = {i + d for i, byte in enumerate(data) if byte in (CR, LF, DOT) for d in (-1, 0, 1, 2)}
        near.update(rng.randrange(1, len(data)) for _ in range(20))
        cuts = sorted(cut for cut in near if 0 < cut < len(data))
    for cut in cuts:
        yield [data[:cut], data[cut:]]
    for _ in range(3):
        largest, pieces, i = rng.choice([2, 5, 17]), [], 0
        while i < len(data):
            size = rng.randint(1, largest)
            pieces.append(data[i : i + size])
            i += size
        yield pieces


def messages(seed, count, tokens=TOKENS, weights=WEIGHTS):
    """
    C{count} random messages, each ended by CRLF "." CRLF, with the command
    lines pipelined behind it.
    """
    rng = random.Random(seed)
    for _ in range(count):
        stream = b"".join(rng.choices(tokens, weights, k=rng.randint(0, 14)))
        tail, tailCodes = rng.choice(TAILS)
        yield rng, stream + b"\r\n.\r\n", tail, tailCodes


class ReaderAgreesWithReferenceTests(unittest.TestCase):
    """
    Whatever the split, the reader relays what the reference says is the
    message, refuses what it refuses, and answers the commands after it.
    """

    def check(self, stream, tail, tailCodes, maxSize=0, plain=False):
        body, code, junk = reference(stream, maxSize)
        # A body both too large and refusable as smuggled is refused either
        # way; which of the two checks sees it first depends on the reads.
        either = (552, 554) if code == 554 and maxSize and len(body) > maxSize else (code,)
        # Lines between the final dot and the tail are not commands.
        junkCodes = [500] * junk.count(b"\n")
        settings = "  max_message_size: %d" % (maxSize,) if maxSize else ""
        for pieces in splits(stream + tail, self.rng):
            delivery = PlainDelivery() if plain else None
            session = Session(settings, delivery=delivery)
            session.send(envelope(RECIPIENTS))
            for piece in pieces:
                session.send(piece)
            where = "%r in reads %r" % (stream + tail, pieces)
            codes = session.codes()
            got = codes[6:8]
            self.assertEqual(codes[:6], [220, 250, 250, 250, 250, 354], where)
            self.assertEqual(got[0], got[1], where)
            self.assertIn(None if got[0] == 250 else got[0], either, where)
            self.assertEqual(codes[8:], junkCodes + tailCodes, where)
            if plain:
                self.checkLines(delivery, body, code, where)
            else:
                self.checkRelayed(session, body, code, tail, where)

    def checkRelayed(self, session, body, code, tail, where):
        transaction = session.delivery.transactions[0]
        relayed = transaction.body()
        if code is None:
            self.assertEqual(relayed, body, where)
        else:
            # What went out before the refusal is whole lines of the
            # message, none of them refused themselves.
            self.assertTrue(body.startswith(relayed), where)
            self.assertTrue(relayed == b"" or relayed.endswith(b"\r\n"), where)
            self.assertIsNone(reference(relayed + b".\r\n")[1], where)
            self.assertIsNone(transaction.verdicts, where)
        second = len(session.delivery.transactions) > 1
        self.assertEqual(second, tail.startswith(b"MAIL"), where)
        if second:
            self.assertEqual(session.delivery.transactions[1].body(), b"second\r\n", where)

    def checkLines(self, delivery, body, code, where):
        lines = [
            line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n")[:-1]
        ]
        for recipient in RECIPIENTS:
            message = delivery.messages[recipient]
            if code is None:
                self.assertEqual((message.lines, message.ended), (lines, True), where)
            else:
                self.assertEqual((message.ended, message.lost), (False, True), where)
                self.assertEqual(message.lines, lines[: len(message.lines)], where)

    def test_streamed(self):
        """
        A delivery that takes the message as it comes gets exactly the
        reference's bytes, or a refusal where the reference refuses.
        """
        for self.rng, stream, tail, tailCodes in messages("streamed", 150):
            self.check(stream, tail, tailCodes)

    def test_lineByLine(self):
        """
        A C{twisted.mail} delivery that takes the message a line at a time
        gets the reference's lines, dot-stuffing undone, or loses the
        message where the reference refuses.
        """
        for self.rng, stream, tail, tailCodes in messages("lines", 40):
            self.check(stream, tail, tailCodes, plain=True)

    def test_longLines(self):
        """
        A message with lines over the limit is refused wherever the reads
        split those lines.
        """
        tokens, weights = TOKENS + [LONG_LINE], WEIGHTS + [6]
        for self.rng, stream, tail, tailCodes in messages("long", 40, tokens, weights):
            self.check(stream, tail, tailCodes)

    def test_sizeLimit(self):
        """
        A message over C{max_message_size} is refused wherever the reads
        cross the limit.
        """
        for self.rng, stream, tail, tailCodes in messages("size", 40):
            self.check(stream, tail, tailCodes, maxSize=12)
