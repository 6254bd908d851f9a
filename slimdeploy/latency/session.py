"""What every runner hands back (backends.py, and TensorRT's in trt.py): a loaded model that runs a batch and gives
the timing protocol a call with its inputs already in place."""

from __future__ import annotations

import numpy as np

from . import timing


class Session:
    """A loaded model: run(x) -> numpy output; timed(x) -> (call, sync) for the timing protocol."""

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def timed(self, x: np.ndarray) -> timing.Timed:
        return (lambda: self.run(x)), None

    def time(self, x: np.ndarray, protocol: timing.Protocol = timing.MODEL) -> timing.Measurement:
        """This session alone, by the protocol (use timing.measure to interleave several)."""
        return timing.measure({"model": self.timed(x)}, protocol)["model"]

    def close(self) -> None:
        """Free what the session holds (CUDA streams, contexts)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
