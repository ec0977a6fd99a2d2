"""``smim-train`` with the faults of tests/faults.py, as a process of its own (one a test kills or holds):

    python tests/scripts/train_with_faults.py [--stop-after 6] [--slow-loader-rank 0 --loader-delay 0.5] ... \
        --config ... overrides
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faults import injected  # noqa: E402
from smim_dist import train  # noqa: E402

with injected(sys.argv[1:]) as train_args:
    sys.exit(train.main(train_args))
