"""Few-shot Omniglot benchmark (issue 5): meta-step cost per method, and the episode sampler's rate.

Setup: real Omniglot ``maml-train`` characters with their rotations (4800 classes, 28×28, ink = 1),
5-way 1-shot, 15 queries per class, meta-batch 8, the 4-block conv net with 64 filters (max-pool),
float32, one thread, one inner step of size 0.4 — the learners of
:func:`bilevel.meta.omniglot.make_learner`. A meta-step is one ``learner.meta_gradient(theta, tasks)``
on a fixed meta-batch (the Adam update itself is negligible).

Targets (issue 5): ANIL's meta-step at most 0.6 × MAML's (Raghu et al. report 1.7× faster
iterations), and the sampler's episode rate at least 20 × ANIL's meta-step rate — measured here
per meta-batch, the stricter reading: drawing 8 episodes must take at most 1/20 of an ANIL step.
``track_*`` give the ratios from interleaved best-of timings on CPU time (``time.thread_time``),
which load on a shared machine affects less than wall time. ``python -m benchmarks.run_omniglot``
prints the same numbers without asv.

Skipped (``NotImplementedError`` in ``setup``, which asv reports as skipped) when the Omniglot files
are absent: they are found through ``$BILEVEL_DATA/omniglot`` (else ``../shared/data/omniglot``
next to the repository), like the tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ._reference import best_of

WAYS, SHOTS, QUERIES, META_BATCH = 5, 1, 15, 8
#: Methods timed by the asv benchmark (the issue's three) and by the run script (all it lists).
METHODS = ("maml", "anil", "shared-ridge")
REPEAT = 5


def data_root() -> Path:
    """``$BILEVEL_DATA/omniglot``, else ``<repo>/../shared/data/omniglot``."""
    root = os.environ.get("BILEVEL_DATA")
    return (Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data") / "omniglot"


def load_train() -> object | None:
    """The ``maml-train`` characters with rotations, or ``None`` when the data is absent."""
    from bilevel.datasets import Omniglot

    root = data_root()
    if not any((root / name).exists() for name in ("images_background.npz", "images_evaluation.npz")):
        return None
    return Omniglot(root, "maml-train", rotations=True)


def make_calls(train: object, methods: tuple[str, ...] = METHODS, queries: int = QUERIES,
               seed: int = 0, inner_steps: int | None = None) -> dict[str, Callable[[], object]]:
    """``"sampler"`` (draw one meta-batch of 8 episodes) and one meta-gradient call per method;
    ``inner_steps`` inner steps (default: each method's own, :func:`~bilevel.meta.omniglot.make_learner`)."""
    from bilevel.datasets import EpisodeSampler
    from bilevel.meta.omniglot import EpisodeFamily, make_learner

    sampler = EpisodeSampler(train, WAYS, SHOTS, queries, seed=seed)
    calls: dict[str, Callable[[], object]] = {"sampler": lambda: sampler.sample(META_BATCH)}
    for method in methods:
        learner, theta = make_learner(method, WAYS, inner_lr=0.4, inner_steps=inner_steps, seed=seed)
        tasks = EpisodeFamily(train, WAYS, SHOTS, queries, one_hot=method == "shared-ridge").sample(META_BATCH, seed)
        # throw=False: a timing must not stop on a status (e.g. Reptile's 5 steps of 0.4 diverging on a task)
        calls[method] = (lambda lrn=learner, th=theta, ts=tasks: lrn.meta_gradient(th, ts, throw=False))
    return calls


def ratios(train: object, methods: tuple[str, ...] = METHODS, repeat: int = REPEAT,
           queries: int = QUERIES, inner_steps: int | None = None) -> dict[str, float]:
    """Best-of CPU seconds per call and the two target ratios (``inner_steps`` as in :func:`make_calls`)."""
    best = best_of(make_calls(train, methods, queries, inner_steps=inner_steps), repeat, clock=time.thread_time)
    out = dict(best)
    if "maml" in best and "anil" in best:
        out["anil/maml"] = best["anil"] / best["maml"]
    if "anil" in best:
        out["anil_step/sampler_batch"] = best["anil"] / best["sampler"]
        out["sampler_episodes_per_s"] = META_BATCH / best["sampler"]
    return out


class _Data:
    timeout = 900.0

    def setup_cache(self) -> dict[str, bool]:
        # asv pickles this: only a marker (the data is reloaded from the preprocessing cache in setup;
        # a None here would not be passed to setup at all).
        root = data_root()
        return {"found": any((root / n).exists() for n in ("images_background.npz", "images_evaluation.npz"))}

    def _need(self, cache: dict[str, bool]) -> object:
        if not cache["found"]:
            raise NotImplementedError(f"Omniglot not found at {data_root()}: set BILEVEL_DATA")  # asv skips
        torch.set_num_threads(1)
        return load_train()


class OmniglotMetaStep(_Data):
    """Seconds per meta-gradient, 5-way 1-shot, 15 queries, meta-batch 8."""

    params = [list(METHODS)]
    param_names = ("method",)
    number = 1
    repeat = (3, 7, 60.0)

    def setup(self, cache: dict[str, bool], method: str) -> None:
        self.call = make_calls(self._need(cache), (method,))[method]
        self.call()

    def time_meta_step(self, cache: dict[str, bool], method: str) -> None:
        self.call()


class OmniglotSampler(_Data):
    """Seconds to draw one meta-batch of 8 episodes (5-way 1-shot, 15 queries) as stacked tensors."""

    number = 20

    def setup(self, cache: dict[str, bool]) -> None:
        self.call = make_calls(self._need(cache), ())["sampler"]

    def time_sample_meta_batch(self, cache: dict[str, bool]) -> None:
        self.call()


class OmniglotRatios:
    """The target ratios from interleaved CPU-time timings (ANIL / MAML with 1 and with 5 inner steps;
    ANIL step / sampler batch)."""

    timeout = 900.0

    def setup_cache(self) -> dict[str, float]:
        torch.set_num_threads(1)
        train = load_train()
        if train is None:
            return {}
        five = ratios(train, ("maml", "anil"), inner_steps=5)  # the ANIL paper's 5 inner steps
        return {**ratios(train, ("maml", "anil")), "anil/maml 5 steps": five["anil/maml"]}

    def setup(self, cache: dict[str, float]) -> None:
        if not cache:
            raise NotImplementedError(f"Omniglot not found at {data_root()}: set BILEVEL_DATA")

    def track_anil_over_maml(self, cache: dict[str, float]) -> float:
        return cache["anil/maml"]

    def track_anil_over_maml_5_inner_steps(self, cache: dict[str, float]) -> float:
        return cache["anil/maml 5 steps"]

    def track_anil_step_over_sampler_batch(self, cache: dict[str, float]) -> float:
        return cache["anil_step/sampler_batch"]
