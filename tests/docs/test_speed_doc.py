"""docs/speed.md: every option it names is one `kinema generate` takes, every benchmark it names exists, and the
preset table's step counts are the presets'."""

import re
from pathlib import Path

from kinema.cli import build_parser
from kinema.pipelines.speed import SPEED_PRESETS

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "speed.md").read_text()


def generate_options() -> set[str]:
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    return {option for action in generate._actions for option in action.option_strings}


def test_every_option_on_the_page_is_a_generate_option():
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", DOC))
    assert {"--speed", "--compile", "--quantize", "--cache-interval", "--cfg-truncation", "--dtype"} <= named
    assert named <= generate_options()


def test_every_benchmark_on_the_page_exists_and_the_preset_table_has_the_presets_steps():
    for script in set(re.findall(r"benchmarks/([a-z_]+\.py)", DOC)):
        assert (ROOT / "benchmarks" / script).is_file(), script
    rows = dict(re.findall(r"^\| `([a-z]+)` \| [^|]+ \| (\d+|[^|]+) \|", DOC, flags=re.MULTILINE))
    for name, settings in SPEED_PRESETS.items():
        if "steps" in settings:
            assert rows[name].strip() == str(settings["steps"]), name
