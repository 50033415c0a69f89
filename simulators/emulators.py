"""Emulators of real experiments: a regression model fitted once to a public dataset, as an instrument.

Each emulator answers anywhere in its dataset's space with the fitted model's mean (plus the usual
realism options: ``noise``, ``latency``, ``exposure``, ``drift``, ``seed``, ``failure_rate``,
``hang_rate``, ``heteroscedastic``), under the dataset's own parameter and output names.

The model is a Gaussian process (scikit-learn, Matern 5/2 with one length scale per input, a
white-noise term, normalized targets) on inputs scaled to [0, 1] with categoricals one-hot encoded,
fitted to the replicate-averaged data. It is fitted once and cached (pickle) in ``cache_dir``
(default ``$CLOSEDLOOP_CACHE/emulators``, else ``~/.cache/closedloop/emulators``), keyed by a hash
of the data, the model settings and the scikit-learn version, so a changed dataset or library refits.
Needs the ``emulators`` extra (``pip install closedloop[emulators]``).

| name (``simulators.emulators:``) | data | parameters | outputs | training error (RMSE, stated bound) |
|---|---|---|---|---|
| ``AgNP`` | Liang 2021, AgNP (164 unique of 3295 rows) | ``QAgNO3(%)`` 4.5–42.85, ``Qpva(%)`` 9.99–40.01, ``Qtsc(%)`` 0.5–30.5, ``Qseed(%)`` 0.49–19.5, ``Qtot(uL/min)`` 200–983 | ``loss`` (minimize) | 0.030 (< 0.05; data std 0.195) |
| ``CrossedBarrel`` | Liang 2021, crossed barrel (600 unique of 1800) | ``n`` integer 6–12, ``theta`` 0–200, ``r`` 1.5–2.5, ``t`` 0.7–1.4 | ``toughness`` (maximize) | 2.0 J (< 3 J; data std 10.8 J) |
| ``SuzukiReizman`` (``case`` 1–4) | Reizman 2016 Suzuki, case 1 (96 rows, 81 distinct) | ``catalyst`` categorical (8), ``t_res`` 60–600, ``temperature`` 30–110, ``catalyst_loading`` 0.48–2.52 | ``yld``, ``ton`` (maximize) | case 1: yld 4.5 %, ton 2.4; cases 2-4: yld 1.6-5.4 %, ton 1.3-5.2 (all < 8; data std 12-37 and 5-32) |

Data: ``simulators/data/<dataset>/`` (copied unchanged with the dataset's LICENSE and SOURCE.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from closedloop.errors import DeviceError
from drivers.binding import InstrumentBinding
from simulators.devices import Axis, Choice, simulated_instrument

log = logging.getLogger("simulators.emulators")

DATA_DIR = Path(__file__).resolve().parent / "data"
MODEL_VERSION = "gp-matern52-ard-1"


def default_cache_dir() -> Path:
    root = os.environ.get("CLOSEDLOOP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "closedloop") / "emulators"


@dataclass(frozen=True)
class DatasetSpec:
    """What an emulator is fitted to: a CSV, its inputs (numeric bounds or categorical values) and outputs."""

    name: str
    path: Path
    numeric: dict[str, tuple[float, float]]
    categorical: dict[str, tuple[str, ...]]
    outputs: dict[str, tuple[float, float]]  # output -> physical range the answers are clipped to
    integer: tuple[str, ...] = ()
    read_options: dict[str, Any] = field(default_factory=dict)

    @property
    def inputs(self) -> list[str]:
        return [*self.categorical, *self.numeric]

    def frame(self) -> pd.DataFrame:
        """The data with replicates averaged (one row per distinct input)."""
        data = pd.read_csv(self.path, **self.read_options)
        data = data[[*self.inputs, *self.outputs]]
        return data.groupby(self.inputs, as_index=False, sort=True)[list(self.outputs)].mean()

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``n x d`` model inputs: one-hot categoricals, then numerics scaled to [0, 1] by their bounds."""
        columns: list[np.ndarray] = []
        for name, values in self.categorical.items():
            given = [str(r[name]) for r in rows]
            unknown = sorted(set(given) - set(values))
            if unknown:
                raise DeviceError(f"{self.name}: {name} {unknown} not among {list(values)}")
            columns.extend(np.array([g == v for g in given], dtype=float) for v in values)
        for name, (low, high) in self.numeric.items():
            columns.append((np.array([float(r[name]) for r in rows]) - low) / (high - low))
        return np.column_stack(columns)


class Emulator:
    """A fitted model per output of one dataset; ``predict`` answers anywhere in the space."""

    def __init__(self, spec: DatasetSpec, models: dict[str, Any]):
        self.spec = spec
        self.models = models

    @classmethod
    def load(cls, spec: DatasetSpec, cache_dir: str | Path | None = None) -> Emulator:
        """The cached model for ``spec``, fitting (and caching) it first if there is none."""
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache / f"{spec.name}-{cls._key(spec)}.pkl"
        if path.exists():
            try:
                with path.open("rb") as handle:
                    return cls(spec, pickle.load(handle))  # noqa: S301 - our own cache, keyed by content hash
            except Exception as exc:  # a truncated or foreign file: refit rather than fail the campaign
                log.warning("refitting %s: cached model %s unreadable (%s)", spec.name, path, exc)
        emulator = cls(spec, cls._fit(spec))
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        with partial.open("wb") as handle:
            pickle.dump(emulator.models, handle)
        partial.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one
        return emulator

    @staticmethod
    def _key(spec: DatasetSpec) -> str:
        import sklearn

        digest = hashlib.sha256(spec.path.read_bytes())
        digest.update(repr((MODEL_VERSION, sklearn.__version__, spec.numeric, spec.categorical, spec.outputs)).encode())
        return digest.hexdigest()[:16]

    @staticmethod
    def _fit(spec: DatasetSpec) -> dict[str, Any]:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
        from threadpoolctl import threadpool_limits

        data = spec.frame()
        x = spec.encode(data.to_dict("records"))
        models = {}
        for output in spec.outputs:
            kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(
                length_scale=np.full(x.shape[1], 0.3), length_scale_bounds=(1e-2, 1e2), nu=2.5
            ) + WhiteKernel(1e-3, (1e-8, 1.0))
            model = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=0, random_state=0)
            # One BLAS thread: these matrices are small, and threads only fight on a shared machine.
            with warnings.catch_warnings(), threadpool_limits(1):
                # An input the output ignores drives its length scale to the bound: expected, not a fault.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x, data[output].to_numpy(dtype=float))
            log.info("fitted %s emulator for %s: %s", spec.name, output, model.kernel_)
            models[output] = model
        return models

    def predict(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Each output's predicted mean at ``rows``, clipped to its physical range."""
        x = self.spec.encode(rows)
        return {o: np.clip(m.predict(x), *self.spec.outputs[o]) for o, m in self.models.items()}

    def __call__(self, point: Mapping[str, Any]) -> dict[str, float]:
        return {o: float(v[0]) for o, v in self.predict([point]).items()}


def emulator_instrument(
    name: str, spec: DatasetSpec, *, cache_dir: str | Path | None = None, **options: Any
) -> InstrumentBinding:
    emulator = Emulator.load(spec, cache_dir)
    inputs: list[Axis | Choice] = [Choice(n, v) for n, v in spec.categorical.items()]
    inputs += [Axis(n, low, high, integer=n in spec.integer) for n, (low, high) in spec.numeric.items()]
    return simulated_instrument(name, inputs, list(spec.outputs), emulator, extras={"emulator": emulator}, **options)


_LIANG = DATA_DIR / "liang2021_materials_bo"
_REIZMAN = DATA_DIR / "reizman2016_suzuki"

AGNP = DatasetSpec(
    name="agnp",
    path=_LIANG / "AgNP_dataset.csv",
    # Bounds enclose every row (the README's rounded ranges cut a few off by 1e-3).
    numeric={"QAgNO3(%)": (4.5, 42.85), "Qpva(%)": (9.99, 40.01), "Qtsc(%)": (0.5, 30.5), "Qseed(%)": (0.49, 19.5),
             "Qtot(uL/min)": (200.0, 983.0)},
    categorical={},
    outputs={"loss": (0.0, np.inf)},
)

CROSSED_BARREL = DatasetSpec(
    name="crossed-barrel",
    path=_LIANG / "Crossed_barrel_dataset.csv",
    numeric={"n": (6.0, 12.0), "theta": (0.0, 200.0), "r": (1.5, 2.5), "t": (0.7, 1.4)},
    categorical={},
    outputs={"toughness": (0.0, np.inf)},
    integer=("n",),
)

SUZUKI_CATALYSTS = ("P1-L1", "P1-L2", "P1-L3", "P1-L4", "P1-L5", "P1-L6", "P1-L7", "P2-L1")


def suzuki_spec(case: int) -> DatasetSpec:
    if case not in (1, 2, 3, 4):
        raise DeviceError(f"SuzukiReizman: case must be 1, 2, 3 or 4, got {case!r}")
    return DatasetSpec(
        name=f"suzuki-reizman-{case}",
        path=_REIZMAN / f"reizman_suzuki_case_{case}.csv",
        numeric={"t_res": (60.0, 600.0), "temperature": (30.0, 110.0), "catalyst_loading": (0.48, 2.52)},
        categorical={"catalyst": SUZUKI_CATALYSTS},
        outputs={"yld": (0.0, 100.0), "ton": (0.0, np.inf)},
        read_options={"skiprows": [1]},  # Summit's "TYPE,DATA,..." metadata row
    )


def AgNP(**options: Any) -> InstrumentBinding:
    """Silver-nanoparticle flow synthesis (Mekki-Berrada 2021): five flow-rate ratios -> ``loss`` (minimize).

    Best in the data: loss 0.1313 at QAgNO3 32.50, Qpva 16, Qtsc 6.50, Qseed 4.50, Qtot 850.
    """
    return emulator_instrument("agnp", AGNP, **options)


def CrossedBarrel(**options: Any) -> InstrumentBinding:
    """3D-printed crossed-barrel toughness (Gongora 2020): n, theta, r, t -> ``toughness`` in J (maximize).

    Best in the data: 51.54 J (one replicate; 46.7 J replicate mean) at n=12, theta=200, r=1.7, t=1.4.
    """
    return emulator_instrument("crossed-barrel", CROSSED_BARREL, **options)


def SuzukiReizman(*, case: int = 1, **options: Any) -> InstrumentBinding:
    """Suzuki-Miyaura coupling in flow (Reizman 2016, one of 4 substrate cases) -> ``yld`` (%) and ``ton``.

    Both are maximized in the original work. Best in the data for case 1: yld 98.7 with P1-L4,
    t_res 189 s, 110 degC, loading 2.51 %.
    """
    return emulator_instrument(f"suzuki-reizman-{case}", suzuki_spec(case), **options)
