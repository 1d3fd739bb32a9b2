"""Generated docs are current (they cannot drift from the code), and the README's test command is the one
CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from streaming_adapters._docs import error_sites, troubleshooting_markdown
from streaming_adapters.config import recipes_markdown
from streaming_adapters.run import list_recipes

ROOT = Path(__file__).parent.parent


def test_recipes_reference_is_current():
    assert (ROOT / "docs/recipes.md").read_text() == recipes_markdown(list_recipes()), \
        "regenerate: python -m streaming_adapters.run --docs recipes > docs/recipes.md"


def test_troubleshooting_is_current_and_every_error_has_a_fix():
    assert (ROOT / "docs/troubleshooting.md").read_text() == troubleshooting_markdown(), \
        "regenerate: python -m streaming_adapters.run --docs troubleshooting > docs/troubleshooting.md"
    sites = error_sites()
    assert len(sites) > 40
    assert all(s["fix"] for s in sites), [s for s in sites if not s["fix"]][:3]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Run the tests")[1].split("```bash")[1].split("```")[0].strip()
    assert block in (ROOT / ".ci/run").read_text(), block


def test_readme_links_exist():
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(((?:docs|launch)/[^)]+)\)", readme):
        assert (ROOT / link).exists(), link
