"""Campaign builders for planner tests."""

from __future__ import annotations

from closedloop.campaign import Campaign


def campaign(parameters: str, *, objectives: str = "y: {goal: minimize}", extra: str = "", experiments: int = 30,
             seed: int = 0, backend: str = "botorch", initial: int | None = None) -> Campaign:
    """A campaign from indented YAML snippets (``parameters`` and ``objectives`` one entry per line)."""
    indent = lambda text: "\n".join("  " + line for line in text.strip().splitlines())  # noqa: E731
    planner = f"{{backend: {backend}, seed: {seed}" + (f", initial_experiments: {initial}" if initial else "") + "}"
    return Campaign.from_yaml_text(
        f"name: t\nparameters:\n{indent(parameters)}\nobjectives:\n{indent(objectives)}\n{extra}\n"
        f"budget: {{experiments: {experiments}}}\nplanner: {planner}\n"
        "instrument: {simulator: 'simulators.surfaces:Branin'}\n",
        check_instrument=False,
    )
