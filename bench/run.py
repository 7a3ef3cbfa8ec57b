"""End-to-end benchmark runner (the same as `allegro-fast bench`); see allegro_fast/bench_cli.py.

    python bench/run.py                         # default plan for this device, JSON under bench/results/
    python bench/run.py --quick --device cpu    # dry run in seconds
    python bench/run.py --cases ag256 ag2048 aspirin --providers torch reference nequip --rounds 3 --plot
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout without `pip install -e .`

from allegro_fast.bench_cli import main

if __name__ == "__main__":
    sys.exit(main())
