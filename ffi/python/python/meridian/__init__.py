"""Meridian client SDK for Python.

Sync Automerge documents through a Meridian relay::

    import meridian

    client = meridian.Client.from_config("client.toml")
    doc = client.open("notes/today")
    doc.wait_synced(10)
    doc.put(["title"], "Groceries")
    doc.put_text(["body"], "milk, eggs")
    doc.splice_text(["body"], 0, 0, "bread, ")
    doc.wait_durable(10)
    print(doc.to_json())
    client.close()

Every blocking call releases the GIL while it waits and takes a timeout in seconds.
Errors are ``MeridianError`` subclasses (``MeridianError.Timeout``,
``MeridianError.Relay`` with the protocol's numeric ``code`` and its ``name``, ...).
Callbacks run on background threads; an exception in one is logged to the
``meridian`` logger and does not stop later calls.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import threading
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from ._native import meridian_ffi as _ffi

MeridianError = _ffi.MeridianError
ConnectionState = _ffi.ConnectionState
SyncStatus = _ffi.SyncStatus
Presence = _ffi.Presence
HistoryEntry = _ffi.HistoryEntry

__all__ = [
    "Client",
    "Document",
    "Subscription",
    "MeridianError",
    "ConnectionState",
    "SyncStatus",
    "Presence",
    "HistoryEntry",
    "set_logger",
]

#: How long a blocking call waits when no timeout is given, in seconds.
DEFAULT_TIMEOUT = 30.0

_log = logging.getLogger("meridian")

_I64_MIN = -(2**63)
_U64_MAX = 2**64 - 1

Path = Sequence[Union[str, int]]


def _path(path: Path) -> list:
    """A list of keys and indexes as the native path type."""
    if isinstance(path, (str, bytes)) or not isinstance(path, (list, tuple)):
        raise MeridianError.InvalidPath(
            f"a path is a list of map keys (str) and list indexes (int), not {type(path).__name__}"
        )
    segments = []
    for step in path:
        if isinstance(step, str):
            segments.append(_ffi.PathSegment.KEY(step))
        elif isinstance(step, int) and not isinstance(step, bool):
            if step < 0 or step > _U64_MAX:
                raise MeridianError.InvalidPath(f"list index {step} out of range")
            segments.append(_ffi.PathSegment.INDEX(step))
        else:
            raise MeridianError.InvalidPath(
                f"a path step is a str key or an int index, not {type(step).__name__}"
            )
    return segments


def _check_value(value: Any, depth: int = 0) -> None:
    """Refuses what `put` cannot store, with the offending type named."""
    if depth > 64:
        raise MeridianError.InvalidValue("nested deeper than 64 levels")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not _I64_MIN <= value <= _U64_MAX:
            raise MeridianError.InvalidValue(f"integer {value} does not fit in 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MeridianError.InvalidValue(f"float {value} is not finite")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MeridianError.InvalidValue(
                    f"map keys are str, not {type(key).__name__}"
                )
            _check_value(item, depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_value(item, depth + 1)
        return
    raise MeridianError.InvalidValue(
        f"cannot store a {type(value).__name__}: use str, int, float, bool, None, dict or list"
    )


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("meridian")
    except Exception:  # noqa: BLE001 - a name for the relay's logs only
        return "unknown"


def _timeout(timeout_s: Optional[float]) -> float:
    if timeout_s is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise MeridianError.InvalidValue(
            f"timeout_s is a number of seconds, not {type(timeout_s).__name__}"
        )
    return float(timeout_s)


def _guarded(callback: Callable, what: str) -> Callable:
    """`callback`, with any exception it raises logged instead of crossing into Rust."""

    def call(*args):
        try:
            callback(*args)
        except BaseException:  # noqa: BLE001 - nothing may escape into the native thread
            _log.exception("%s callback raised", what)

    return call


class Subscription:
    """A running listener; `cancel()` stops it (safe inside its own callback)."""

    def __init__(self, native: "_ffi.Subscription"):
        self._native = native

    def cancel(self) -> None:
        self._native.cancel()


class _ChangeListener(_ffi.ChangeListener):
    def __init__(self, callback: Callable[[list], None]):
        self._call = _guarded(callback, "on_change")

    def on_change(self, heads):
        self._call(list(heads))


class _ConnectionListener(_ffi.ConnectionListener):
    def __init__(self, callback: Callable[[Any], None]):
        self._call = _guarded(callback, "on_state")

    def on_state(self, state):
        self._call(state)


class _TokenProvider(_ffi.TokenProvider):
    def __init__(self, provider: Callable[[], Optional[str]]):
        self._provider = provider

    def fresh_token(self):
        try:
            token = self._provider()
        except BaseException:  # noqa: BLE001
            _log.exception("token provider raised")
            return None
        return token if isinstance(token, str) and token else None


class Document:
    """An open document. Edits apply locally at once and are sent in the background."""

    def __init__(self, native: "_ffi.Document"):
        self._native = native

    @property
    def id(self) -> str:
        return self._native.id()

    # Waits -------------------------------------------------------------------------

    def wait_synced(self, timeout_s: Optional[float] = None) -> None:
        """Waits until the catch-up after (re)subscribing is complete."""
        self._native.wait_synced(_timeout(timeout_s))

    def wait_applied(self, timeout_s: Optional[float] = None) -> None:
        """Waits until every local edit so far is Applied by the relay."""
        self._native.wait_applied(_timeout(timeout_s))

    def wait_durable(self, timeout_s: Optional[float] = None) -> None:
        """Waits until every local edit so far is Durable."""
        self._native.wait_durable(_timeout(timeout_s))

    # Edits -------------------------------------------------------------------------

    def put(self, path: Path, value: Any) -> None:
        """Sets `value` (str, int, float, bool, None, or nested dict/list) at `path`.

        Missing maps on the way are created; an index equal to a list's length appends.
        """
        segments = _path(path)
        _check_value(value)
        self._native.put_json(segments, json.dumps(value))

    def put_text(self, path: Path, text: str) -> None:
        """Sets a collaborative text holding `text` at `path`."""
        if not isinstance(text, str):
            raise MeridianError.InvalidValue(f"text is a str, not {type(text).__name__}")
        self._native.put_text(_path(path), text)

    def splice_text(self, path: Path, index: int, delete: int, text: str) -> None:
        """Deletes `delete` characters at `index` of the text at `path`, inserts `text`."""
        for name, number in (("index", index), ("delete", delete)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise MeridianError.InvalidValue(f"{name} is a non-negative int, not {number!r}")
        if not isinstance(text, str):
            raise MeridianError.InvalidValue(f"text is a str, not {type(text).__name__}")
        self._native.splice_text(_path(path), index, delete, text)

    def put_counter(self, path: Path, value: int = 0) -> None:
        """Sets a counter starting at `value` at `path`."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise MeridianError.InvalidValue(f"a counter is an int, not {type(value).__name__}")
        self._native.put_counter(_path(path), value)

    def increment(self, path: Path, by: int = 1) -> None:
        """Adds `by` to the counter at `path`."""
        if isinstance(by, bool) or not isinstance(by, int):
            raise MeridianError.InvalidValue(f"an increment is an int, not {type(by).__name__}")
        self._native.increment(_path(path), by)

    def delete(self, path: Path) -> None:
        """Deletes the map entry or list element at `path`."""
        self._native.delete(_path(path))

    # Reads -------------------------------------------------------------------------

    def to_json(self) -> str:
        """The whole document as a JSON string."""
        return self._native.to_json()

    def to_dict(self) -> dict:
        """The whole document as Python values."""
        return json.loads(self._native.to_json())

    def to_json_at(self, heads: Iterable[str]) -> str:
        """The document as it was at `heads`, as a JSON string."""
        return self._native.to_json_at(list(heads))

    def history(self) -> list:
        """Every change in causal order: `hash`, `actor`, `seq`, `time` (seconds), `message`,
        `deps` and the document's `heads` just after it."""
        return list(self._native.history())

    def restore(self, heads: Iterable[str]) -> None:
        """Makes the document equal to its state at `heads`, as one forward edit."""
        self._native.restore(list(heads))

    def heads(self) -> list:
        """The document's heads, as hex strings."""
        return list(self._native.heads())

    def status(self) -> "SyncStatus":
        return self._native.status()

    def is_gone(self) -> bool:
        """Whether an operator purged the document (the relay answered `gone`): it is
        not served any more, pending edits are never stored, and waits raise
        `MeridianError.Relay` named `gone`. Delete the app's local copy."""
        return self._native.is_gone()

    # Raw changes -------------------------------------------------------------------

    def changes_since(self, heads: Iterable[str] = ()) -> list:
        """Raw Automerge changes not ancestors of `heads` (all for none)."""
        return list(self._native.changes_since(list(heads)))

    def apply_changes(self, changes: Iterable[bytes]) -> None:
        """Applies raw Automerge changes made elsewhere and sends them."""
        self._native.apply_changes([bytes(c) for c in changes])

    def save(self) -> bytes:
        """The whole document in Automerge's save format."""
        return self._native.save()

    def load(self, saved: bytes) -> None:
        """Merges a saved document into this one."""
        self._native.load(bytes(saved))

    # Presence and listeners --------------------------------------------------------

    def set_presence(self, state: bytes) -> None:
        self._native.set_presence(bytes(state))

    def presence(self) -> list:
        return list(self._native.presence())

    def on_change(self, callback: Callable[[list], None]) -> Subscription:
        """Calls `callback(heads)` on a background thread after remote changes."""
        if not callable(callback):
            raise MeridianError.InvalidValue("on_change takes a callable")
        return Subscription(self._native.on_change(_ChangeListener(callback)))


_open_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()
_open_lock = threading.Lock()


class Client:
    """A connection to the tenant's cell, shared by every open document."""

    def __init__(self, native: "_ffi.Client"):
        self._native = native
        with _open_lock:
            _open_clients.add(self)

    @classmethod
    def from_config(
        cls, path: str, token_provider: Optional[Callable[[], Optional[str]]] = None
    ) -> "Client":
        """Connects with a ``client.toml`` (as ``meridian dev`` writes it).

        `token_provider`, if given, is called (on a background thread) for a fresh
        token before the current one expires; it returns the token or None.
        """
        path = str(path)
        if token_provider is None:
            return cls(_ffi.Client.from_config(path))
        return cls(_ffi.Client.from_config_with_provider(path, _TokenProvider(token_provider)))

    @classmethod
    def connect(
        cls,
        endpoint: str,
        token: str,
        *,
        nodes: Sequence[str] = (),
        router: Optional[str] = None,
        server_name: str = "localhost",
        ca_pem: Optional[str] = None,
        store_dir: Optional[str] = None,
        token_provider: Optional[Callable[[], Optional[str]]] = None,
    ) -> "Client":
        """Connects with explicit settings; without `ca_pem`, the OS trust store."""
        settings = _ffi.Settings(
            endpoint=endpoint,
            nodes=list(nodes),
            router=router,
            server_name=server_name,
            ca_pem=ca_pem,
            token=token,
            store_dir=None if store_dir is None else str(store_dir),
            client_name=f"meridian-python/{_version()}",
        )
        provider = None if token_provider is None else _TokenProvider(token_provider)
        return cls(_ffi.Client.connect(settings, provider))

    def open(self, doc_id: str) -> Document:
        """Opens a document and subscribes to it; returns at once."""
        if not isinstance(doc_id, str):
            raise MeridianError.InvalidDocument(
                f"a document id is a str, not {type(doc_id).__name__}"
            )
        return Document(self._native.open(doc_id))

    def state(self):
        return self._native.state()

    def wait_connected(self, timeout_s: Optional[float] = None) -> None:
        self._native.wait_connected(_timeout(timeout_s))

    def set_token(self, token: str) -> None:
        self._native.set_token(token)

    def pause(self) -> None:
        """Goes offline until `resume()` (e.g. the app moved to the background)."""
        self._native.pause()

    def resume(self) -> None:
        self._native.resume()

    def network_changed(self) -> None:
        """Moves the connections to a fresh socket after the network changed."""
        self._native.network_changed()

    def on_state(self, callback: Callable[[Any], None]) -> Subscription:
        """Calls `callback(state)` on a background thread at every state change."""
        if not callable(callback):
            raise MeridianError.InvalidValue("on_state takes a callable")
        return Subscription(self._native.on_state(_ConnectionListener(callback)))

    def close(self) -> None:
        """Closes the connection and ends every listener. Closing twice is harmless."""
        self._native.shutdown()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Logger(_ffi.Logger):
    def __init__(self, logger: logging.Logger):
        self._logger = logger

    def log(self, level, target, message):
        try:
            self._logger.log(_LEVELS.get(level, logging.DEBUG), "%s: %s", target, message)
        except BaseException:  # noqa: BLE001
            pass


_LEVELS = {
    _ffi.LogLevel.ERROR: logging.ERROR,
    _ffi.LogLevel.WARN: logging.WARNING,
    _ffi.LogLevel.INFO: logging.INFO,
    _ffi.LogLevel.DEBUG: logging.DEBUG,
    _ffi.LogLevel.TRACE: logging.DEBUG,
}


def set_logger(logger: Optional[logging.Logger] = None, level: int = logging.INFO) -> None:
    """Sends the native client's log lines at `level` and above to `logger`
    (default: the ``meridian`` logger)."""
    native_level = (
        _ffi.LogLevel.ERROR
        if level >= logging.ERROR
        else _ffi.LogLevel.WARN
        if level >= logging.WARNING
        else _ffi.LogLevel.INFO
        if level >= logging.INFO
        else _ffi.LogLevel.DEBUG
    )
    _ffi.set_logger(_Logger(logger or _log), native_level)


@atexit.register
def _close_all() -> None:
    # Native threads must not call into Python while the interpreter shuts down.
    _ffi.clear_logger()
    with _open_lock:
        clients = list(_open_clients)
    for client in clients:
        try:
            client.close()
        except BaseException:  # noqa: BLE001
            pass
