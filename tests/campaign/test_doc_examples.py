"""Every YAML block in the README and docs/ is a campaign that loads, or a part of one that loads in the
example campaign it names: a reader copies these blocks into their own files.

A block that is not a whole campaign says which example it belongs in, on the line before it:
``<!-- campaign-fragment: campaigns/mixture.yaml -->``; its top-level keys replace the example's.
``unchecked-instrument`` after the path loads it as ``check_instrument=False`` does, for a block that
names a lab's own module (``drivers.mylab``) that no host here can import.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from closedloop.campaign import CampaignFileError, load_campaign_text

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- campaign-fragment: (?P<base>\S+)(?P<unchecked> unchecked-instrument)? -->\n)?"
                   r"```yaml\n(?P<text>.*?)```", re.S)
TOP_KEY = re.compile(r"^([A-Za-z_]\w*):", re.M)


def _blocks() -> list[tuple[str, re.Match[str]]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("text"))
            found.append((f"{page.relative_to(ROOT)}:{line}", match))
    return found


BLOCKS = _blocks()


def _merged(base: str, fragment: str) -> str:
    """The example ``base`` with every top-level key that ``fragment`` sets replaced by the fragment's."""
    replaced = set(TOP_KEY.findall(fragment))
    if "sources" in replaced:
        replaced.add("instrument")
    if "instrument" in replaced:
        replaced.add("sources")
    kept, skipping = [], False
    for line in (ROOT / base).read_text().splitlines(keepends=True):
        key = TOP_KEY.match(line)
        if key:
            skipping = key.group(1) in replaced
        if not skipping:
            kept.append(line)
    return "".join(kept) + fragment


def test_the_pages_have_their_campaign_examples() -> None:
    assert sum(where.startswith("docs/campaign.md") for where, _ in BLOCKS) >= 6


@pytest.mark.parametrize("where, match", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_every_yaml_block_loads(where: str, match: re.Match[str]) -> None:
    base = match.group("base")
    text = _merged(base, match.group("text")) if base else match.group("text")
    folder = (ROOT / base).parent if base else ROOT / "campaigns"
    try:
        campaign = load_campaign_text(text, where, base=folder, check_instrument=not match.group("unchecked"))
    except CampaignFileError as exc:
        pytest.fail(f"{where}: the block does not load"
                    f"{' in ' + base if base else ' (a fragment needs a campaign-fragment comment)'}:\n{exc}")
    assert campaign.summary()
