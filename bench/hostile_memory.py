"""Pre-authentication memory attack (issue 11, item 2): a server process under 64 connections
that each announce a 512 MiB handshake frame and stall; prints one JSON row per transport
(RSS growth and peak of the server, honest-call latency calm and under attack).

``python bench/hostile_memory.py [--tree DIR] [--transports tcp,quic] [--attackers N]``;
``--tree`` runs the server from another checkout, e.g. the code before the fix:
``git worktree add /tmp/before <commit>`` then ``--tree /tmp/before``. The measuring code
is ``tests/hostile/test_preauth_memory.py`` (its test asserts the same figures).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hostile.test_preauth_memory import main  # noqa: E402

if __name__ == "__main__":
    main()
