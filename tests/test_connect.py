"""`closedloop validate --connect` against a real caproto IOC on loopback, run as a user runs it: a real subprocess."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from drivers.binding import InstrumentBinding
from tests.drivers import test_epics
from tests.drivers.test_epics import ROOT, loopback_channel_access, read_pv

pytest.importorskip("caproto")

# beside the suite's other processes on two cores, an IOC's Channel Access connections timed out (10 s, twice)
pytestmark = pytest.mark.alone

CAMPAIGN = """\
name: epics-check
parameters:
  x1: {{type: continuous, bounds: [-5, {x1_high}]}}
  x2: {{type: continuous, bounds: [0, 15]}}
objectives:
  y: {{goal: minimize}}
budget: {{experiments: 5}}
planner: {{backend: sobol, seed: 3}}
instrument:
  driver: {driver}
  options: {{prefix: "{prefix}"{more}}}
"""


def campaign_file(folder: Path, prefix: str, *, x1_high: float = 5, driver: str = "drivers.epics_motor:Stage",
                  more: str = "") -> Path:
    path = folder / "c.yaml"
    path.write_text(CAMPAIGN.format(prefix=prefix, x1_high=x1_high, driver=driver, more=more))
    return path


def stage_reading(*, prefix: str, key: str) -> InstrumentBinding:
    """The EPICS stage with its output ``y`` read from data key ``key``: a driver written with a typo."""
    from drivers.epics_motor import Stage

    return dataclasses.replace(Stage(prefix=prefix), outputs={"y": key})


def validate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``closedloop validate ARGS`` in ``cwd``, with this process's (loopback) Channel Access settings."""
    return subprocess.run([sys.executable, "-m", "closedloop.cli", "validate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


# the simulated stage IOC (x1 limited to [-5, 5]) in a subprocess, on loopback; its PV prefix
ioc = test_epics.ioc


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_a_campaign_that_fits_the_ioc_passes_and_nothing_moves_or_is_written(ioc, tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    path = campaign_file(work, ioc)
    result = validate("--connect", "c.yaml", cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok c.yaml: epics-check\n")
    assert [p.name for p in work.iterdir()] == [path.name]
    assert len(read_pv(f"{ioc}x1:puts").data) == 0 and len(read_pv(f"{ioc}x2:puts").data) == 0


def test_a_range_beyond_the_ioc_motor_limits_is_a_problem_on_its_line(ioc, tmp_path) -> None:
    """x1 up to 10 where the IOC's motor record stops at 5: refused by the limits read from the IOC (DRVL/DRVH),
    which the file alone cannot know (validate without --connect says ok)."""
    path = campaign_file(tmp_path, ioc, x1_high=10)
    assert validate("c.yaml", cwd=tmp_path).returncode == 0
    result = validate("--connect", "c.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: c.yaml:{line_of(path, 'x1:')}:")
    assert "parameters.x1.bounds: 10 is refused by the instrument" in line
    assert "ok" not in result.stdout
    assert len(read_pv(f"{ioc}x1:puts").data) == 0


def test_an_output_read_from_a_data_key_no_device_of_the_ioc_reads_is_a_problem_on_its_line(ioc, tmp_path) -> None:
    path = campaign_file(tmp_path, ioc, driver="tests.test_connect:stage_reading", more=", key: det_valu")
    result = validate("--connect", "c.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: c.yaml:{line_of(path, 'driver:')}:")
    assert ("instrument.driver: tests.test_connect:stage_reading: output 'y' reads data key 'det_valu', which none "
            "of its devices reads (did you mean 'det_value'?)") in line


def test_an_ioc_that_is_not_running_is_one_line_naming_its_pvs_and_exit_1_within_the_timeout(
        monkeypatch, tmp_path) -> None:
    """No IOC serves the prefix. The stage itself would wait 30 s, twice (its ``timeout`` option); validate waits the
    2 s it was given, names the PVs that did not connect and exits 1: not a problem of the file."""
    loopback_channel_access(monkeypatch)  # no IOC started: every search goes unanswered
    prefix = f"cl{uuid.uuid4().hex[:6]}:"
    campaign_file(tmp_path, prefix, more=", timeout: 30")
    plain = validate("c.yaml", cwd=tmp_path)  # without --connect, as before: the driver is only imported
    assert plain.returncode == 0 and plain.stdout.startswith("ok c.yaml: epics-check"), plain.stderr

    started = time.monotonic()
    result = validate("--connect", "--timeout", "2", "c.yaml", cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: c.yaml: could not connect to drivers.epics_motor:Stage within 2 s: "
                           "PVs not connected: "), line
    assert f"{prefix}x1" in line
    assert result.stdout == ""
    assert elapsed < 30, f"validate took {elapsed:.1f} s: it waited for the stage's own 30 s"
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


def test_a_simulator_campaign_passes_with_connect(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text((ROOT / "campaigns" / "branin.yaml").read_text())
    result = validate("--connect", "--timeout", "2", "c.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok c.yaml: branin\n")
    assert result.stderr == ""


ASYNC_DRIVER = """\
from ophyd_async.core import init_devices

from drivers.async_stage import BraninDetector, LimitedSimMotor
from drivers.binding import InstrumentBinding


def Stage(key="det-value"):  # soft limits on the motors alone: no `limits` in the binding
    with init_devices(set_name=False):
        x1 = LimitedSimMotor(name="x1", limits=(-5, 10), instant=True)
        x2 = LimitedSimMotor(name="x2", limits=(0, 15), instant=True)
        det = BraninDetector(x1, x2, name="det")
    return InstrumentBinding(name="a", positioners={"x1": x1, "x2": x2}, detectors=[det], outputs={"y": key})
"""


def test_an_ophyd_async_devices_own_limits_and_data_keys_are_checked(tmp_path, monkeypatch) -> None:
    """Its check_value and describe are coroutines: unawaited, a range past a motor's soft limits and an output read
    from a key no device reads both passed --connect, and the station refused or failed those experiments."""
    pytest.importorskip("ophyd_async")
    from closedloop.campaign import CampaignFileError, load_campaign_text
    from closedloop.connect import LiveInstruments

    (tmp_path / "async_lab.py").write_text(ASYNC_DRIVER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("sys.dont_write_bytecode", True)
    text = CAMPAIGN.format(prefix="unused", x1_high=20, driver="async_lab:Stage", more="")
    text = text.replace('  options: {prefix: "unused"}\n', "")
    with pytest.raises(CampaignFileError) as raised:
        load_campaign_text(text, "c.yaml", connect=LiveInstruments(10))
    (problem,) = raised.value.problems
    assert (problem.path, problem.message) == ("parameters.x1.bounds", "20 is refused by the instrument: "
                                               "x1=20.0 outside soft limits [-5, 10]")
    with pytest.raises(CampaignFileError) as raised:
        load_campaign_text(text.replace("20]", "10]") + '  options: {key: "det_value"}\n', "c.yaml",
                           connect=LiveInstruments(10))
    (problem,) = raised.value.problems
    assert "output 'y' reads data key 'det_value', which none of its devices reads (did you mean 'det-value'?)" \
        in problem.message
    load_campaign_text(text.replace("20]", "10]"), "c.yaml", connect=LiveInstruments(10))


def test_an_ophyd_async_device_that_never_answers_its_limit_check_is_said_so(tmp_path, monkeypatch) -> None:
    """Its check_value awaited for ever: after the wait, the problem read '20 is refused by the instrument: ' with
    nothing after it (a timeout's text is empty)."""
    pytest.importorskip("ophyd_async")
    import closedloop.campaign
    from closedloop.campaign import CampaignFileError, load_campaign_text
    from closedloop.connect import LiveInstruments

    (tmp_path / "async_mute.py").write_text(ASYNC_DRIVER.replace("def Stage(", """\
import asyncio


class Mute(LimitedSimMotor):
    async def check_value(self, value):
        await asyncio.Event().wait()


LimitedSimMotor = Mute


def Stage(""", 1))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("sys.dont_write_bytecode", True)
    monkeypatch.setattr(closedloop.campaign, "DEVICE_ANSWER_S", 0.5)
    text = CAMPAIGN.format(prefix="unused", x1_high=10, driver="async_mute:Stage", more="")
    text = text.replace('  options: {prefix: "unused"}\n', "")
    with pytest.raises(CampaignFileError) as raised:
        load_campaign_text(text, "c.yaml", connect=LiveInstruments(10))
    messages = [p.message for p in raised.value.problems]  # each motor's range: x1's and x2's
    assert messages and all(m.endswith("is refused by the instrument: the device did not answer within 0.5 s")
                            for m in messages), messages
