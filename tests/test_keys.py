"""CURVE key files: a secret key is never readable by another user, not even for a moment."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_secret_key_file_is_created_readable_by_its_owner_alone(tmp_path: Path) -> None:
    """The secret was written into a file made with the umask's mode (0644 here) and restricted afterwards: a user
    who opened it in between (inotify tells when it appears) kept reading it after the chmod. Its file is now
    created 0600 before the key is written."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed: the file's mode at creation cannot be watched")
    trace = tmp_path / "trace.txt"
    done = subprocess.run([strace, "-f", "-qq", "-e", "trace=openat,open,creat", "-o", str(trace), sys.executable,
                           "-m", "closedloop.cli", "keys", "new", "station-a", "--dir", str(tmp_path / "keys")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    secret = tmp_path / "keys" / "station-a.key_secret"
    creations = [line for line in trace.read_text().splitlines() if "station-a.key_secret" in line and "O_CREAT" in line]
    assert creations, trace.read_text()[-2000:]
    # the first open that may create it makes it (the command refuses a key that exists); later ones keep its mode
    mode = re.search(r"O_CREAT[^,]*, (0\d+)\)", creations[0])
    assert mode and int(mode.group(1), 8) & 0o077 == 0, creations
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys" / "station-a.key").stat().st_mode) & 0o044  # the public key stays readable


def _own_address() -> str | None:
    """This machine's first non-loopback IPv4 address, if it has one."""
    import ipaddress
    import socket

    names = {name for _, name in socket.if_nameindex()}
    done = subprocess.run(["hostname", "-I"], capture_output=True, text=True) if shutil.which("hostname") else None
    for word in (done.stdout.split() if done and done.returncode == 0 else []):
        if ":" not in word and not ipaddress.ip_address(word).is_loopback and word not in names:
            return word
    return None


@pytest.mark.parametrize(("endpoint", "local"), [
    ("ipc:///tmp/closedloop-control", True),
    ("inproc://control", True),
    ("tcp://127.0.0.1:5700", True),
    ("tcp://127.0.0.1:*", True),
    ("tcp://localhost:5700", True),
    ("tcp://*:5700", False),
    ("tcp://0.0.0.0:5700", False),
    ("tcp://localhost.example.invalid:5700", False),  # a name that merely contains 'localhost' (.invalid never resolves)
    ("tcp://127.0.0.1.example.invalid:5700", False),
    ("tcp://lo:5700", False),  # an interface name: ZeroMQ takes its address, this check does not look it up
    ("tcp://[::1]:5700", True),
    ("tcp://[::1]:*", True),
    ("tcp://[0:0:0:0:0:0:0:1]:5700", True),
    ("tcp://[::ffff:127.0.0.1]:5700", True),  # IPv4 loopback as an IPv6 socket sees it
    ("tcp://[::]:5700", False),  # every interface, both families
    ("tcp://[::ffff:0.0.0.0]:5700", False),
    ("tcp://[2001:db8::1]:5700", False),
    ("tcp://[fe80::1%lo]:5700", False),  # link-local: its neighbours reach it, whatever the interface
    ("tcp://[fe80::1%eth0]:5700", False),
    ("tcp://::1:5700", True),  # ZeroMQ takes an IPv6 address without its brackets too
])
def test_an_endpoint_is_local_only_when_every_address_of_its_host_is_loopback(endpoint: str, local: bool) -> None:
    from closedloop.keys import is_local

    assert is_local(endpoint) is local, endpoint


def test_a_host_name_counts_by_what_it_resolves_to() -> None:
    """The daemon's control check took any endpoint containing '127.0.0.1' or 'localhost' as local and refused this
    machine's own name, which resolves to loopback here; the station check took no host name at all."""
    import socket

    from closedloop.keys import is_local

    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except socket.gaierror:
        pytest.skip(f"this machine's name {name!r} does not resolve")
    if name in {iface for _, iface in socket.if_nameindex()}:
        pytest.skip(f"this machine's name {name!r} is also an interface's")
    loopback = all(address.startswith("127.") or address == "::1" for address in addresses)
    assert is_local(f"tcp://{name}:5700") is loopback, addresses
    own = _own_address()
    if own is not None:
        assert is_local(f"tcp://{own}:5700") is False
