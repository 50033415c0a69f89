"""The benchmark suite: pure functions with a known optimum, each described by a campaign.

A :class:`Problem` pairs a :class:`~closedloop.campaign.Campaign` (the search space, objectives,
outcome constraints and budget every planner sees) with ``evaluate``, the noiseless truth, and the
noise the planners observe on top of it. Regret is always measured on the truth.

The emulators of real experiments are nearest-neighbour look-ups into the published tables (the
replicates averaged): a proposal gets the measured value of the closest experiment actually run,
so the optimum is exactly the best measured value and no fitted model decides the answer.

Example:
    >>> problem = PROBLEMS["branin"]()
    >>> round(problem.evaluate({"x1": 9.42478, "x2": 2.475})["y"], 4)
    0.3979
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from closedloop.campaign import Campaign, CategoricalParameter

#: The project's own copies of the public data sets (with their licenses and sources).
DATASETS = Path(__file__).resolve().parents[2] / "simulators" / "data"

# The bench evaluates functions directly; the campaign still names an importable factory.
_INSTRUMENT = {"driver": "closedloop.bench.problems:caller_evaluates"}


def caller_evaluates(**options: Any) -> None:
    """Stands in for an instrument: the benchmark evaluates each proposal itself."""
    return None


@dataclass
class Problem:
    """A benchmark problem.

    Attributes:
        name: short name used on the command line and in the JSON.
        campaign: what the planners see (backend and seed are set per run).
        evaluate: noiseless outputs of one experiment, by output name.
        optimum: the best attainable objective value, or the maximum hypervolume (two objectives).
        worst: the worst objective value over the space (single objective), for the 1 % range.
        noise: standard deviation of Gaussian noise added to each objective before a planner sees it.
        reference: the hypervolume reference point, in the objectives' own units (two objectives).
        source: where the problem comes from.
    """

    name: str
    campaign: Campaign
    evaluate: Callable[[dict[str, Any]], dict[str, float]]
    optimum: float
    worst: float
    noise: float = 0.0
    reference: list[float] | None = None
    source: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    blind: bool = False

    @property
    def objective(self) -> str:
        return next(iter(self.campaign.objectives))

    @property
    def minimize(self) -> bool:
        return self.campaign.objectives[self.objective].goal == "minimize"

    @property
    def multi_objective(self) -> bool:
        return len(self.campaign.objectives) > 1

    @property
    def budget(self) -> int:
        return self.campaign.budget.experiments

    @property
    def range(self) -> float:
        """The optimum's range: |worst − optimum|, or the maximum hypervolume for two objectives."""
        return abs(self.worst - self.optimum)

    def feasible(self, truth: dict[str, float]) -> bool:
        return all(b.satisfied(truth[b.output]) for b in self.campaign.output_bounds)

    def with_budget(self, experiments: int) -> Problem:
        data = self.campaign.model_dump(mode="json")
        data["budget"] = {"experiments": max(2, experiments)}
        return Problem(**{**self.__dict__, "campaign": Campaign.model_validate(data)})

    def for_seed(self, seed: int) -> Problem:
        """The problem as one seed's run sees it: with ``blind``, each categorical parameter's choices
        relabelled ``<parameter>-<k>`` in an order drawn from the seed.

        Names carry an accidental order: in the direct-arylation table the best ligand is the second of
        twelve alphabetically (mixed4's scales are named in the order of their values), and a planner
        that breaks ties by candidate order (BayBE enumerates its candidates sorted) finds it by its
        name: after a random first experiment, its second takes the first base and ligand in that order
        that differ from the first's.
        """
        if not self.blind:
            return self
        rng = np.random.default_rng([seed, zlib.crc32(self.name.encode())])
        data = self.campaign.model_dump(mode="json")
        real: dict[str, dict[str, Any]] = {}
        for name, p in self.campaign.tunable_parameters.items():
            if isinstance(p, CategoricalParameter):
                order = rng.permutation(len(p.values))
                labels = {f"{name}-{k + 1:02d}": p.values[int(i)] for k, i in enumerate(order)}
                real[name] = labels
                data["parameters"][name]["values"] = list(labels)
        evaluate = self.evaluate

        def blinded(point: dict[str, Any]) -> dict[str, float]:
            return evaluate({k: real[k][v] if k in real else v for k, v in point.items()})

        return Problem(**{**self.__dict__, "campaign": Campaign.model_validate(data), "evaluate": blinded})

    def describe(self) -> dict[str, Any]:
        return {
            "dimensions": len(self.campaign.tunable_parameters),
            "parameters": {n: p.type for n, p in self.campaign.tunable_parameters.items()},
            "objectives": {n: o.goal for n, o in self.campaign.objectives.items()},
            "outcome_constraints": list(self.campaign.outcome_constraints),
            "budget": self.budget,
            "optimum": self.optimum,
            "worst": self.worst,
            "range": self.range,
            "noise_sd": self.noise,
            "reference_point": self.reference,
            "source": self.source,
            "blinded": self.blind,
            **self.notes,
        }


def _campaign(name: str, parameters: dict[str, Any], objectives: dict[str, Any], budget: int,
              outcome_constraints: list[str] | None = None) -> Campaign:
    return Campaign.model_validate({
        "name": name,
        "parameters": parameters,
        "objectives": objectives,
        "outcome_constraints": outcome_constraints or [],
        "budget": {"experiments": budget},
        "instrument": _INSTRUMENT,
    })


_WORST: dict[str, float] = {}


def _grid_worst(f: Callable[[np.ndarray], np.ndarray], lows: np.ndarray, highs: np.ndarray, minimize: bool) -> float:
    """The worst value of a vectorized ``f`` over 2^14 Sobol points of the box (the range's far end)."""
    key = f"{getattr(f, '__name__', f)}{lows.tolist()}{highs.tolist()}{minimize}"
    if key not in _WORST:
        _WORST[key] = _sobol_worst(f, lows, highs, minimize)
    return _WORST[key]


def _sobol_worst(f: Callable[[np.ndarray], np.ndarray], lows: np.ndarray, highs: np.ndarray, minimize: bool) -> float:
    from scipy.stats import qmc

    u = qmc.Sobol(len(lows), scramble=True, seed=0).random(2**14)
    values = f(lows + u * (highs - lows))
    return float(values.max() if minimize else values.min())


# -- synthetic functions ------------------------------------------------------------------------


def _branin(x1: np.ndarray | float, x2: np.ndarray | float) -> Any:
    return ((x2 - 5.1 / (4 * math.pi**2) * x1**2 + 5 / math.pi * x1 - 6) ** 2
            + 10 * (1 - 1 / (8 * math.pi)) * np.cos(x1) + 10)


def _branin_rows(x: np.ndarray) -> np.ndarray:
    return _branin(x[:, 0], x[:, 1])


_HARTMANN_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8],
                        [17, 8, 0.05, 10, 0.1, 14]])
_HARTMANN_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                               [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])
_HARTMANN_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
HARTMANN6_OPTIMUM = -3.322368011391339  # at (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573)
BRANIN_OPTIMUM = 0.39788735772973816


def hartmann6(x: np.ndarray) -> np.ndarray:
    """Hartmann6 on ``[0, 1]^6`` for ``n x 6`` points; minimum −3.322368."""
    x = np.atleast_2d(x)
    inner = ((x[:, None, :] - _HARTMANN_P[None]) ** 2 * _HARTMANN_A[None]).sum(-1)
    return -(np.exp(-inner) * _HARTMANN_ALPHA).sum(-1)


# Ackley's minimum sits at the centre of the usual box, which Ax's and others' initial designs
# probe first; shifting it keeps the problem honest.
_ACKLEY_SHIFT = np.array([7.1, -11.3, 3.7, 15.9, -5.3])


def ackley5(x: np.ndarray) -> np.ndarray:
    """Ackley in 5-D on ``[-32.768, 32.768]^5``, minimum 0 at :data:`_ACKLEY_SHIFT`."""
    z = np.atleast_2d(x) - _ACKLEY_SHIFT
    d = z.shape[-1]
    return (-20 * np.exp(-0.2 * np.sqrt((z**2).sum(-1) / d)) - np.exp(np.cos(2 * math.pi * z).sum(-1) / d)
            + 20 + math.e)


def _pointwise(names: list[str], f: Callable[[np.ndarray], np.ndarray], output: str) -> Callable[[dict], dict]:
    def evaluate(parameters: dict[str, Any]) -> dict[str, float]:
        return {output: float(f(np.array([[float(parameters[n]) for n in names]]))[0])}
    return evaluate


def branin(noise: float = 0.0) -> Problem:
    c = _campaign("branin", {"x1": {"type": "continuous", "bounds": [-5, 10]},
                             "x2": {"type": "continuous", "bounds": [0, 15]}}, {"y": {"goal": "minimize"}}, 30)
    worst = _grid_worst(_branin_rows, np.array([-5.0, 0]), np.array([10.0, 15]), True)
    return Problem("noisy_branin" if noise else "branin", c, lambda p: {"y": float(_branin(p["x1"], p["x2"]))},
                   BRANIN_OPTIMUM, worst, noise, source="Branin-Hoo" + (f", Gaussian noise sd {noise}" if noise else ""))


def hartmann(noise: float = 0.0) -> Problem:
    names = [f"x{i}" for i in range(1, 7)]
    c = _campaign("hartmann6", {n: {"type": "continuous", "bounds": [0, 1]} for n in names}, {"y": {"goal": "minimize"}},
                  60)
    worst = _grid_worst(hartmann6, np.zeros(6), np.ones(6), True)
    return Problem("noisy_hartmann6" if noise else "hartmann6", c, _pointwise(names, hartmann6, "y"), HARTMANN6_OPTIMUM,
                   worst, noise, source="Hartmann6" + (f", Gaussian noise sd {noise}" if noise else ""))


def ackley() -> Problem:
    names = [f"x{i}" for i in range(1, 6)]
    c = _campaign("ackley5", {n: {"type": "continuous", "bounds": [-32.768, 32.768]} for n in names},
                  {"y": {"goal": "minimize"}}, 50)
    worst = _grid_worst(ackley5, np.full(5, -32.768), np.full(5, 32.768), True)
    return Problem("ackley5", c, _pointwise(names, ackley5, "y"), 0.0, worst,
                   source=f"Ackley 5-D, minimum shifted to {_ACKLEY_SHIFT.tolist()}")


# Two continuous and two categorical inputs: the category c2 reflects or swaps the continuous
# coordinates and scales the surface, c1 adds an offset, so the best value needs the right pair.
_MIXED_SCALE = {"p": 1.0, "q": 1.3, "r": 1.6, "s": 2.0}
_MIXED_OFFSET = {"a": 0.5, "b": 0.0, "c": 1.0}


def _mixed_value(u1: float, u2: float, c1: str, c2: str) -> float:
    if c2 == "q":
        u1 = 1 - u1
    elif c2 == "r":
        u1, u2 = u2, u1
    elif c2 == "s":
        u1, u2 = 1 - u2, 1 - u1
    return _MIXED_SCALE[c2] * float(_branin(-5 + 15 * u1, 15 * u2)) / 50 + _MIXED_OFFSET[c1]


def mixed() -> Problem:
    c = _campaign("mixed4", {"u1": {"type": "continuous", "bounds": [0, 1]}, "u2": {"type": "continuous", "bounds": [0, 1]},
                             "c1": {"type": "categorical", "values": list(_MIXED_OFFSET)},
                             "c2": {"type": "categorical", "values": list(_MIXED_SCALE)}},
                  {"y": {"goal": "minimize"}}, 40)
    optimum = min(_MIXED_SCALE.values()) * BRANIN_OPTIMUM / 50 + min(_MIXED_OFFSET.values())
    worst = max(_MIXED_SCALE.values()) * _grid_worst(_branin_rows, np.array([-5.0, 0]),
                                                      np.array([10.0, 15]), True) / 50 + max(_MIXED_OFFSET.values())
    return Problem("mixed4", c, lambda p: {"y": _mixed_value(p["u1"], p["u2"], p["c1"], p["c2"])}, optimum, worst,
                   source="2 continuous + 2 categorical (3 and 4 choices): scaled, reflected Branin plus offsets; "
                          "choices blinded per seed", blind=True)


def _gramacy(x1: Any, x2: Any) -> tuple[Any, Any, Any]:
    c1 = 1.5 - x1 - 2 * x2 - 0.5 * np.sin(2 * math.pi * (x1**2 - 2 * x2))
    c2 = x1**2 + x2**2 - 1.5
    return x1 + x2, c1, c2


def constrained() -> Problem:
    c = _campaign("gramacy", {"x1": {"type": "continuous", "bounds": [0, 1]}, "x2": {"type": "continuous", "bounds": [0, 1]}},
                  {"y": {"goal": "minimize"}}, 30, ["c1 <= 0", "c2 <= 0"])

    def evaluate(p: dict[str, Any]) -> dict[str, float]:
        y, c1, c2 = _gramacy(float(p["x1"]), float(p["x2"]))
        return {"y": float(y), "c1": float(c1), "c2": float(c2)}

    return Problem("constrained", c, evaluate, 0.5998, 2.0,
                   source="Gramacy et al. 2016 toy problem: minimize x1 + x2 under two black-box constraints")


def _currin(x1: Any, x2: Any) -> Any:
    x2 = np.maximum(x2, 1e-12)
    factor = 1 - np.exp(-1 / (2 * x2))
    return factor * (2300 * x1**3 + 1900 * x1**2 + 2092 * x1 + 60) / (100 * x1**3 + 500 * x1**2 + 4 * x1 + 20)


def two_objective() -> Problem:
    c = _campaign("branin_currin", {"x1": {"type": "continuous", "bounds": [0, 1]},
                                    "x2": {"type": "continuous", "bounds": [0, 1]}},
                  {"branin": {"goal": "minimize", "threshold": 18.0}, "currin": {"goal": "minimize", "threshold": 6.0}}, 40)

    def evaluate(p: dict[str, Any]) -> dict[str, float]:
        x1, x2 = float(p["x1"]), float(p["x2"])
        return {"branin": float(_branin(15 * x1 - 5, 15 * x2)), "currin": float(_currin(x1, x2))}

    max_hv = 59.36011874867746  # BoTorch's BraninCurrin, reference point (18, 6)
    return Problem("two_objective", c, evaluate, max_hv, 0.0, reference=[18.0, 6.0],
                   source="BraninCurrin (BoTorch); regret is the maximum hypervolume minus the hypervolume reached")


# -- emulators of real experiments ----------------------------------------------------------------


class NearestNeighbour:
    """The measured value of the nearest experiment run, in coordinates scaled to the unit cube."""

    def __init__(self, x: np.ndarray, y: np.ndarray, lows: np.ndarray, highs: np.ndarray):
        self.lows, self.span = lows, np.where(highs > lows, highs - lows, 1.0)
        self.x, self.y = (x - lows) / self.span, y

    def __call__(self, point: np.ndarray) -> float:
        d = (((point - self.lows) / self.span - self.x) ** 2).sum(-1)
        return float(self.y[int(np.argmin(d))])


@cache
def _table(path: str, skip: tuple[int, ...] = ()) -> Any:
    import pandas as pd

    return pd.read_csv(path, encoding="utf-8-sig", skiprows=list(skip))


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"data set {path} is missing (the emulators read simulators/data/)")
    return path


def agnp() -> Problem:
    data = _table(str(_require(DATASETS / "liang2021_materials_bo" / "AgNP_dataset.csv")))
    inputs = list(data.columns[:-1])
    mean = data.groupby(inputs, as_index=False)["loss"].mean()
    names = ["q_agno3", "q_pva", "q_tsc", "q_seed", "q_tot"]
    lows, highs = mean[inputs].min().to_numpy(float), mean[inputs].max().to_numpy(float)
    model = NearestNeighbour(mean[inputs].to_numpy(float), mean["loss"].to_numpy(float), lows, highs)
    c = _campaign("agnp", {n: {"type": "continuous", "bounds": [float(lo), float(hi)]} for n, lo, hi in zip(names, lows, highs)},
                  {"loss": {"goal": "minimize"}}, 40)
    return Problem("agnp", c, lambda p: {"loss": model(np.array([float(p[n]) for n in names]))},
                   float(mean["loss"].min()), float(mean["loss"].max()),
                   source="Liang et al. 2021 AgNP (Mekki-Berrada et al. 2021): nearest neighbour of 164 averaged points",
                   notes={"inputs": dict(zip(names, inputs))})


def crossed_barrel() -> Problem:
    data = _table(str(_require(DATASETS / "liang2021_materials_bo" / "Crossed_barrel_dataset.csv")))
    inputs = ["n", "theta", "r", "t"]
    mean = data.groupby(inputs, as_index=False)["toughness"].mean()
    lows, highs = mean[inputs].min().to_numpy(float), mean[inputs].max().to_numpy(float)
    model = NearestNeighbour(mean[inputs].to_numpy(float), mean["toughness"].to_numpy(float), lows, highs)
    c = _campaign("crossed_barrel", {
        "n": {"type": "discrete", "values": sorted(float(v) for v in mean["n"].unique())},
        "theta": {"type": "continuous", "bounds": [float(lows[1]), float(highs[1])]},
        "r": {"type": "continuous", "bounds": [float(lows[2]), float(highs[2])]},
        "t": {"type": "discrete", "values": sorted(float(v) for v in mean["t"].unique())},
    }, {"toughness": {"goal": "maximize"}}, 40)
    return Problem("crossed_barrel", c, lambda p: {"toughness": model(np.array([float(p[n]) for n in inputs]))},
                   float(mean["toughness"].max()), float(mean["toughness"].min()),
                   source="Liang et al. 2021 crossed barrel (Gongora et al. 2020): nearest neighbour of 600 averaged designs")


def suzuki() -> Problem:
    # Summit's CSV: row 2 is a "TYPE,DATA,..." metadata row
    data = _table(str(_require(DATASETS / "reizman2016_suzuki" / "reizman_suzuki_case_1.csv")), (1,))
    numeric = ["t_res", "temperature", "catalyst_loading"]
    mean = data.groupby(["catalyst", *numeric], as_index=False)["yld"].mean()
    lows, highs = mean[numeric].min().to_numpy(float), mean[numeric].max().to_numpy(float)
    # the nearest experiment run with the same catalyst: a catalyst is a different reaction, not a neighbour
    models = {c: NearestNeighbour(rows[numeric].to_numpy(float), rows["yld"].to_numpy(float), lows, highs)
              for c, rows in mean.groupby("catalyst")}
    c = _campaign("suzuki", {
        "catalyst": {"type": "categorical", "values": sorted(models)},
        **{n: {"type": "continuous", "bounds": [float(lo), float(hi)]} for n, lo, hi in zip(numeric, lows, highs)},
    }, {"yld": {"goal": "maximize"}}, 40)
    return Problem("suzuki", c, lambda p: {"yld": models[p["catalyst"]](np.array([float(p[n]) for n in numeric]))},
                   float(mean["yld"].max()), float(mean["yld"].min()),
                   source=f"Reizman et al. 2016 Suzuki-Miyaura, case 1: nearest neighbour, same catalyst, of {len(mean)} "
                          "averaged experiments; catalysts blinded per seed", blind=True)


def direct_arylation() -> Problem:
    root = _require(DATASETS / "shields2021_direct_arylation")
    data = _table(str(root / "experiment_index.csv"))
    names = {}
    for kind in ("Base", "Ligand", "Solvent"):
        table = _table(str(root / f"{kind.lower()}-list.csv"))
        names[kind] = dict(zip(table[f"{kind}_SMILES"], table[kind]))
    lookup: dict[tuple, float] = {}
    for row in data.itertuples(index=False):
        key = (names["Base"][row.Base_SMILES], names["Ligand"][row.Ligand_SMILES], names["Solvent"][row.Solvent_SMILES],
               float(row.Concentration), float(row.Temp_C))
        lookup[key] = float(row._6)
    c = _campaign("direct_arylation", {
        "base": {"type": "categorical", "values": sorted({k[0] for k in lookup})},
        "ligand": {"type": "categorical", "values": sorted({k[1] for k in lookup})},
        "solvent": {"type": "categorical", "values": sorted({k[2] for k in lookup})},
        "concentration": {"type": "discrete", "values": sorted({k[3] for k in lookup})},
        "temperature": {"type": "discrete", "values": sorted({k[4] for k in lookup})},
    }, {"yield": {"goal": "maximize"}}, 40)

    def evaluate(p: dict[str, Any]) -> dict[str, float]:
        return {"yield": lookup[(p["base"], p["ligand"], p["solvent"], float(p["concentration"]), float(p["temperature"]))]}

    return Problem("direct_arylation", c, evaluate, max(lookup.values()), min(lookup.values()),
                   source="Shields et al. 2021 direct arylation: the full 1,728-experiment table, reagents "
                          "blinded per seed", blind=True)


#: Every problem of the suite, by name, as factories (emulators read their data only when built).
PROBLEMS: dict[str, Callable[[], Problem]] = {
    "branin": branin,
    "noisy_branin": lambda: branin(noise=1.0),
    "hartmann6": hartmann,
    "noisy_hartmann6": lambda: hartmann(noise=0.1),
    "ackley5": ackley,
    "mixed4": mixed,
    "constrained": constrained,
    "two_objective": two_objective,
    "agnp": agnp,
    "crossed_barrel": crossed_barrel,
    "direct_arylation": direct_arylation,
    "suzuki": suzuki,
}


def parameter_kinds(campaign: Campaign) -> set[str]:
    """The parameter types a campaign uses (``continuous``, ``categorical``...)."""
    kinds = set()
    for p in campaign.tunable_parameters.values():
        kinds.add(p.type)
    return kinds

