"""
Loading a configuration for a reload without stalling the event loop.

libyaml composes a whole document while holding the GIL: for a table of
100,000 users that stalls every other thread for over 100 ms at a time, even
from a worker thread. So a reload parses and validates the file in a child
process (C{python -m lmtp_proxy.reloader FILE}), which hands back the checked
configuration as JSON, one line for the settings and one per user, so that
the parent decodes it in a thread in small steps that never hold the GIL
for long, and builds the routing table there too.
"""

import dataclasses
import io
import json
import os
import sys
from types import MappingProxyType

from twisted.internet import defer, error, protocol
from twisted.internet.threads import deferToThreadPool

import lmtp_proxy
from lmtp_proxy import config as configuration
from lmtp_proxy.routing import REJECT, RoutingTable


def toPlain(loaded):
    """
    A JSON-ready dict of a L{configuration.Config}.
    """
    plain = {
        f.name: getattr(loaded, f.name) for f in dataclasses.fields(configuration.Config)
    }
    plain["backends"] = {
        name: dataclasses.asdict(backend) for name, backend in loaded.backends.items()
    }
    del plain["users"]
    return plain


def fromPlain(plain, users):
    """
    The L{configuration.Config} that L{toPlain} and C{users} describe
    (already validated by the child).
    """
    plain = dict(plain)
    for key in ("socket", "metrics", "allowed_xclient", "allowed_clients"):
        if isinstance(plain.get(key), list):
            plain[key] = tuple(plain[key])
    plain["backends"] = MappingProxyType(
        {
            name: configuration.Backend(**backend)
            for name, backend in plain["backends"].items()
        }
    )
    plain["users"] = MappingProxyType(users)
    return configuration.Config(**plain)


class ChildConfigError(configuration.ConfigError):
    """
    The child's own one-line message, which already names the file.
    """

    def __str__(self):
        return self.problem


def serialize(loaded):
    """
    The bytes that describe a checked configuration: a line of settings,
    then a line per user. Worker processes get their configuration this way
    too.
    """
    lines = [json.dumps(toPlain(loaded))]
    lines.extend(json.dumps(item) for item in loaded.users.items())
    return ("\n".join(lines) + "\n").encode("utf-8")


def deserialize(data):
    """
    The L{configuration.Config} and L{RoutingTable} that L{serialize} wrote.

    Decoded one line at a time, never in one long call (like splitting the
    whole text at once), so that a thread doing it lets the event loop run
    every few milliseconds.
    """
    lines = io.BytesIO(data)
    plain = json.loads(lines.readline())
    # One string per backend name rather than one per user.
    names = {name: name for name in plain["backends"]}
    names[REJECT] = REJECT
    users = {}
    for line in lines:
        key, backend = json.loads(line)
        if backend.__class__ is list:
            # A rewritten user: JSON made its (backend, address) a list.
            backend = (names.get(backend[0], backend[0]), backend[1])
        else:
            backend = names.get(backend, backend)
        users[key] = backend
    new = fromPlain(plain, users)
    return new, RoutingTable.fromConfig(new)


def _build(output, old):
    new, table = deserialize(output)
    return new, table, configuration.describeChanges(old, new), output


def inThread(reactor, f, *args):
    """
    Run C{f(*args)} in the reactor's thread pool, with a short GIL switch
    interval meanwhile: at Python's default of 5 ms, every reply the event
    loop sends waits up to that long for the GIL, and a reload of 100,000
    users stalled serving for 50-100 ms; at 0.5 ms it stalls about 10 ms.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)

    def restore(result):
        sys.setswitchinterval(previous)
        return result

    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args).addBoth(restore)


def childEnvironment():
    """
    The environment for a child Python that must import this same
    C{lmtp_proxy}.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(lmtp_proxy.__file__)))]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


class _Loader(protocol.ProcessProtocol):
    """
    Collects the loading child's output, errors and exit status in
    C{done}; cancelling C{done} kills the child.
    """

    def __init__(self):
        self._out = []
        self._err = []
        self.done = defer.Deferred(self._kill)

    def _kill(self, done):
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def outReceived(self, data):
        self._out.append(data)

    def errReceived(self, data):
        self._err.append(data)

    def processEnded(self, reason):
        if not self.done.called:
            status = reason.value.exitCode
            if status is None:
                status = "signal %s" % (reason.value.signal,)
            self.done.callback((b"".join(self._out), b"".join(self._err), status))


# Seconds the child may take (100,000 users take about 3 s): a file on a
# hung network mount must not hold every later reload back.
LOAD_TIMEOUT = 120.0


def reloadConfig(reactor, old):
    """
    Load C{old.source} again, within L{LOAD_TIMEOUT} seconds.

    @return: a L{Deferred} firing with C{(config, table, summary, data)},
        C{data} being the L{serialize}d configuration, or failing with
        L{configuration.ConfigError}.
    """
    loader = _Loader()
    reactor.spawnProcess(
        loader,
        sys.executable,
        [sys.executable, "-m", "lmtp_proxy.reloader", old.source],
        env=childEnvironment(),
    )
    # Cancelling on timeout kills the child: a load stuck on a hung file
    # must not leave a process behind.
    child = loader.done.addTimeout(LOAD_TIMEOUT, reactor)

    def parsed(result):
        output, errors, status = result
        if status == 2:
            raise ChildConfigError(
                old.source, None, None, errors.decode("utf-8", "replace").strip()
            )
        if status != 0:
            raise configuration.ConfigError(
                old.source,
                None,
                None,
                "the configuration could not be loaded (status %s): %s"
                % (status, errors.decode("utf-8", "replace").strip()[-500:]),
            )
        return inThread(reactor, _build, output, old)

    def timedOut(failure):
        failure.trap(defer.TimeoutError)
        raise configuration.ConfigError(
            old.source, None, None, "not loaded within %g s" % (LOAD_TIMEOUT,)
        )

    return child.addCallbacks(parsed, timedOut)


# Files larger than this are loaded at start in a child process too
# (L{loadAtStart}); about 100,000 users.
CHILD_LOAD_BYTES = 4 * 1024 * 1024


def loadChecked(path):
    """
    L{configuration.load} C{path}, then read every certificate, key and
    SASL users file it names, so that a broken one is refused like any
    other mistake wherever a file is loaded (start, check, reload).

    @raise configuration.ConfigError: for the first mistake.
    """
    loaded = configuration.load(path)
    if configuration.usesSecurityFiles(loaded):
        # Imported only here: it needs the optional TLS libraries.
        from lmtp_proxy.tls import checkFiles

        checkFiles(loaded)
    return loaded


def loadAtStart(path):
    """
    Load C{path} before the reactor runs. A large file is parsed in a child
    process, as a reload is: the serving process then never holds the
    composed YAML of a million users (hundreds of megabytes that Python
    keeps once freed), only the configuration decoded from the child's
    JSON. Measured with bench/scale.py: about 1000 bytes per user less in
    the master process at 1,000,000 users.

    @raise configuration.ConfigError: as L{loadChecked}.
    """
    try:
        large = os.path.getsize(path) > CHILD_LOAD_BYTES
    except OSError:
        large = False
    if not large:
        return loadChecked(path)
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "lmtp_proxy.reloader", path],
        env=childEnvironment(),
        capture_output=True,
        timeout=LOAD_TIMEOUT,
    )
    if done.returncode == 2:
        raise ChildConfigError(path, None, None, done.stderr.decode("utf-8", "replace").strip())
    if done.returncode != 0:
        raise configuration.ConfigError(
            path, None, None,
            "the configuration could not be loaded (status %s): %s"
            % (done.returncode, done.stderr.decode("utf-8", "replace").strip()[-500:]),
        )
    loaded, _ = deserialize(done.stdout)
    return loaded


def main(argv):
    """
    Print the checked configuration of C{argv[0]} as JSON, or its error on
    standard error with exit status 2.
    """
    # Parsing a large table takes seconds of CPU that serving needs more.
    os.nice(10)
    try:
        loaded = loadChecked(argv[0])
    except configuration.ConfigError as e:
        sys.stderr.write("%s\n" % (e,))
        return 2
    sys.stdout.buffer.write(serialize(loaded))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
