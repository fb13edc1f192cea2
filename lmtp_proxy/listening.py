"""
The listening socket as configured: how it is shown, who owns a unix
socket, and whether a socket file found at its path may be removed.

Standard library only, below both the service and the command line.
"""

import grp
import os
import pwd
import socket
import stat

from lmtp_proxy.config import ConfigError


def describeListen(config) -> str:
    """
    The listening socket of C{config}: C{"unix:/path (owner ..., mode
    0660)"} or C{"host:port"}.
    """
    sock = config.socket
    if isinstance(sock, str):
        extra = []
        if config.owner is not None:
            extra.append(f"owner {config.owner}")
        if config.group is not None:
            extra.append(f"group {config.group}")
        if config.permissions is not None:
            extra.append(f"mode {config.permissions:04o}")
        return f"unix:{sock}" + (f" ({', '.join(extra)})" if extra else "")
    host, port = sock
    if not host:
        host = "*"
    elif ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def socketOwner(config):
    """
    The uid and gid (-1 for unchanged) that the unix socket of C{config}
    gets.

    @raise ConfigError: when the owner or the group does not exist.
    """
    try:
        uid = config.owner if config.owner is not None else -1
        if isinstance(uid, str):
            uid = pwd.getpwnam(uid).pw_uid
        gid = config.group if config.group is not None else -1
        if isinstance(gid, str):
            gid = grp.getgrnam(gid).gr_gid
    except KeyError as e:
        raise ConfigError(config.source, None, "config", "no such user or group: %s" % (e,))
    return uid, gid


def removeStaleSocket(path):
    """
    Remove a unix socket left behind by a proxy that died, but never a live
    one or a file that is not a socket.
    """
    # The connect probe, not a lock file, decides whether a socket is stale:
    # a lock left by a dead proxy, or naming a reused PID, would delete a
    # live socket or refuse a dead one.
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.remove(path)
    finally:
        probe.close()
