"""
The cluster barrier over the PostgreSQL store's nodes table (pure logic
plus one blocking loop; no Twisted).

A barrier for generation G holds until every node either

  - has G (or later) in force and no transaction in flight begun under an
    older generation, or
  - is counted out: it has been silent (no heartbeat, measured on the
    database's one clock) for longer than L{countOutAfter}, by which time
    it has provably stopped delivering by any older route (see
    C{docs/design.rst}, "Cluster barrier and fencing").
"""

import time

from lmtp_proxy.pgstore import StoreError

# The margin for the rates of the node's and the database's clocks: 5 % of
# the interval, and at least a second.
MARGIN_RATE = 0.05
MARGIN_MIN = 1.0
POLL = 0.1


def countOutAfter(lease, dataTimeout):
    """
    Seconds of silence after which a node has provably stopped delivering
    by an old route: its lease (then it fences itself: no new RCPT, every
    transaction before its final dot aborted), plus the longest a delivery
    past its final dot may still take (C{data_timeout}), plus a margin.
    """
    span = lease + dataTimeout
    return span + max(MARGIN_MIN, MARGIN_RATE * span)


class BarrierTimeout(Exception):
    """
    The barrier did not hold in time; C{str()} names the nodes holding it
    up.
    """


def assess(target, rows):
    """
    Where every node stands against a barrier for generation C{target}.

    @param rows: as L{lmtp_proxy.pgstore.Store.nodes} gives them.
    @return: C{(holding, countedOut)}: C{holding} a list of C{(name, why)}
        for the nodes the barrier still waits for, C{countedOut} the names
        of the silent nodes it no longer waits for.
    """
    holding, countedOut = [], []
    for name, generation, oldest, fenced, lease, dataTimeout, silence in rows:
        if silence > countOutAfter(lease, dataTimeout):
            countedOut.append(name)
        elif generation < target:
            why = "has generation %d in force" % (generation,)
            if fenced:
                why += " (fenced: lease expired)"
            holding.append((name, why))
        elif oldest is not None and oldest < target:
            holding.append(
                (name, "has transactions of generation %d in flight" % (oldest,))
            )
    return holding, countedOut


def describeHolding(holding):
    return ", ".join("%s %s" % (name, why) for name, why in holding)


def wait(store, timeout, target=None, clock=time.monotonic, sleep=time.sleep):
    """
    Wait until the barrier for generation C{target} (default: the current
    one) holds, for at most C{timeout} seconds; database errors meanwhile
    are retried until then.

    @return: C{(target, countedOut)}.
    @raise BarrierTimeout: naming the nodes that hold it up (or the
        database error that kept it from being checked).
    """
    deadline = clock() + timeout
    problem = None
    while True:
        try:
            generation, rows = store.nodes()
            if target is None:
                target = generation
            holding, countedOut = assess(target, rows)
            if not holding:
                return target, countedOut
            problem = "nodes holding it up: " + describeHolding(holding)
        except StoreError as e:
            store.close()
            problem = str(e)
        if clock() >= deadline:
            raise BarrierTimeout(
                "barrier%s not reached within %g s; %s"
                % ("" if target is None else " for generation %d" % (target,), timeout, problem)
            )
        sleep(POLL)
