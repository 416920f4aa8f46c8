"""docs/bundled.md and the README's first command: every `kinema` command in their bash blocks parses with kinema's
own argument parser, the recipe names configs that exist, and the page's held-out combinations are the ones the
eval reports apart."""

import re
import shlex
from pathlib import Path

from kinema.cli import build_parser
from kinema.eval.prompts import HELD_OUT_COMBINATIONS

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "bundled.md"
README = ROOT / "README.md"


def bash_blocks(markdown: str) -> list[str]:
    """The text of every ```bash block, in order."""
    return re.findall(r"^```bash\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


def commands(block: str) -> list[list[str]]:
    """Each shell command of a block as its words: backslash-continued lines joined, a quoted string spanning lines
    kept whole, comments dropped, `a && b` split into its commands."""
    found: list[list[str]] = []
    pending = ""
    for line in block.splitlines():
        pending += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on on the next line
            pending += "\n"
            continue
        pending = ""
        command: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if command:
                    found.append(command)
                command = []
            else:
                command.append(word)
    assert not pending.strip(), f"unfinished command at the end of a block: {pending!r}"
    return found


def kinema_commands(markdown: str) -> list[list[str]]:
    return [command for block in bash_blocks(markdown) for command in commands(block) if command[0] == "kinema"]


def test_every_kinema_command_on_the_page_parses():
    found = kinema_commands(DOC.read_text())
    parser = build_parser()
    for command in found:
        args = parser.parse_args(command[1:])  # argparse exits (failing the test) on a bad option
        assert args.command is not None, command
    used = {(command[1], command[2]) if command[1] == "data" else command[1] for command in found}
    assert {"generate", "extend", "eval", "init-model", "train", ("data", "synth")} <= used


def test_the_recipe_names_configs_that_exist():
    configs = [word for command in kinema_commands(DOC.read_text()) if command[1] == "train" for word in command
               if word.endswith(".yaml")]
    assert len(configs) >= 6
    for config in configs:
        assert (ROOT / config).is_file(), config


def test_the_held_out_combinations_are_the_evals():
    text = DOC.read_text()
    synth = next(command for command in kinema_commands(text) if command[1:3] == ["data", "synth"])
    held_out = synth[synth.index("--hold-out") + 1].split(",")
    assert [tuple(combo.split(":")) for combo in held_out] == list(HELD_OUT_COMBINATIONS)
    table = re.findall(r"^\| (\w+) \| (\w+) \| (\w+) \|$", text, flags=re.MULTILINE)
    assert [row for row in table if row != ("colour", "shape", "motion")] == list(HELD_OUT_COMBINATIONS)


def test_the_readmes_first_command_installs_then_generates_on_the_bundled_model():
    first = commands(bash_blocks(README.read_text())[0])
    assert any(command[:4] == ["pip", "install", "-c", "constraints.txt"] for command in first)
    generate = [command for command in first if command[:2] == ["kinema", "generate"]]
    assert len(generate) == 1 and "--model" not in generate[0]
    args = build_parser().parse_args(generate[0][1:])
    assert args.model is None and args.prompt == "a red circle moving right"
