"""
Editing the C{users} mapping of a YAML configuration file in place (pure,
no Twisted): C{lmtp-proxy users set|delete} on the YAML source.

Only the entry concerned changes; comments, order and layout of the rest
of the file stay as they were. The text is edited where the YAML composer
says each node begins and ends, and the result is validated as a whole
(L{lmtp_proxy.config.parse}) before anything is written.
"""

import json
import os
import re
import tempfile

import yaml
from yaml.nodes import MappingNode, ScalarNode

_PLAIN = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.+=\-@]*\Z")
_Loader = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


class EditError(Exception):
    """
    The file cannot be edited this way; C{str()} is one line.
    """


def quote(text):
    """
    C{text} as a YAML scalar: plain when that reads back as the same
    string, else double-quoted.
    """
    if _PLAIN.match(text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _usersNode(text):
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise EditError("not valid YAML: %s" % (" ".join(str(e).split()),)) from None
    if not isinstance(root, MappingNode):
        raise EditError("the file is not a mapping with a 'config' section")
    for knode, vnode in root.value:
        if isinstance(knode, ScalarNode) and knode.value == "users":
            return root, knode, vnode
    return root, None, None


def _lineStart(text, index):
    return text.rfind("\n", 0, index) + 1


def _lineEnd(text, index):
    end = text.find("\n", index)
    return len(text) if end == -1 else end + 1


def _end(node):
    """
    Where C{node}'s own text ends: a block collection's end mark lies past
    the comments that follow it, so it ends where its last item does.
    """
    if not getattr(node, "flow_style", True) and node.value:
        last = node.value[-1]
        return _end(last[1] if isinstance(last, tuple) else last)
    return node.end_mark.index


def setUser(text, key, value, address=None):
    """
    C{text} with C{users: key} set to C{value} (a backend name), or with
    C{address} to C{{backend: value, address: address}}.
    """
    key = key.lower()
    root, knode, vnode = _usersNode(text)
    if address is None:
        written = quote(value)
    else:
        written = "{backend: %s, address: %s}" % (quote(value), quote(address))
    entry = "%s: %s" % (quote(key), written)
    if knode is None:
        # No users section yet: one at the end.
        sep = "" if text.endswith("\n") or not text else "\n"
        return text + sep + "users:\n  " + entry + "\n"
    if isinstance(vnode, ScalarNode) and vnode.tag.endswith(":null"):
        # "users:" with nothing after it.
        end = _lineEnd(text, knode.end_mark.index)
        return text[:end] + "  " + entry + "\n" + text[end:]
    if not isinstance(vnode, MappingNode):
        raise EditError("users must be a mapping")
    if vnode.flow_style:
        raise EditError("users is written as a flow mapping ({...}); write it as a block to edit it")
    for k, v in vnode.value:
        if isinstance(k, ScalarNode) and k.value.lower() == key:
            start, end = v.start_mark.index, v.end_mark.index
            if isinstance(v, MappingNode) and not v.flow_style:
                # A block mapping value ({backend, address}) spans lines:
                # replace it whole with the plain name, on the key's line.
                start = text.index(":", k.end_mark.index) + 1
                end = _end(v)
                return text[:start] + " " + written + text[end:]
            return text[:start] + written + text[end:]
    first = vnode.value[0][0] if vnode.value else None
    indent = " " * (first.start_mark.column if first is not None else 2)
    last = vnode.value[-1][1] if vnode.value else knode
    # After the last entry's last line.
    at = _lineEnd(text, max(_end(last) - 1, last.start_mark.index))
    insert = indent + entry + "\n"
    if at > 0 and text[at - 1 : at] != "\n":
        insert = "\n" + insert
    return text[:at] + insert + text[at:]


def deleteUser(text, key):
    """
    C{text} without the C{users} entry C{key}.

    @return: C{(text, whether it was there)}.
    """
    key = key.lower()
    root, knode, vnode = _usersNode(text)
    if not isinstance(vnode, MappingNode):
        return text, False
    if vnode.flow_style:
        raise EditError("users is written as a flow mapping ({...}); write it as a block to edit it")
    for i, (k, v) in enumerate(vnode.value):
        if isinstance(k, ScalarNode) and k.value.lower() == key:
            start = _lineStart(text, k.start_mark.index)
            end = _lineEnd(text, max(_end(v) - 1, v.start_mark.index))
            rest = text[:start] + text[end:]
            if len(vnode.value) == 1:
                # The last entry: keep a valid, empty mapping.
                kend = _lineEnd(text[:start], knode.end_mark.index) if start else 0
                rest = rest[:kend].rstrip("\n")
                rest = rest + " {}\n" + text[end:] if rest.endswith("users:") else text[:start] + text[end:]
            return rest, True
    return text, False


def writeAtomically(path, text):
    """
    Replace C{path} with C{text}: a temporary file in the same directory
    (same mode and owner), flushed to disk, renamed over it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    st = os.stat(path)
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, st.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dirfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except OSError:
        pass
