"""Fault injection for tests and audits: a worker that lies about its outputs on purpose.

Only with ``PYMESH_TEST_FAULTS=1`` and ``PYMESH_TEST_CORRUPT=<p>`` (``WorkerSettings``
refuses the second without the first). Each computed step, with probability ``p`` (a
``random.Random`` seeded with ``PYMESH_TEST_CORRUPT_SEED``), the worker lies in the way
``PYMESH_TEST_CORRUPT_MODE`` names:

- ``noise``: the output gets Gaussian noise of 0.5 x its RMS before it is hashed and signed:
  a consistent liar whose receipts match its bad tensors (only re-running catches it);
- ``equivocate``: the client gets the honest output and a receipt for it, the next hop a
  noisy one with a second, validly signed receipt (the last hop behaves as ``noise``);
- ``receipt``: honest tensors, but the signed receipt names another output digest.
"""

from __future__ import annotations

import hashlib
import logging
import random

from pymesh.proto.frames import TensorBlob
from pymesh.settings import CORRUPT_MODES, WorkerSettings

log = logging.getLogger(__name__)

#: noise std as a fraction of the output's RMS
NOISE_SCALE = 0.5


class Corruptor:
    """Decides per step whether (and how) to lie, and makes the lies (seeded)."""

    def __init__(self, p: float, mode: str, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"corruption probability {p} is not in 0..1")
        if mode not in CORRUPT_MODES:
            raise ValueError(f"corruption mode {mode!r} is not one of {', '.join(CORRUPT_MODES)}")
        self.p = p
        self.mode = mode
        self.seed = seed
        self.rng = random.Random(seed)
        self.lies = 0

    @classmethod
    def from_settings(cls, ws: WorkerSettings) -> "Corruptor | None":
        """The worker's corruptor, or None unless ``test_faults`` is on and ``test_corrupt`` > 0."""
        if not ws.test_faults or ws.test_corrupt <= 0:
            return None
        c = cls(ws.test_corrupt, ws.test_corrupt_mode, ws.test_corrupt_seed)
        log.warning("TEST FAULTS: this worker corrupts its outputs on purpose (mode %s, probability %g, seed %d); "
                    "for tests and audits only, never in a real swarm", c.mode, c.p, c.seed)
        return c

    def decide(self) -> str | None:
        """One draw per step: the mode to lie with now, or None (honest)."""
        if self.p <= 0 or self.rng.random() >= self.p:
            return None
        self.lies += 1
        return self.mode

    def noisy(self, blob: TensorBlob) -> TensorBlob:
        """``blob`` + Gaussian noise of std NOISE_SCALE x its RMS (1.0 for an all-zero output, so
        the lie always changes it), in the blob's dtype."""
        import torch

        from pymesh.model.blobs import blob_to_tensor, tensor_to_blob

        x = blob_to_tensor(blob)
        xf = x.float()
        rms = float(xf.pow(2).mean().sqrt()) if xf.numel() else 0.0
        std = NOISE_SCALE * rms if rms > 0 and rms == rms else 1.0
        gen = torch.Generator().manual_seed(self.rng.getrandbits(63))
        noise = torch.randn(xf.shape, generator=gen, dtype=torch.float32) * std
        return tensor_to_blob((xf + noise).to(x.dtype).contiguous())

    @staticmethod
    def wrong_digest(digest: bytes) -> bytes:
        """A digest that is not ``digest`` (what a ``receipt`` liar signs as its output)."""
        return hashlib.blake2b(b"pymesh-test-fault" + digest, digest_size=len(digest)).digest()
