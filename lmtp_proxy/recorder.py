"""
What the serving code tells the metrics, as it happens.

The delivery, the backend pool and the reloader call an L{IRecorder}. Without
C{config.metrics} they get L{NO_METRICS}, which does nothing and needs no
C{prometheus_client}; with it, L{lmtp_proxy.metrics.Metrics}.
"""

from zope.interface import Interface, implementer


class IRecorder(Interface):
    """
    Receives the events the metrics count. Every method is called in the
    reactor thread, on the hot path: one call costs at most a dictionary
    lookup and a counter increment.
    """

    def rcptReply(backend, code):
        """
        The client got reply C{code} to a RCPT routed to C{backend} (the
        backend's name, C{"reject"}, or C{"none"} when unrouted).
        """

    def recipient(backend, outcome):
        """
        A recipient's final outcome: C{"sent"}, C{"deferred"}, C{"bounced"}
        or C{"aborted"}.
        """

    def delivered(backend, seconds):
        """
        A backend gave a recipient its verdict after the final dot,
        C{seconds} after MAIL.
        """

    def relayed(backend, size):
        """
        A message of C{size} bytes went to C{backend} up to its final dot.
        """

    def connected(backend, seconds):
        """
        A new connection to C{backend} was ready (greeting, LHLO, AUTH) after
        C{seconds}.
        """

    def reused(backend):
        """
        A pooled connection to C{backend} served another transaction.
        """

    def connectFailed(backend, reason):
        """
        A connection to C{backend} could not be made ready; C{reason} is a
        word from L{lmtp_proxy.pool.FAILURE_REASONS}.
        """

    def reloaded(result, seconds):
        """
        A reload ended with C{result} (C{"ok"}, C{"refused"}, C{"failed"})
        after C{seconds}.
        """


@implementer(IRecorder)
class _NoMetrics:
    """
    The L{IRecorder} of a proxy without C{config.metrics}.
    """

    def rcptReply(self, backend, code):
        pass

    def recipient(self, backend, outcome):
        pass

    def delivered(self, backend, seconds):
        pass

    def relayed(self, backend, size):
        pass

    def connected(self, backend, seconds):
        pass

    def reused(self, backend):
        pass

    def connectFailed(self, backend, reason):
        pass

    def reloaded(self, result, seconds):
        pass


NO_METRICS = _NoMetrics()
