"""The run's messages go through the standard logging module, so an embedding program can route or silence them."""

import io
import logging
import re
import sys
import time

import pytest

from smim_dist.config import Config
from smim_dist.run_logger import RunLogger, duration


def test_messages_reach_logging_handlers_and_stderr_with_a_timestamp(tmp_path, capfd):
    cfg = Config(output_dir=str(tmp_path), run_name="run")
    cfg.log.wandb_mode = "disabled"  # wandb offline is covered by the journeys; here only the messages matter
    cfg.run_dir.mkdir(parents=True)
    seen, mine = [], logging.Handler()
    mine.emit = lambda record: seen.append(record.getMessage())
    package_logger = logging.getLogger("smim_dist")
    others = list(package_logger.handlers)  # pytest's own capture handlers, in some sessions
    package_logger.addHandler(mine)
    try:
        for progress in (True, False):
            cfg.log.progress = progress
            logger = RunLogger(cfg, True, total_steps=10, start_step=0)
            logger.info(f"hello with progress={progress}")
            logger.close()
        RunLogger(cfg, False, total_steps=10, start_step=0).info("from another rank")
    finally:
        package_logger.removeHandler(mine)
    assert seen == ["hello with progress=True", "hello with progress=False"]
    assert package_logger.handlers == others, "each run logger removes the handler it added"
    err = capfd.readouterr().err
    assert re.search(r"\[\d\d:\d\d:\d\d\] hello with progress=True", err)
    assert re.search(r"\[\d\d:\d\d:\d\d\] hello with progress=False", err)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_the_bar_is_drawn_on_a_terminal_only_and_the_log_line_carries_the_eta(tmp_path, monkeypatch, terminal):
    """Under SLURM or with the output redirected, a bar's carriage returns would leave fragments in the log."""
    stream = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    cfg = Config(output_dir=str(tmp_path), run_name="run")
    cfg.log.wandb_mode = "disabled"  # only the terminal output matters here
    cfg.run_dir.mkdir(parents=True)
    logger = RunLogger(cfg, True, total_steps=10, start_step=0)
    assert logger.eta(2) is None, "no pace before a step is logged"
    logger.log(2, {"loss": 1.0})
    logger.first_logged = (2, time.time() - 8.0)  # 4 s a step since step 2
    assert logger.eta(4) == pytest.approx(6 * 4.0, rel=0.01)
    logger.advance(4)
    logger.close()
    assert ("\r" in stream.getvalue()) == terminal


@pytest.mark.parametrize("seconds, text", [(None, "-"), (42, "42s"), (425, "7m05s"), (12000, "3h20m"),
                                           (187200, "2d04h")])
def test_durations_read_at_a_glance(seconds, text):
    assert duration(seconds) == text
