"""Hostile DHT peers (issue 11, items 6 and 9): records an honest reader finds while one
address stores its whole quota of low-key records, and pm_get reply amplification.

``python bench/hostile_dht.py`` prints one row per attack; the measuring code is the
hostile test module's (tests/hostile/test_records.py), so the figures and the tests agree.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.hostile.test_records import rows  # noqa: E402

if __name__ == "__main__":
    print("\n".join(rows()))
