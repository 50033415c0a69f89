"""CurveZMQ keys: who may talk to the daemon, and encryption of everything they say.

Layout (all plain files made by ``closedloop keys new NAME``, i.e. :func:`zmq.auth.create_certificates`):

    keys/daemon.key          the daemon's public key: give it to every station
    keys/daemon.key_secret   the daemon's secret key: stays on the control station
    keys/station-a.key       a station's public key: copy it into the daemon's allowed-keys directory
    keys/station-a.key_secret
    allowed/station-a.key    the directory the daemon reads (``--allowed-keys``): one public key per station

The daemon authenticates stations with ZAP (:class:`zmq.auth.thread.ThreadAuthenticator`): a peer whose
public key is not in the allowed directory never completes the handshake, so it can neither register
nor deliver a result. ZAP names each connection after its key file (the ZMTP ``User-Id`` of every
message it sends: ``station-a`` for ``allowed/station-a.key``), and the daemon takes messages only from
a station of that name. Without keys the daemon binds only to loopback unless told ``--insecure``.

Example:
    >>> import tempfile
    >>> public, secret = new_keypair(tempfile.mkdtemp(), "station-a")
    >>> public.name, secret.name
    ('station-a.key', 'station-a.key_secret')
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from closedloop.errors import ProtocolError

log = logging.getLogger("closedloop.keys")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def new_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Make ``NAME.key`` (public) and ``NAME.key_secret`` in ``directory``; refuses to overwrite."""
    if not _NAME.match(name):
        raise ProtocolError(f"key name {name!r}: use letters, digits, '.', '_' and '-'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise ProtocolError(f"{public} already exists; remove it first or choose another name")
    # made 0600 before the key is in it, which pyzmq then writes into (it truncates, keeping the mode): its own file
    # took the umask's mode (0644) until a chmod, and a user who opened it in between could read on afterwards
    os.close(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    made_public, made_secret = zmq.auth.create_certificates(directory, name)
    Path(made_secret).chmod(0o600)
    return Path(made_public), Path(made_secret)


def _load(path: str | Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"key file {path} not found (make one with `closedloop keys new NAME`)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise ProtocolError(f"key file {path} is not a CurveZMQ certificate: {exc}") from None
    if secret and secret_key is None:
        raise ProtocolError(f"{path} holds no secret key (use the NAME.key_secret file)")
    return public, secret_key


REFUSED_KEYS_LOGGED = 20


class _NamedKeys(ThreadAuthenticator):
    """Admits the allowed directory's keys, read once (as ``configure_curve`` reads them: restart the daemon after
    adding one), and names each connection after its key's file, so that a key is a station's name: pyzmq's
    default User-Id is the key itself, which says nothing about which station may use it."""

    def __init__(self, context: zmq.Context, names: dict[bytes, str], log: logging.Logger):
        super().__init__(context, log=log)
        self.names = names
        self._refused: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials provider of ``configure_curve_callback``: ``key`` is z85."""
        if key in self.names:
            return True
        # said once per key (a refused station reconnects every second), and for the first few keys only: a peer
        # making up keys must not fill the log. Unsaid, a station with a key never copied here hung with no word
        if key not in self._refused and len(self._refused) < REFUSED_KEYS_LOGGED:
            self._refused.add(key)
            self.log.warning("refused a connection: its public key %s is not in the allowed-keys directory (a "
                             "station's NAME.key, made by `closedloop keys new NAME`, goes there; then restart the "
                             "daemon)", key.decode(errors="replace")[:40])
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names[z85.encode(client_public_key)]


@dataclass(frozen=True)
class ServerKeys:
    """The daemon's key pair and the directory of station public keys it accepts."""

    secret_file: Path
    allowed_dir: Path

    def __post_init__(self) -> None:
        _load(self.secret_file, secret=True)
        if not Path(self.allowed_dir).is_dir():
            raise ProtocolError(f"allowed-keys directory {self.allowed_dir} not found")
        if not any(Path(self.allowed_dir).glob("*.key")):
            log.warning("allowed-keys directory %s holds no public keys: no station can connect", self.allowed_dir)

    def allowed(self) -> dict[bytes, str]:
        """The allowed directory's public keys (z85) and the names of their files (``good.key``: ``good``)."""
        names: dict[bytes, str] = {}
        for path in sorted(Path(self.allowed_dir).glob("*.key")):
            try:
                public, _ = _load(path, secret=False)
            except ProtocolError as exc:
                log.error("allowed key %s skipped: %s", path, exc)
                continue
            name = names.setdefault(public, path.stem)
            if name != path.stem:
                log.warning("allowed key %s is also %s.key: its holder may register only as station %r",
                            path, name, name)
        return names

    def start_authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        """ZAP handler for ``context``: CURVE peers must hold a key from the allowed directory, and each
        connection's User-Id is the name of that key's file."""
        auth = _NamedKeys(context, self.allowed(), log=logging.getLogger("closedloop.auth"))
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=auth)
        return auth

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (before it binds)."""
        public, secret = _load(self.secret_file, secret=True)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_server = True


@dataclass(frozen=True)
class ClientKeys:
    """A station's (or dashboard's) key pair and the daemon's public key."""

    secret_file: Path
    server_public_file: Path

    def __post_init__(self) -> None:
        _load(self.secret_file, secret=True)
        _load(self.server_public_file, secret=False)

    @property
    def name(self) -> str:
        """The name the pair was made under (``station-a.key_secret``: ``station-a``), a station's default name:
        the daemon admits a key only as the station its file in the allowed directory is named for."""
        return Path(self.secret_file).name.removesuffix(".key_secret")

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the daemon (before it connects)."""
        public, secret = _load(self.secret_file, secret=True)
        server, _ = _load(self.server_public_file, secret=False)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server


def is_local(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: ipc://, inproc:// and tcp:// on a host whose every address
    is loopback (127.0.0.0/8, ``[::1]``, ``[::ffff:127.0.0.1]``).

    The one rule for the station endpoints and the unauthenticated control socket. A name counts by what it resolves
    to, as ZeroMQ binds it ('localhost.example.org' may be anyone's address); an interface name (ZeroMQ takes that
    first) and '*' are reachable from elsewhere as far as this check knows.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    match = re.match(r"^tcp://(.+):(\d+|\*)$", endpoint)
    if not match:
        return False
    host = match.group(1).strip("[]")
    if host == "*" or host in {name for _, name in socket.if_nameindex()}:
        return False
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(_loopback(address) for address in addresses)


def _loopback(address: str) -> bool:
    """``127.0.0.0/8`` or ``::1``, also as IPv4 written for IPv6 (``::ffff:127.0.0.1``, which Python's own
    ``is_loopback`` does not know before 3.13)."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class Unprotected(ProtocolError):
    """An endpoint other machines can reach, to be served without keys: the operator's command is at fault (exit 2),
    not the network."""


def check_exposure(endpoint: str, keys: ServerKeys | None, insecure: bool) -> None:
    """Refuse to serve a network-reachable endpoint without CURVE unless explicitly ``insecure``."""
    if keys is None and not insecure and not is_local(endpoint):
        raise Unprotected(
            f"{endpoint} is reachable from other machines and no keys are configured: pass --secret-key and "
            "--allowed-keys (see docs/daemon.md), or --insecure to serve it unauthenticated and unencrypted"
        )
