"""The run's messages go through the standard logging module, so an embedding program can route or silence them."""

import logging
import re

from smim_dist.config import Config
from smim_dist.run_logger import RunLogger


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
