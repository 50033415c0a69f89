"""The campaign language: models, expressions, the loader's positions and messages, YAML round trips.

The malformed-file corpus (run through the real command line) is in ``tests/campaign/``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from closedloop.campaign import (
    Budget,
    Campaign,
    CampaignFileError,
    Candidates,
    CategoricalParameter,
    ContinuousParameter,
    DiscreteParameter,
    Execution,
    FixedParameter,
    Instrument,
    IntegerParameter,
    LinearConstraint,
    Objective,
    load_campaign,
    parse_duration,
    parse_linear_constraint,
    parse_output_bound,
)
from closedloop.errors import CampaignError, ClosedLoopError

ROOT = Path(__file__).resolve().parents[1]

BASE = """\
name: t
parameters:
  x1: {type: continuous, bounds: [-5, 10]}
  x2: {type: continuous, bounds: [0, 15]}
objectives:
  y: {goal: minimize}
budget: {experiments: 10}
instrument:
  simulator: simulators.surfaces:Branin
"""


def problems_of(text: str, **kwargs) -> list:
    with pytest.raises(CampaignFileError) as info:
        Campaign.from_yaml_text(text, "c.yaml", **kwargs)
    return info.value.problems


# -- durations and expressions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90 s", 90.0), ("10 min", 600.0), ("2 h", 7200.0), ("1.5h", 5400.0), (45, 45.0), ("250 ms", 0.25), ("1 d", 86400.0)],
)
def test_durations_accept_units(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "written"), [("1 d", "1 d"), ("2 days", "2 d"), ("36 h", "36 h"), ("120", "2 min"),
                                               ("90 s", "90 s"), ("250 ms", "0.25 s")])
def test_durations_are_written_back_with_the_largest_unit_that_divides_them(text: str, written: str) -> None:
    # docs/campaign.md promises the largest unit; '1 d' was written back as '24 h'
    assert Execution(timeout=text).model_dump(mode="json")["timeout"] == written


@pytest.mark.parametrize("text", ["ten minutes", "10 parsecs", "-5 s", 0, True, "inf s", None])
def test_durations_refuse_what_is_not_a_positive_time(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_timeouts_round_trip_with_a_readable_unit() -> None:
    assert Execution(timeout="10 min").model_dump(mode="json")["timeout"] == "10 min"
    assert Execution(timeout=90).model_dump(mode="json")["timeout"] == "90 s"
    assert Execution(timeout="2 h").model_dump(mode="json")["timeout"] == "2 h"


def test_linear_constraints_collect_terms_from_both_sides() -> None:
    c = parse_linear_constraint("2 * a - b / 4 + 3 >= b + 1")
    assert c.coefficients == {"a": 2.0, "b": -1.25} and c.op == ">=" and c.rhs == -2.0
    assert c.satisfied({"a": 0, "b": 0}) and not c.satisfied({"a": -2, "b": 0})


def test_equalities_hold_to_within_a_tolerance() -> None:
    c = parse_linear_constraint("a + b + c == 1")
    assert c.satisfied({"a": 0.2, "b": 0.3, "c": 0.5 + 5e-7})
    assert not c.satisfied({"a": 0.2, "b": 0.3, "c": 0.5 + 1e-4})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("a * b <= 1", "multiplies two parameters"), ("a / b <= 1", "divides by a parameter"), ("a ** 2 <= 1", "power"),
     ("exp(a) <= 1", "calls a function"), ("a <= b <= c", "compare two sides"), ("a = 1", "write '=='"),
     ("a + <= 1", "does not parse"), ("2 <= 3", "names no parameter"), ("a / 0 <= 1", "divides by zero")],
)
def test_non_linear_or_malformed_constraints_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_linear_constraint(text)
    assert fragment in str(info.value)


def test_python_keywords_are_usable_names() -> None:
    assert parse_output_bound("yield >= 0.8").output == "yield"
    assert parse_output_bound("0.8 <= yield").op == ">="
    assert parse_linear_constraint("lambda + 2 * x <= 1").coefficients == {"lambda": 1.0, "x": 2.0}


# -- the models as a Python API ----------------------------------------------------------------


def test_python_api_builds_the_same_campaign_as_the_file() -> None:
    built = Campaign(
        name="t",
        parameters={"x1": ContinuousParameter(bounds=(-5, 10)), "x2": ContinuousParameter(bounds=(0, 15))},
        objectives={"y": Objective(goal="minimize")},
        budget=Budget(experiments=10),
        instrument=Instrument(simulator="simulators.surfaces:Branin"),
    )
    assert built == Campaign.from_yaml_text(BASE)
    assert Campaign.from_yaml_text(built.to_yaml()) == built


def test_models_are_frozen() -> None:
    c = Campaign.from_yaml_text(BASE)
    with pytest.raises(Exception):
        c.name = "other"  # type: ignore[misc]


def test_python_api_reports_cross_field_problems_as_a_campaign_error() -> None:
    with pytest.raises(CampaignError) as info:
        Campaign(
            name="t", parameters={"x": ContinuousParameter(bounds=(0, 1))}, constraints=["x + z <= 1"],
            objectives={"y": Objective(goal="minimize")}, budget=Budget(experiments=3),
            planner={"initial_experiments": 5}, instrument=Instrument(driver="drivers.lab:Robot"),
        )
    message = str(info.value)
    assert "constraints[0]" in message and "unknown parameter 'z'" in message
    assert "planner.initial_experiments: 5 initial experiments exceed the budget of 3" in message
    assert isinstance(info.value, ClosedLoopError)


def test_every_construct_round_trips_through_yaml() -> None:
    c = load_campaign(ROOT / "campaigns" / "perovskite.yaml")
    again = Campaign.from_yaml_text(c.to_yaml())
    assert again == c and again.spec_hash == c.spec_hash
    data = yaml.safe_load(c.to_yaml())
    assert data["execution"]["timeout"] == "10 min"
    assert data["parameters"]["time"] == {"type": "continuous", "bounds": [1.0, 600.0], "scale": "log", "unit": "s"}
    assert c.instrument.options["latency"] == 0.05  # '0.05 s' reaches the simulator in seconds


def camera(*, mode: str = "1d", zero: str = "", wait: float = 0.0, lag: float = 0.0) -> None:
    """A driver factory's signature, for the options check (never called)."""


def test_an_option_like_a_detector_mode_2d_reaches_the_driver_as_written() -> None:
    text = ("name: cam\nparameters:\n  x: {type: continuous, bounds: [0, 1]}\nobjectives:\n  y: {goal: minimize}\n"
            "budget: {experiments: 3}\ninstrument:\n  driver: tests.test_campaign:camera\n")
    options = Campaign.from_yaml_text(text + "  options: {mode: 2d, zero: 0d, wait: 2 days, lag: 1.5h}\n").instrument.options
    assert options == {"mode": "2d", "zero": "0d", "wait": 172800.0, "lag": 5400.0}


def test_text_that_reads_as_a_number_round_trips_quoted() -> None:
    # the loader reads 1e3 as a number (people write it so); PyYAML's own dumper would leave such text bare
    c = Campaign.from_yaml_text(
        "name: '0e0'\nparameters:\n  k: {type: categorical, values: ['1e3', x]}\n"
        "objectives: {y: {goal: minimize}}\nbudget: {experiments: 1}\n"
        "instrument: {simulator: 'simulators.surfaces:Branin'}\n", check_instrument=False)
    text = c.to_yaml()
    assert "name: '0e0'" in text and "'1e3'" in text
    assert Campaign.from_yaml_text(text, check_instrument=False) == c


def test_declared_types_are_kept() -> None:
    c = load_campaign(ROOT / "campaigns" / "perovskite.yaml")
    assert c.parameters["cycles"].bounds == (1, 10) and all(type(b) is int for b in c.parameters["cycles"].bounds)
    assert c.parameters["ratio"].values == [0.25, 0.5, 1.0, 2.0]
    assert c.parameters["solvent"].values == ["DMF", "DMSO", "GBL"]
    assert c.parameters["pressure"].value == 1.0
    assert list(c.tunable_parameters) == ["temperature", "time", "cycles", "solvent", "ratio"]
    assert c.outputs == ["quality", "cost", "yield"]
    assert c.stop_rule is not None and c.stop_rule.satisfied(0.96) and not c.stop_rule.satisfied(0.9)


def test_fixed_parameters_fold_into_the_constraints() -> None:
    text = BASE.replace("  x2: {type: continuous, bounds: [0, 15]}", "  x2: {type: fixed, value: 5}")
    c = Campaign.from_yaml_text(text + 'constraints: ["x1 + 2 * x2 <= 14"]\n')
    assert c.linear_constraints == [LinearConstraint({"x1": 1.0}, "<=", 4.0, "x1 + 2 * x2 <= 14")]


def test_integer_bounds_are_the_integers_within() -> None:
    assert IntegerParameter(bounds=(0.5, 3.2)).bounds == (1, 3)


def test_discrete_values_are_sorted_and_categorical_values_kept_in_order() -> None:
    assert DiscreteParameter(values=[2, 0.5, 1]).values == [0.5, 1.0, 2.0]
    assert CategoricalParameter(values=["b", "a", 3]).values == ["b", "a", 3]


def test_candidates_take_a_path_or_a_mapping() -> None:
    assert Candidates.model_validate("lib.csv") == Candidates(file="lib.csv")
    assert Candidates.model_validate({"file": "lib.csv", "repeats": True}).repeats


def test_default_initial_experiments_follow_the_dimension_and_the_budget() -> None:
    c = Campaign.from_yaml_text(BASE.replace("experiments: 10", "experiments: 30"))
    assert c.default_initial_experiments() == 5  # max(5, 2 d + 1) with d = 2
    assert Campaign.from_yaml_text(BASE).default_initial_experiments() == 3  # at most a third of 10
    four = BASE.replace("parameters:\n", "parameters:\n  x3: {type: integer, bounds: [0, 9]}\n"
                        "  x4: {type: categorical, values: [a, b]}\n").replace("experiments: 10", "experiments: 60")
    # the instrument (Branin) takes two parameters: not checked here
    assert Campaign.from_yaml_text(four, check_instrument=False).default_initial_experiments() == 8  # max(5, d + 4), d = 4
    assert c.model_copy(update={"planner": c.planner.model_copy(update={"initial_experiments": 3})}).default_initial_experiments() == 3
    assert "planner: botorch, 5 initial experiments" in c.summary()


def test_the_default_start_is_at_least_as_long_as_the_most_choices_of_a_category() -> None:
    ligands = ", ".join(f"L{i}" for i in range(12))
    text = BASE.replace("parameters:\n", f"parameters:\n  ligand: {{type: categorical, values: [{ligands}]}}\n")
    # d = 3 gives max(5, d + 4) = 7; twelve ligands ask for twelve, so that each may be tried before the model
    assert Campaign.from_yaml_text(text.replace("experiments: 10", "experiments: 40"),
                                   check_instrument=False).default_initial_experiments() == 12
    # still at most a third of the budget
    assert Campaign.from_yaml_text(text.replace("experiments: 10", "experiments: 30"),
                                   check_instrument=False).default_initial_experiments() == 10


# -- the space -------------------------------------------------------------------------------


def test_space_size_counts_discrete_spaces_and_is_none_for_continuous_ones() -> None:
    assert Campaign.from_yaml_text(BASE).space_size() is None
    text = BASE.replace("  x1: {type: continuous, bounds: [-5, 10]}", "  x1: {type: integer, bounds: [-5, 10]}")
    text = text.replace("  x2: {type: continuous, bounds: [0, 15]}", "  x2: {type: discrete, values: [0, 1, 2.5]}")
    c = Campaign.from_yaml_text(text)
    assert c.space_size() == 16 * 3
    assert "48 points" in c.describe_space()


def test_candidate_table_rows_are_in_declared_types(tmp_path: Path) -> None:
    campaign_file = ROOT / "campaigns" / "library.yaml"
    c = load_campaign(campaign_file)
    rows = c.candidate_table()
    assert Path(c.candidates.file).is_absolute()  # found next to the campaign file, whatever the working folder
    assert len(rows) == c.space_size() == 30
    for row in rows:
        assert list(row) == ["x1", "x2", "cycles", "catalyst"]
        assert type(row["x1"]) is float and type(row["cycles"]) is int and row["catalyst"] in ("A", "B", "C")


def test_candidate_table_may_fix_a_column_and_holds_fixed_values(tmp_path: Path) -> None:
    (tmp_path / "lib.csv").write_text("x1,x2\n1,5\n2,5\n")
    text = BASE.replace("  x2: {type: continuous, bounds: [0, 15]}", "  x2: {type: fixed, value: 5}")
    text = text.replace("{experiments: 10}", "{experiments: 2}")
    (tmp_path / "c.yaml").write_text(text + "candidates: lib.csv\n")
    c = load_campaign(tmp_path / "c.yaml")
    assert c.candidate_table() == [{"x1": 1.0, "x2": 5}, {"x1": 2.0, "x2": 5}]
    (tmp_path / "lib.csv").write_text("x1,x2\n1,5\n2,6\n")
    with pytest.raises(CampaignFileError, match="line 3, column x2: '6' differs from the fixed value 5"):
        load_campaign(tmp_path / "c.yaml")


def test_candidate_table_saved_by_excel_reads_past_its_byte_order_mark(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8" starts the file with a BOM: the table was refused, its first column "\ufeffx1"
    # "not a parameter (did you mean 'x1'?)"
    (tmp_path / "lib.csv").write_bytes("x1,x2\r\n1,5\r\n2,6\r\n".encode("utf-8-sig"))
    text = BASE.replace("{experiments: 10}", "{experiments: 2}")
    (tmp_path / "c.yaml").write_text(text + "candidates: lib.csv\n")
    c = load_campaign(tmp_path / "c.yaml")
    assert c.candidate_table() == [{"x1": 1.0, "x2": 5.0}, {"x1": 2.0, "x2": 6.0}]


def test_a_candidate_table_separated_by_semicolons_is_one_problem_saying_so(tmp_path: Path) -> None:
    # as Excel saves 'CSV' where the decimal point is a comma: two problems (the column 'x1;x2' is not a
    # parameter, no column for x1, x2) that did not name the cause
    (tmp_path / "lib.csv").write_text("x1;x2\n1,5;5\n2;6\n")
    (tmp_path / "c.yaml").write_text(BASE.replace("{experiments: 10}", "{experiments: 2}") + "candidates: lib.csv\n")
    with pytest.raises(CampaignFileError) as caught:
        load_campaign(tmp_path / "c.yaml")
    (problem,) = caught.value.problems
    assert problem.path == "candidates" and problem.message == (
        "lib.csv, line 1: the header 'x1;x2' seems to use ';' as separator; the table must be comma-separated, "
        "with '.' as decimal point")


def test_a_candidate_table_not_in_utf8_says_to_save_it_as_utf8(tmp_path: Path) -> None:
    # Excel's plain 'CSV' is Windows-1252: the message was Python's "'utf-8' codec can't decode byte 0xe9 in position 14"
    (tmp_path / "lib.csv").write_bytes("x1,x2,note\n1,5,ok\n2,6,éluat\n".encode("latin-1"))
    (tmp_path / "c.yaml").write_text(BASE.replace("{experiments: 10}", "{experiments: 2}") + "candidates: lib.csv\n")
    with pytest.raises(CampaignFileError) as caught:
        load_campaign(tmp_path / "c.yaml")
    (problem,) = caught.value.problems
    assert problem.path == "candidates" and "codec" not in problem.message
    assert problem.message.startswith("lib.csv is not UTF-8 text (line 3 has the byte 0xe9")
    assert "save it as UTF-8" in problem.message


def test_repeated_candidates_need_repeats(tmp_path: Path) -> None:
    (tmp_path / "lib.csv").write_text("x1,x2\n1,5\n1,5\n")
    text = BASE.replace("{experiments: 10}", "{experiments: 4}")
    (tmp_path / "c.yaml").write_text(text + "candidates: lib.csv\n")
    with pytest.raises(CampaignFileError, match="line 3 repeats line 2"):
        load_campaign(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text(text + "candidates: {file: lib.csv, repeats: true}\n")
    c = load_campaign(tmp_path / "c.yaml")
    assert c.candidates.repeats and len(c.candidate_table()) == 2
    assert Campaign.from_yaml_text(c.to_yaml()) == c


# -- the loader: positions, several problems at once, did-you-mean --------------------------


def test_problems_name_file_line_column_and_field_path() -> None:
    text = BASE.replace("[0, 15]", "[15, 0]")
    (problem,) = problems_of(text)
    assert (problem.source, problem.line, problem.column, problem.path) == ("c.yaml", 4, 26, "parameters.x2.bounds")
    assert str(problem).startswith("c.yaml:4:26: parameters.x2.bounds: lower bound 15 is not below upper bound 0")


def test_independent_problems_are_all_reported_in_file_order() -> None:
    text = (BASE.replace("[0, 15]", "[15, 0]").replace("minimize", "minimise").replace("{experiments: 10}", "{experiments: 0}")
            + 'constraints: ["x1 * x1 <= 2", "x1 + z <= 1"]\noutcome_constraints: ["x1 >= 2"]\n')
    problems = problems_of(text)
    assert [p.path for p in problems] == [
        "parameters.x2.bounds", "objectives.y.goal", "budget.experiments", "constraints[0]", "constraints[1]",
        "outcome_constraints[0]",
    ]
    assert [p.line for p in problems] == sorted(p.line for p in problems)


def test_a_broken_section_does_not_hide_problems_elsewhere() -> None:
    # the parameter x2 is invalid, but the constraint naming an unknown parameter is still reported
    text = BASE.replace("[0, 15]", "[15, 0]") + 'constraints: ["x1 + x3 <= 1", "x2 <= 3"]\n'
    paths = [p.path for p in problems_of(text)]
    assert paths == ["parameters.x2.bounds", "constraints[0]"]


@pytest.mark.parametrize(
    ("replace", "by", "line", "column", "message"),
    [("name: t", 'name: "t', 1, 7, 'the quoted text opened here ("t) is never closed: the file ends before its closing "'),
     ("name: t", "name: 't", 1, 7, "the quoted text opened here ('t) is never closed: the file ends before its closing '"),
     ("simulator: simulators.surfaces:Branin", 'simulator: "simulators.surfaces:Branin', 9, 14, "is never closed"),
     ("goal: minimize}", "goal: minimize", 6, 6,
      "the '{' opened here is never closed: YAML reached line 7, column 7 without its '}'"),
     ("bounds: [0, 15]}", "bounds: [0, 15}", 4, 40, "expected ',' or ']', but got '}'"),  # on one line: as before
     # closed by the next text's opening quote, the text ran over four lines and YAML failed on the last
     ("name: t", 'name: "t', None, None, None)],
)
def test_an_unclosed_quote_or_bracket_is_reported_where_it_opens(
        replace: str, by: str, line: int | None, column: int | None, message: str | None) -> None:
    # YAML notices at the file's end, or where the text after it cannot be read: the scientist needs the line it opens
    text = BASE.replace(replace, by)
    if line is None:
        text = text.replace("{experiments: 10}", '{experiments: 10, stop_when: "y <= 1"}')
        line, column, message = 1, 7, "runs on to line 7; YAML then fails at line 7, column 39"
    (problem,) = problems_of(text)
    assert (problem.line, problem.column) == (line, column), problem
    assert message in problem.message and problem.message.startswith("YAML syntax: "), problem


def test_quoted_text_and_brackets_over_several_lines_still_load() -> None:
    text = BASE.replace("bounds: [0, 15]", "bounds: [\n      0,\n      15]").replace(
        "name: t", 'name: t\ndescription: "quality: as\n  good as we can"')
    assert Campaign.from_yaml_text(text).description == "quality: as good as we can"


def test_duplicate_keys_are_reported_with_both_lines() -> None:
    (problem,) = problems_of(BASE + "budget: {experiments: 20}\n")
    assert problem.line == 10 and "also on line 7" in problem.message


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [("bounds: [-5, 10]", "bounds: [-5, 10], scael: log", "unknown key 'scael' (did you mean 'scale'?)"),
     ("goal: minimize", "goal: minimize, treshold: 3", "unknown key 'treshold' (did you mean 'threshold'?)"),
     ("budget: {experiments: 10}", "budget: {experiments: 10, stop_wen: 'y <= 1'}", "did you mean 'stop_when'?"),
     ("instrument:", "instrumnet:", "unknown key 'instrumnet' (did you mean 'instrument'?)"),
     ("type: continuous, bounds: [-5, 10]", "type: integr, bounds: [-5, 10]", "did you mean 'integer'?"),
     # abbreviated or capitalized goals had no suggestion: too short for difflib against 'maximize'
     ("goal: minimize", "goal: max", "'max' is not allowed; use 'minimize' or 'maximize' (did you mean 'maximize'?)"),
     ("goal: minimize", "goal: min", "did you mean 'minimize'?"),
     ("goal: minimize", "goal: Max", "did you mean 'maximize'?"),
     ("goal: minimize", "goal: maximise", "did you mean 'maximize'?")],
)
def test_did_you_mean(replace: str, by: str, message: str) -> None:
    assert any(message in p.message for p in problems_of(BASE.replace(replace, by, 1)))


def test_yaml_booleans_are_not_taken_for_choices() -> None:
    text = BASE.replace("  x2: {type", "  valve: {type: categorical, values: [on, off]}\n  x2: {type")
    problems = problems_of(text, check_instrument=False)
    assert problems[0].path == "parameters.valve.values[0]" and "quote it" in problems[0].message


def test_the_instrument_check_can_be_left_to_the_station() -> None:
    text = BASE.replace("simulator: simulators.surfaces:Branin", "driver: lab_only_module:Robot")
    assert "cannot import 'lab_only_module'" in str(problems_of(text)[0])
    assert Campaign.from_yaml_text(text, check_instrument=False).instrument.driver == "lab_only_module:Robot"


def test_a_driver_module_in_the_working_folder_off_the_path_is_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `closedloop validate` beside the lab's own mylab.py: Python's path has the script's folder, not this one
    (tmp_path / "spin_lab_driver.py").write_text("def Coater():\n    raise RuntimeError('never called')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    text = BASE.replace("simulator: simulators.surfaces:Branin", "driver: spin_lab_driver:Coater")
    message = problems_of(text)[0].message
    assert "spin_lab_driver.py is in the working folder" in message and "PYTHONPATH=." in message


def test_a_function_in_the_working_folder_is_not_said_to_fail_to_import_beside_another_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compute station imports a function from the working folder, and a right file's check does too; with a
    wrong bound elsewhere in the file, the check said the module did not import (add the folder to PYTHONPATH)."""
    (tmp_path / "mysim.py").write_text("def f(**parameters):\n    return {'y': 0.0}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    text = BASE.replace("simulator: simulators.surfaces:Branin", "function: mysim:f")
    problems = problems_of(text.replace("bounds: [0, 15]", "bounds: [15, 0]"))
    assert [p.path for p in problems] == ["parameters.x2.bounds"], problems
    problems = problems_of(text.replace("bounds: [0, 15]", "bounds: [15, 0]").replace("mysim:f", "mysim:g"))
    assert [p.path for p in problems] == ["parameters.x2.bounds"], problems  # the attribute is checked once it loads


def test_a_driver_module_beside_the_campaign_file_run_from_elsewhere_is_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `closedloop validate lab/campaign.yaml` from the folder above: the hint was a look-alike, "did you mean 'optparse'?"
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "spin_lab_driver.py").write_text("def Coater():\n    raise RuntimeError('never called')\n")
    (lab / "campaign.yaml").write_text(BASE.replace("simulator: simulators.surfaces:Branin", "driver: spin_lab_driver:Coater"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", ".", str(tmp_path), str(lab))])
    with pytest.raises(CampaignFileError) as raised:
        load_campaign(Path("lab") / "campaign.yaml")
    message = raised.value.problems[0].message
    assert "lab/spin_lab_driver.py is beside the campaign file" in message and "PYTHONPATH=lab " in message


def test_a_value_an_allowed_values_rule_refuses_is_a_problem_of_the_file(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # the robot has DMF and DMSO loaded: a campaign choosing GBL validated, and every trial choosing it was refused
    (tmp_path / "solvent_robot.py").write_text(
        "from ophyd import Signal\nfrom ophyd.sim import SynAxis\n"
        "from drivers.binding import AllowedValues, InstrumentBinding\n"
        "def Robot():\n    t = SynAxis(name='t')\n"
        "    return InstrumentBinding(name='robot', positioners={'x1': t, 'x2': SynAxis(name='u')},\n"
        "                             signals={'solvent': Signal(name='solvent', value='DMF')}, detectors=[t],\n"
        "                             outputs={'y': 't'}, safety=[AllowedValues('solvent', ('DMF', 'DMSO'))])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("sys.dont_write_bytecode", True)
    text = BASE.replace("simulator: simulators.surfaces:Branin", "simulator: solvent_robot:Robot").replace(
        "  x2: {type: continuous, bounds: [0, 15]}\n",
        "  x2: {type: continuous, bounds: [0, 15]}\n  solvent: {type: categorical, values: [DMF, GBL]}\n")
    (problem,) = problems_of(text)
    assert problem.path == "parameters.solvent.values"
    assert problem.message == "'GBL' is refused by the instrument: not one of ['DMF', 'DMSO']"
    Campaign.from_yaml_text(text.replace("[DMF, GBL]", "[DMF, DMSO]"), "c.yaml")


def test_a_simulators_own_limits_are_checked_against_the_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a SynAxis has no limits; the binding's `limits` are the instrument's, enforced by the engine at each trial
    (tmp_path / "limited_oven.py").write_text(
        "from ophyd.sim import SynAxis\nfrom drivers.binding import InstrumentBinding\n"
        "def Oven():\n    t = SynAxis(name='t')\n"
        "    return InstrumentBinding(name='oven', positioners={'x1': t, 'x2': SynAxis(name='u')}, detectors=[t],\n"
        "                             outputs={'y': 't'}, limits={'x1': (-5.0, 5.0)})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("sys.dont_write_bytecode", True)
    text = BASE.replace("simulator: simulators.surfaces:Branin", "simulator: limited_oven:Oven")
    (problem,) = problems_of(text)
    assert problem.path == "parameters.x1.bounds"
    assert problem.message == "10 is refused by the instrument: outside its limits [-5, 5]"


def test_a_driver_is_imported_but_never_called(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lab_driver.py").write_text(
        "CALLS = []\ndef Robot(*, port, speed=1.0):\n    CALLS.append(port)\n    raise RuntimeError('hardware touched')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("sys.dont_write_bytecode", True)
    text = BASE.replace("simulator: simulators.surfaces:Branin", "driver: lab_driver:Robot")
    assert "lab_driver:Robot needs the option 'port'" in str(problems_of(text)[0])
    bad = text + "  options: {port: /dev/ttyS0, sped: 2}\n"
    assert "takes no option 'sped' (did you mean 'speed'?)" in str(problems_of(bad)[0])
    good = Campaign.from_yaml_text(text + "  options: {port: /dev/ttyS0}\n")
    import lab_driver  # type: ignore[import-not-found]

    assert good.instrument.driver == "lab_driver:Robot" and lab_driver.CALLS == []


def test_a_ctrl_c_while_the_instrument_module_loads_is_an_interruption_not_a_campaign_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while ophyd built a device class came wrapped ("RuntimeError: Error calling __set_name__ on
    'ADComponent' instance 'cam'"), and `closedloop run` said the campaign's instrument could not be imported (exit 2)."""
    (tmp_path / "interrupted_driver.py").write_text(
        "class Component:\n    def __set_name__(self, owner, name):\n        raise KeyboardInterrupt\n"
        "class Camera:\n    cam = Component()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("sys.dont_write_bytecode", True)
    text = BASE.replace("simulator: simulators.surfaces:Branin", "simulator: interrupted_driver:Camera")
    with pytest.raises(KeyboardInterrupt):
        problems_of(text)


def test_load_campaign_reports_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(CampaignFileError, match="cannot read the file"):
        load_campaign(tmp_path / "missing.yaml")


# -- the schema -------------------------------------------------------------------------------


def test_the_json_schema_accepts_every_example_and_refuses_typos() -> None:
    schema = Campaign.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted((ROOT / "campaigns").glob("*.yaml")):
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert not errors, (path.name, [e.message for e in errors])
    typo = yaml.safe_load(BASE.replace("bounds: [-5, 10]", "bound: [-5, 10]"))
    assert list(validator.iter_errors(typo))
    assert json.loads(json.dumps(schema))["title"] == "closedloop campaign"


def test_models_reject_non_finite_and_boolean_numbers() -> None:
    with pytest.raises(Exception):
        ContinuousParameter(bounds=(0, math.inf))
    with pytest.raises(Exception):
        Budget(experiments=True)  # type: ignore[arg-type]
    with pytest.raises(Exception):
        FixedParameter(value=math.nan)


def test_scientific_notation_is_a_number() -> None:
    # YAML 1.1 (PyYAML) reads 1e-3 as text; a scientist means a number
    text = BASE.replace("  x2: {type: continuous, bounds: [0, 15]}", "  x2: {type: continuous, bounds: [1e-3, 1E1], scale: log}")
    c = Campaign.from_yaml_text(text)
    assert c.parameters["x2"].bounds == (0.001, 10.0)
    assert Campaign.from_yaml_text(c.to_yaml()) == c


def test_schema_command_prints_the_models_schema() -> None:
    from typer.testing import CliRunner

    from closedloop.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == Campaign.json_schema()


# -- discrete whole numbers -------------------------------------------------------------------------

COUNTS = """\
name: counts
parameters:
  tips: {type: discrete, values: [4, 1, 2]}
  ratio: {type: discrete, values: [0.5, 1, 2]}
objectives:
  y: {goal: minimize}
budget: {experiments: 5}
instrument: {simulator: 'simulators.surfaces:Branin'}
"""


def test_discrete_whole_numbers_stay_ints_through_yaml_and_decimals_make_all_floats() -> None:
    """A count of tips written [1, 2, 4] was held as [1.0, 2.0, 4.0], and a driver's range(n) failed on 4.0."""
    campaign = Campaign.from_yaml_text(COUNTS, check_instrument=False)
    tips, ratio = campaign.parameters["tips"], campaign.parameters["ratio"]
    assert isinstance(tips, DiscreteParameter) and isinstance(ratio, DiscreteParameter)
    assert tips.values == [1, 2, 4] and all(type(v) is int for v in tips.values)
    assert ratio.values == [0.5, 1.0, 2.0] and all(type(v) is float for v in ratio.values)
    assert "values: [1, 2, 4]" in campaign.to_yaml()
    again = Campaign.from_yaml_text(campaign.to_yaml(), check_instrument=False)
    assert [type(v) for v in again.parameters["tips"].values] == [int, int, int]  # type: ignore[union-attr]
    assert again.spec_hash == campaign.spec_hash
    assert tips.allowed(4.0) == 4 and type(tips.allowed(4.0)) is int and tips.allowed(3) is None


def test_a_store_begun_when_discrete_counts_were_floats_still_takes_the_same_file(tmp_path: Path) -> None:
    """Such a store holds the file as [1.0, 2.0, 4.0]: resuming it must not read as a different definition."""
    from closedloop.store import Store

    campaign = Campaign.from_yaml_text(COUNTS, check_instrument=False)
    floats = {n: p.model_copy(update={"values": [float(v) for v in p.values]})  # type: ignore[union-attr]
              for n, p in campaign.parameters.items()}
    legacy = campaign.model_copy(update={"parameters": floats})
    assert "values: [1.0, 2.0, 4.0]" in legacy.to_yaml()
    store = Store(tmp_path / "s.db")
    first = store.open_campaign(legacy)
    assert store.open_campaign(campaign) == first
    changed = Campaign.from_yaml_text(COUNTS.replace("[4, 1, 2]", "[4, 1, 3]"), check_instrument=False)
    with pytest.raises(ClosedLoopError, match="different definition"):
        store.open_campaign(changed)


def test_a_threshold_on_the_only_objective_is_refused_pointing_to_stop_when() -> None:
    """'yield: {goal: maximize, threshold: 80}' was accepted and ignored (it is the Pareto reference of several)."""
    text = BASE.replace("y: {goal: minimize}", "y: {goal: maximize, threshold: 80}")
    with pytest.raises(CampaignFileError) as caught:
        Campaign.from_yaml_text(text, check_instrument=False)
    [problem] = caught.value.problems
    assert (problem.path, problem.line) == ("objectives.y.threshold", 6)
    assert 'budget.stop_when: "y >= 80"' in problem.message
    two = text.replace("budget:", "  z: {goal: minimize, threshold: 2.5}\nbudget:")
    assert Campaign.from_yaml_text(two, check_instrument=False).objectives["y"].threshold == 80


@pytest.mark.parametrize(
    ("goal", "rule", "instead"),
    [("maximize", "y < 0.1", "'y >= 0.1'"), ("maximize", "y <= 0.1", "'y >= 0.1'"), ("maximize", "0.1 >= y", "'y >= 0.1'"),
     ("minimize", "y > 5", "'y <= 5'"), ("minimize", "y >= 5", "'y <= 5'"), ("minimize", "-2.5 <= y", "'y <= -2.5'")],
)
def test_a_stop_when_pointing_against_the_goal_is_refused(goal: str, rule: str, instead: str) -> None:
    # met by the first, poor, results: a campaign maximizing y with 'y < 0.1' stopped at about its first experiment
    text = BASE.replace("{goal: minimize}", f"{{goal: {goal}}}").replace(
        "{experiments: 10}", f'{{experiments: 10, stop_when: "{rule}"}}')
    (problem,) = problems_of(text)
    assert (problem.path, problem.line, problem.column) == ("budget.stop_when", 7, 27)
    assert problem.message.startswith(f"{rule!r} points against the goal: y is {goal}d")
    assert problem.message.endswith(f"to stop once y is good enough, write {instead}")


def test_a_stop_when_with_the_goal_or_on_an_output_without_one_is_accepted() -> None:
    several = BASE.replace("y: {goal: minimize}", "y: {goal: minimize}\n  z: {goal: maximize}")
    for text, rule in [(BASE, "y <= 0.5"), (BASE, "y < 0.5"), (several, "z >= 3"), (several, "y <= 1"),
                       # an output of outcome_constraints has no goal to point against
                       (BASE + 'outcome_constraints: ["w <= 3"]\n', "w >= 1")]:
        c = Campaign.from_yaml_text(text.replace("{experiments: 10}", f'{{experiments: 10, stop_when: "{rule}"}}'),
                                    check_instrument=False)
        assert c.budget.stop_when == rule
    (problem,) = problems_of(several.replace("{experiments: 10}", '{experiments: 10, stop_when: "z <= 3"}'),
                             check_instrument=False)
    assert problem.path == "budget.stop_when" and "z is maximized" in problem.message


def test_a_store_begun_with_a_stop_when_against_the_goal_still_reads(tmp_path: Path) -> None:
    """Refused in a campaign file since 2026-12-07; a store holding a campaign run with one must still open."""
    from closedloop.store import Store

    campaign = Campaign.from_yaml_text(BASE, check_instrument=False)
    legacy = campaign.model_copy(update={"budget": campaign.budget.model_copy(update={"stop_when": "y >= 5"})})
    store = Store(tmp_path / "s.db")
    store.open_campaign(legacy)
    assert store.campaign("t").budget.stop_when == "y >= 5"
    with pytest.raises(CampaignFileError, match="points against the goal"):
        Campaign.from_yaml_text(legacy.to_yaml(), check_instrument=False)  # a file is held to today's rules


def test_a_budget_beyond_a_billion_experiments_is_refused() -> None:
    # 10**400 validated, and the botorch planner failed at its first model-based proposal (OverflowError converting
    # it to a float); a PostgreSQL store numbers experiments in 32-bit integers
    limit = BASE.replace("{experiments: 10}", "{experiments: 1_000_000_000}")
    assert Campaign.from_yaml_text(limit).max_experiments == 1_000_000_000
    for given, shown in [("1_000_000_001", "1,000,000,001"), ("10000000000", "10,000,000,000"),
                         ("1" + "0" * 400, "a number of 401 digits")]:
        (problem,) = problems_of(BASE.replace("{experiments: 10}", f"{{experiments: {given}}}"))
        assert (problem.path, problem.line, problem.column) == ("budget.experiments", 7, 10)
        assert problem.message.startswith(f"must be at most 1,000,000,000, got {shown}: no campaign runs that many")
    with pytest.raises(ValueError, match="at most 1,000,000,000"):
        Budget(experiments=10**10)
    assert Campaign.json_schema()["$defs"]["Budget"]["properties"]["experiments"]["maximum"] == 1_000_000_000


def test_a_number_longer_than_python_reads_is_a_problem_with_its_position() -> None:
    # past sys.get_int_max_str_digits() (4,300) YAML's int() raised ValueError: exit 1 and no line
    (problem,) = problems_of(BASE.replace("{experiments: 10}", "{experiments: 1" + "0" * 5000 + "}"))
    assert (problem.line, problem.column) == (7, 23)
    assert problem.message == "YAML syntax: a whole number of 5,001 digits is longer than any value of a campaign can be"
    assert Campaign.from_yaml_text(BASE.replace("{experiments: 10}", "{experiments: 0x1F}")).budget.experiments == 31


MULTIFIDELITY = ROOT / "campaigns" / "branin_multifidelity.yaml"


def test_a_budget_in_cost_that_buys_beyond_a_billion_experiments_is_refused() -> None:
    text = MULTIFIDELITY.read_text().replace("  cost: 12\n", "  cost: 1e300\n").replace("cost: 0.1", "cost: 1e-300")
    (problem,) = problems_of(text)
    assert problem.path == "budget.cost" and problem.message.startswith(
        "1e+300 buys endlessly many experiments at the cheapest source ('simulation', cost 1e-300)")
    (problem,) = problems_of(text.replace("1e300", "1e7"))
    assert "1e+07 buys 1e+307 experiments" in problem.message
    # with experiments too, they bound it: what the cost buys had raised OverflowError (math.ceil of infinity)
    both = Campaign.from_yaml_text(text.replace("  cost: 1e300\n", "  cost: 1e300\n  experiments: 40\n"))
    assert both.max_experiments == 40 and both.default_initial_experiments() == 5


def test_a_store_begun_with_a_budget_refused_since_still_reads(tmp_path: Path) -> None:
    from closedloop.store import Store

    campaign = Campaign.from_yaml_text(BASE, check_instrument=False)
    legacy = campaign.model_copy(update={"budget": campaign.budget.model_copy(update={"experiments": 10**10})})
    store = Store(tmp_path / "s.db")
    store.open_campaign(legacy)
    assert store.campaign("t").max_experiments == 10**10
    with pytest.raises(CampaignFileError, match="must be at most 1,000,000,000"):
        Campaign.from_yaml_text(legacy.to_yaml(), check_instrument=False)  # a file is held to today's rules


def test_a_store_begun_with_names_and_values_refused_since_still_reads(tmp_path: Path) -> None:
    """A parameter named 'status', a name with a combining accent, values with spaces at their ends or a line break,
    10 and "10": refused in a campaign file since 2026-12-06, but stores hold campaigns run with them, and every
    command that reads one (show, export, report, status) failed on its copy of the file."""
    import unicodedata

    from closedloop.campaign import CategoricalParameter, ContinuousParameter
    from closedloop.store import Store

    campaign = Campaign.from_yaml_text(BASE, check_instrument=False)
    nfd = unicodedata.normalize("NFD", "température")
    legacy = campaign.model_copy(update={
        "parameters": {"status": ContinuousParameter(bounds=(0, 1)), nfd: ContinuousParameter(bounds=(0, 1)),
                       "cat": CategoricalParameter.model_construct(values=[" lead", "a\nb", 10, "10"])},
        "objectives": {"error": Objective(goal="minimize")}})
    store = Store(tmp_path / "s.db")
    store.open_campaign(legacy)
    stored = store.campaign("t")
    assert list(stored.parameters) == ["status", nfd, "cat"] and list(stored.objectives) == ["error"]
    assert stored.parameters["cat"].values == [" lead", "a\nb", 10, "10"]
    with pytest.raises(CampaignFileError, match="is a column of every table of trials"):
        Campaign.from_yaml_text(legacy.to_yaml(), check_instrument=False)  # a file is held to today's rules


def test_a_store_begun_with_invisible_characters_in_its_values_still_reads(tmp_path: Path) -> None:
    """'DMF' and 'DMF' with a zero-width space, a right-to-left override: refused in a campaign file since
    2026-12-06, but a store that holds a campaign run with them must still open (show, export, resume)."""
    from closedloop.campaign import CategoricalParameter, FixedParameter
    from closedloop.store import Store

    campaign = Campaign.from_yaml_text(BASE, check_instrument=False)
    values = ["DMF", "DMF\u200b", "\u202eFMD"]
    legacy = campaign.model_copy(update={"parameters": {
        **campaign.parameters, "solvent": CategoricalParameter.model_construct(values=values),
        "vial": FixedParameter.model_construct(value="A\ufeff1")}})
    store = Store(tmp_path / "s.db")
    store.open_campaign(legacy)
    stored = store.campaign("t")
    assert stored.parameters["solvent"].values == values and stored.parameters["vial"].value == "A\ufeff1"
    with pytest.raises(CampaignFileError, match=r"holds U\+200B \(ZERO WIDTH SPACE\)"):
        Campaign.from_yaml_text(legacy.to_yaml(), check_instrument=False)  # a file is held to today's rules


def test_a_store_begun_with_a_lone_surrogate_in_its_description_still_reads(tmp_path: Path) -> None:
    """A "\\ud800" escape (half of a UTF-16 pair): refused in a campaign file since 2026-12-07 (the campaign ran,
    and its report failed writing report.html), but a store begun with one must still open (status, show)."""
    from closedloop.store import Store

    legacy = Campaign.from_yaml_text(BASE, check_instrument=False).model_copy(update={"description": "a \ud800 b"})
    store = Store(tmp_path / "s.db")
    store.open_campaign(legacy)
    assert store.campaign("t").description == "a \ud800 b"
    with pytest.raises(CampaignFileError, match="holds a lone surrogate"):
        Campaign.from_yaml_text(legacy.to_yaml(), check_instrument=False)  # a file is held to today's rules


def test_text_values_keep_the_joiners_that_emoji_and_some_scripts_need() -> None:
    text = BASE.replace("  x2:", '  tool: {type: categorical, values: ["\U0001f469\u200d\U0001f52c", "\u0915\u094d\u200d\u0937"]}\n  x2:')
    values = Campaign.from_yaml_text(text, check_instrument=False).parameters["tool"].values
    assert values == ["\U0001f469\u200d\U0001f52c", "\u0915\u094d\u200d\u0937"]


def test_a_store_begun_with_a_threshold_on_the_only_objective_still_opens_and_resumes(tmp_path: Path) -> None:
    """Such a file was run (the threshold ignored) before it was refused: the store still reads, and takes the file
    without the threshold, which runs the same; a file that stops at the threshold instead is a different one."""
    from closedloop.store import Store

    campaign = Campaign.from_yaml_text(BASE, check_instrument=False)
    legacy = campaign.model_copy(update={"objectives": {"y": Objective(goal="minimize", threshold=3.0)}})
    store = Store(tmp_path / "s.db")
    first = store.open_campaign(legacy)
    assert store.campaign("t") == campaign
    assert store.open_campaign(campaign) == first
    stopping = Campaign.from_yaml_text(BASE.replace("experiments: 10", "experiments: 10, stop_when: 'y <= 3'"),
                                       check_instrument=False)
    with pytest.raises(ClosedLoopError, match="different definition.*budget.stop_when"):
        store.open_campaign(stopping)
