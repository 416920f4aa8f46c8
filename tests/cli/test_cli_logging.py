"""`--verbose` / `--quiet`: which of the library's log messages the CLI shows on stderr, and in what form."""

import logging

import pytest

import kinema.doctor
from kinema.cli import main

REPORT = {"kinema": "0"}


@pytest.fixture
def chatty_doctor(monkeypatch):
    """`kinema doctor` whose report logs one message at each level, from a module logger as library code does."""
    library_logger = logging.getLogger("kinema.doctor")

    def report():
        library_logger.debug("debug detail")
        library_logger.info("read 3 files")
        library_logger.warning("the page cache is\nnearly empty")
        library_logger.error("no GPU found")
        return REPORT

    monkeypatch.setattr(kinema.doctor, "doctor_report", report)


@pytest.mark.parametrize(("options", "shown"), [
    ([], ["kinema: warning: the page cache is nearly empty", "kinema: error: no GPU found"]),
    (["--verbose"], ["kinema: info: read 3 files", "kinema: warning: the page cache is nearly empty",
                     "kinema: error: no GPU found"]),
    (["--quiet"], ["kinema: error: no GPU found"]),
])
@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_follows_verbose_and_quiet_before_or_after_the_command(capsys, chatty_doctor, options, shown,
                                                                         where):
    args = [*options, "doctor", "--json"] if where == "before" else ["doctor", "--json", *options]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == '{"kinema": "0"}\n'  # the report alone on stdout
    assert err.splitlines() == shown


def test_the_kinema_logger_is_as_before_after_main(capsys, chatty_doctor):
    logger = logging.getLogger("kinema")
    before = (logger.level, logger.propagate, list(logger.handlers))
    assert main(["doctor", "--verbose"]) == 0
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_verbose_and_quiet_together_is_bad_usage(capsys, chatty_doctor):
    assert main(["--verbose", "doctor", "--quiet"]) == 2
    assert capsys.readouterr().err == ("kinema doctor: error: --verbose and --quiet contradict each other; give one "
                                       "of them\n")


def test_library_progress_bars_switches_them_for_the_block_only(monkeypatch):
    import os

    from transformers.utils import logging as transformers_logging

    from kinema.log import HUB_BARS_OFF, library_progress_bars

    monkeypatch.delenv(HUB_BARS_OFF, raising=False)
    transformers_logging.enable_progress_bar()
    with library_progress_bars(shown=True):
        assert transformers_logging.is_progress_bar_enabled() and HUB_BARS_OFF not in os.environ
    with library_progress_bars(shown=False):
        assert not transformers_logging.is_progress_bar_enabled() and os.environ[HUB_BARS_OFF] == "1"
    assert transformers_logging.is_progress_bar_enabled() and HUB_BARS_OFF not in os.environ
    monkeypatch.setenv(HUB_BARS_OFF, "0")  # the caller's own setting comes back
    with library_progress_bars(shown=False):
        assert os.environ[HUB_BARS_OFF] == "1"
    assert os.environ[HUB_BARS_OFF] == "0"
