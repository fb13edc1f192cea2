"""
The server factory that serves the MTA's connections, built the same way
by the twistd process and by every worker process.
"""

from lmtp_proxy.access import UsersFileChecker
from lmtp_proxy.delivery import Delivery
from lmtp_proxy.recorder import NO_METRICS
from lmtp_proxy.router import deliveryPortal
from lmtp_proxy.server import LMTPServerFactory


def serverFactory(reactor, state, pool, metrics=NO_METRICS):
    """
    The L{LMTPServerFactory} that routes by C{state} (a
    L{lmtp_proxy.state.ProxyState}) and reaches backends through C{pool} (a
    L{lmtp_proxy.pool.BackendPool}): its sessions log in to a portal whose
    avatars are L{lmtp_proxy.router.Router}s, and write through the pool's
    outbox, so that replies and backend commands caused by one input leave
    joined. Its C{delivery} is the L{Delivery} they share, which tells
    C{metrics} (an L{lmtp_proxy.recorder.IRecorder}) what happens.
    """
    delivery = Delivery(reactor, state, pool, metrics)
    factory = LMTPServerFactory(
        deliveryPortal(delivery, [UsersFileChecker(reactor, lambda: state.config)]),
        reactor,
        lambda: state.config,
        pool.outbox,
    )
    factory.delivery = delivery
    return factory
