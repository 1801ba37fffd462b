"""Evaluation job: ``python jobs/evaluate.py --labels ... --weights ... --report ...``."""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the project is the working directory, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
