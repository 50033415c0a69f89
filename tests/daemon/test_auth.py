"""CurveZMQ: only stations whose public key is in the daemon's allowed directory can register or report."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import zmq

from closedloop import protocol
from closedloop.daemon import control_request
from closedloop.keys import ClientKeys, new_keypair
from closedloop.store import Store
from tests.daemon.procs import (CLI, campaign_yaml, env, free_port, kill9, start_compute_station, start_daemon,
                                start_worker)


def _keyed_daemon(tmp_path: Path, campaign: str, keypairs: tuple[str, ...], admitted: tuple[str, ...],
                  *options: str) -> tuple[Path, str, str, subprocess.Popen]:
    """Keypairs for the daemon and ``keypairs`` in tmp_path/keys, the ``admitted`` ones' public keys in the allowed
    directory, ``campaign`` as c.yaml, and a daemon with keys serving it: (keys, station endpoint, control endpoint,
    daemon)."""
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    for name in ("daemon", *keypairs):
        new_keypair(keys, name)
    allowed.mkdir()
    for name in admitted:
        shutil.copy(keys / f"{name}.key", allowed / f"{name}.key")
    (tmp_path / "c.yaml").write_text(campaign)
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control, "--secret-key", str(keys / "daemon.key_secret"),
                          "--allowed-keys", str(allowed), *options)
    return keys, endpoint, control, daemon


def test_keys_new_makes_a_pair_and_refuses_to_overwrite(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "keys", "new", "station-a", "--dir", str(tmp_path)], capture_output=True, text=True,
                            env=env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "station-a.key").exists() and (tmp_path / "station-a.key_secret").exists()
    assert (tmp_path / "station-a.key_secret").stat().st_mode & 0o077 == 0
    again = subprocess.run([*CLI, "keys", "new", "station-a", "--dir", str(tmp_path)], capture_output=True, text=True,
                           env=env(), timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_non_loopback_without_keys_needs_insecure(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(campaign_yaml("open", 1))
    result = subprocess.run([*CLI, "daemon", "c.yaml", "--bind", f"tcp://0.0.0.0:{free_port()}", "--store", "s.db"],
                            cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=120)
    assert result.returncode == 2  # a refusal of what the command line was given (1b7d955)
    assert "--insecure" in result.stderr and "no keys" in result.stderr


@pytest.mark.slow
def test_station_without_the_right_key_cannot_register_or_report(tmp_path: Path) -> None:
    keys, endpoint, control, daemon = _keyed_daemon(
        tmp_path, campaign_yaml("curve", 6, latency=0.05), ("good", "intruder"), ("good",))
    intruder = start_worker(tmp_path, endpoint, "intruder", "--secret-key", str(keys / "intruder.key_secret"),
                            "--server-key", str(keys / "daemon.key"))
    context = zmq.Context()
    good = None
    try:
        # a peer with an unknown key, and one speaking plain text, each try hello and a forged result
        forged = protocol.encode(protocol.ResultMessage(trial_id=1, run_uid="forged", values={"y": 0.0}))
        hello = protocol.encode(protocol.Hello(station="intruder-raw"))
        rogue = context.socket(zmq.DEALER)
        ClientKeys(keys / "intruder.key_secret", keys / "daemon.key").apply(rogue)
        plain = context.socket(zmq.DEALER)
        for sock in (rogue, plain):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            sock.send(hello)
            sock.send(forged)
        deadline = time.monotonic() + 60  # a loaded CI machine may take a while to start the daemon
        while time.monotonic() < deadline:
            try:
                status = control_request(control, "status", timeout_s=5)
                break
            except Exception:
                time.sleep(0.3)
        time.sleep(3)  # the intruder worker has had time to try (it heartbeats every 0.3 s)
        status = control_request(control, "status", timeout_s=30)
        assert status["stations"] == []
        assert status["campaigns"][0]["finished"] == 0
        for sock in (rogue, plain):
            assert not sock.poll(100, zmq.POLLIN)  # never welcomed, never refused: the handshake failed
        # the refused station hung in its first heartbeat's send (a DEALER whose only connection ZAP closed
        # blocks), silent, until killed; the daemon said nothing either
        said = (tmp_path / "intruder.log").read_text()
        assert "no word from the daemon" in said and "may not be in its --allowed-keys" in said, said[-2000:]
        assert "refused a connection: its public key" in (tmp_path / "daemon.log").read_text()
        intruder.terminate()
        assert intruder.wait(timeout=20) == 0

        good = start_worker(tmp_path, endpoint, "good", "--secret-key", str(keys / "good.key_secret"),
                            "--server-key", str(keys / "daemon.key"))
        assert daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-2000:]
    finally:
        for proc in (daemon, intruder, good):
            if proc is not None:
                kill9(proc)
        context.destroy(linger=0)
    store = Store(tmp_path / "s.db")
    campaign_id = store.campaign_row("curve").id
    trials = store.trials(campaign_id)
    assert len(trials) == 6 and {t.status for t in trials} == {"completed"} and {t.station for t in trials} == {"good"}
    assert "forged" not in {o.run_uid for o in store.observations(campaign_id).values()}


@pytest.mark.slow
def test_an_allowed_key_registers_only_the_station_its_file_is_named_for(tmp_path: Path) -> None:
    """Any allowed key could say hello under any station's name and take that station's trials and results:
    a key now admits only the station its file in the allowed directory is named for (ZAP's User-Id)."""
    keys, endpoint, control, daemon = _keyed_daemon(
        tmp_path, campaign_yaml("named", 6, latency=0.05), ("good", "other"), ("good", "other"))
    other_keys = ("--secret-key", str(keys / "other.key_secret"), "--server-key", str(keys / "daemon.key"))
    (tmp_path / "thief").mkdir()  # its own log, outbox and journal: the rightful station's stay its own
    context = zmq.Context()
    thief = good = None
    try:
        # a peer holding the allowed key of 'other' says hello as 'good' (its routing id, as connect_station sets)
        raw = context.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.ROUTING_ID, b"good")
        ClientKeys(keys / "other.key_secret", keys / "daemon.key").apply(raw)
        raw.connect(endpoint)
        raw.send(protocol.encode(protocol.Hello(station="good")))
        assert raw.poll(60_000, zmq.POLLIN), "no answer to the hello"  # a loaded CI machine starts the daemon slowly
        answer = protocol.decode(raw.recv())
        assert isinstance(answer, protocol.Refused), answer
        assert "only a station named 'other'" in answer.reason
        raw.close()

        # a station worker started with another station's name and its own allowed key: refused, it exits
        thief = start_worker(tmp_path / "thief", endpoint, "good", *other_keys)
        assert thief.wait(timeout=60) == 2
        assert "only a station named 'other'" in (tmp_path / "thief" / "good.out").read_text()
        status = control_request(control, "status", timeout_s=30)
        assert status["stations"] == [] and status["campaigns"][0]["finished"] == 0

        good = start_worker(tmp_path, endpoint, "good", "--secret-key", str(keys / "good.key_secret"),
                            "--server-key", str(keys / "daemon.key"))
        assert daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-2000:]
    finally:
        for proc in (daemon, thief, good):
            if proc is not None:
                kill9(proc)
        context.destroy(linger=0)
    assert "the connection holds the key of station 'other'" in (tmp_path / "daemon.log").read_text()
    store = Store(tmp_path / "s.db")
    trials = store.trials(store.campaign_row("named").id)
    assert len(trials) == 6 and {t.status for t in trials} == {"completed"} and {t.station for t in trials} == {"good"}


@pytest.mark.slow
def test_watch_follows_a_daemon_whose_events_need_keys(tmp_path: Path) -> None:
    """`closedloop watch --control` subscribed to the daemon's event stream without keys: the CURVE handshake never
    completed, and it printed 'following ...' and then nothing while the campaign ran. It reads the store instead."""
    keys, endpoint, control, daemon = _keyed_daemon(
        tmp_path, campaign_yaml("watched", 12, latency=0.5, concurrency=1), ("good",), ("good",),
        "--publish", f"tcp://127.0.0.1:{free_port()}")
    good = start_worker(tmp_path, endpoint, "good", "--secret-key", str(keys / "good.key_secret"),
                        "--server-key", str(keys / "daemon.key"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if control_request(control, "status", timeout_s=2)["campaigns"][0]["counts"].get("completed"):
                    break  # the daemon answers, and the campaign runs
            except Exception:
                pass  # not up yet
            time.sleep(0.2)
        watched = subprocess.run([*CLI, "watch", "watched", "--store", "s.db", "--control", control, "--timeout", "8"],
                                 cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=120)
    finally:
        for proc in (daemon, good):
            kill9(proc)
    assert watched.returncode == 0, watched.stderr
    lines = [line for line in watched.stdout.splitlines() if "experiments" in line]
    assert len(lines) >= 3, watched.stdout


@pytest.mark.parametrize("command", ["worker", "compute-station"])
def test_a_station_the_daemon_refuses_exits_2_in_one_line(command: str, tmp_path: Path) -> None:
    """A station the daemon refused (here its key admits only another station's name) exited 1, the code of a
    failure a restart may cure (a lost connection, a panicked RunEngine). Started again unchanged it is refused
    again: its setup is wrong, and it exits 2 as bad input does, for its operator and service manager to tell."""
    keys, endpoint, control, daemon = _keyed_daemon(
        tmp_path, campaign_yaml("refusing", 2, latency=0.05), ("other",), ("other",))
    start = start_worker if command == "worker" else start_compute_station
    station = start(tmp_path, endpoint, "good", "--secret-key", str(keys / "other.key_secret"), "--server-key",
                    str(keys / "daemon.key"))
    try:
        returncode = station.wait(timeout=90)  # a loaded machine starts the daemon slowly
    finally:
        for proc in (daemon, station):
            kill9(proc)
    output = (tmp_path / "good.out").read_text()
    assert returncode == 2, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        "error: the daemon refused this station: this station's key admits only a station named 'other' (the name "
        "of its file in the allowed directory)"), output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_a_station_given_the_wrong_daemon_key_says_the_key_may_be_wrong(tmp_path: Path) -> None:
    """A station whose --server-key is not the daemon's never completes the CURVE handshake; its log said only that
    another process might hold its name, every 5 s, and nothing of the keys."""
    keys, endpoint, control, daemon = _keyed_daemon(
        tmp_path, campaign_yaml("keyed", 2, latency=0.05), ("good", "stranger"), ("good",))
    good = start_worker(tmp_path, endpoint, "good", "--secret-key", str(keys / "good.key_secret"),
                        "--server-key", str(keys / "stranger.key"))
    log = tmp_path / "good.log"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (log.exists() and "no word from the daemon" in log.read_text()):
            time.sleep(0.2)
    finally:
        for proc in (daemon, good):
            kill9(proc)
    assert "no word from the daemon" in log.read_text()
    assert "the --server-key may not be the daemon's public key" in log.read_text()


def test_a_station_without_keys_at_a_daemon_with_keys_says_the_daemon_may_require_them(tmp_path: Path) -> None:
    """'closedloop worker --connect' without keys at a daemon run with --secret-key and --allowed-keys: the CURVE
    handshake fails inside ZeroMQ, nothing is welcomed or refused, and the station's one line named only another
    process holding its name and an earlier daemon release."""
    keys, endpoint, control, daemon = _keyed_daemon(
        tmp_path, campaign_yaml("keyed", 2, latency=0.05), ("plain",), ("plain",))
    plain = start_worker(tmp_path, endpoint, "plain")
    log = tmp_path / "plain.log"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (log.exists() and "no word from the daemon" in log.read_text()):
            time.sleep(0.2)
        time.sleep(3)  # ten heartbeats more: the station keeps trying, and says its silence once
        assert plain.poll() is None
    finally:
        for proc in (daemon, plain):
            kill9(proc)
    said = [line for line in log.read_text().splitlines() if "no word from the daemon" in line]
    assert len(said) == 1, said
    assert "the daemon may require keys" in said[0], said[0]
    assert "give this station --secret-key and --server-key" in said[0], said[0]
