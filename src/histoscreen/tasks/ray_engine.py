"""`predict` and `screen` on a Ray cluster: the same tasks, their shards spread over a pool
of actors.

Plain Ray actors, not Ray Data's `map_batches`: a screened slide comes back as one
SlideResult (its picture, explanations and summary), not as rows of a table, and `predict`
needs its logits back in input order to finish slide context on the driver. An ActorPool
keeps that order, each actor loads the model once, and an actor whose process dies is
restarted by Ray and its shard sent again (`max_restarts`, `max_task_retries`), so a lost
worker costs one shard, not the run. Shards carry paths and row numbers, never pixels: on a
cluster, inputs and model must be at the same path on every node (a shared file system).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from histoscreen.checks import number, whole_number
from histoscreen.data.sources import Conflict, PatchBatch, PatchSource, Shard
from histoscreen.errors import HistoscreenError, SettingError
from histoscreen.problems import Problem
from histoscreen.runtime.device import set_threads
from histoscreen.runtime.predictor import Predictor
from histoscreen.tasks.steps import scored_batches, screen_slide


@dataclass(frozen=True)
class RayEngine:
    """Where and how wide to run: `address` joins a running cluster (`ray start --head`),
    None starts a local Ray instance for the run. `workers` actors (default: as many as the
    cluster's CPUs allow) of `cpus_per_worker` CPUs each, `gpus_per_worker` GPUs (then they
    score on CUDA)."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    patches_per_shard: int = 8192  # predict: about this many patches per shard (screen: one slide)

    def __post_init__(self) -> None:
        if self.workers is not None:
            whole_number("ray_workers", self.workers)
        whole_number("ray_cpus_per_worker", self.cpus_per_worker)
        number("gpus_per_worker", self.gpus_per_worker, low=0)
        whole_number("patches_per_shard", self.patches_per_shard)


@dataclass
class ShardOutcome:
    """A worker's answer for one shard: its value, and what reading it found (problems,
    conflicting and folded copies), which a local run would have kept on the source."""

    value: object
    problems: list[Problem]
    conflicts: list[Conflict]
    duplicates: int

    @classmethod
    def of(cls, value: object, source: PatchSource) -> ShardOutcome:
        return cls(value, source.problems, source.conflicts, source.duplicates)

    def absorb_into(self, source: PatchSource) -> None:
        source.problems += self.problems
        source.conflicts += self.conflicts
        source.duplicates += self.duplicates


class ShardWorker:
    """One actor: loads the model once, then scores the shards it is sent."""

    def __init__(self, predictor_options: dict, slide_options, threads: int):
        set_threads(threads)
        self.predictor = Predictor(**predictor_options)
        self.slide_options = slide_options

    def predict(self, shard: Shard) -> ShardOutcome:
        """The raw logits of a shard's patches and their places (no pixels), in reading order."""
        source = shard.open(workers=1)
        logits, parts = [], []
        for batch_logits, batch in scored_batches(self.predictor, source):
            logits.append(batch_logits)
            parts.append(batch)
        scores = np.concatenate(logits) if logits else np.empty(0, dtype=np.float32)
        return ShardOutcome.of((scores, PatchBatch.concatenate(parts)), source)

    def screen(self, shard: Shard, slide_id: str) -> ShardOutcome:
        """One slide screened (a SlideResult), or the Problem that stopped it."""
        source = shard.open(workers=1)
        return ShardOutcome.of(screen_slide(self.predictor, self.slide_options, source, slide_id), source)


class RayPool:
    """The actors of one run. Joins the cluster at the engine's address, or starts a local
    Ray instance (and stops it afterwards); the actors go when the run ends."""

    def __init__(self, engine: RayEngine, predictor: Predictor, slide_options=None):
        self.engine = engine
        options = predictor.options()
        options["device"] = "cuda" if engine.gpus_per_worker > 0 else "cpu"
        self.worker_arguments = (options, slide_options, engine.cpus_per_worker)
        self.actors: list = []
        self.started_ray = False

    def __enter__(self) -> RayPool:
        ray = _ray()
        if not ray.is_initialized():
            import logging

            settings = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
            if self.engine.address is not None:
                _check_reachable(self.engine.address)
            try:
                if self.engine.address is None:
                    ray.init(num_cpus=os.cpu_count(), **settings)
                else:
                    ray.init(address=self.engine.address, **settings)
            except (ConnectionError, RuntimeError, ValueError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise HistoscreenError(f"Ray: cannot {'start' if self.engine.address is None else 'join ' + self.engine.address}: {first}") from None
            self.started_ray = True
        try:
            count = self._placeable(ray)
        except HistoscreenError:
            self.__exit__()
            raise
        actor = ray.remote(num_cpus=self.engine.cpus_per_worker, num_gpus=self.engine.gpus_per_worker,
                           max_restarts=-1, max_task_retries=-1)(ShardWorker)
        self.actors = [actor.remote(*self.worker_arguments) for _ in range(count)]
        return self

    def _placeable(self, ray) -> int:
        """How many actors to start; refused, in one line, when the cluster could never place
        them (Ray would wait for resources forever, silently)."""
        engine = self.engine
        total = ray.cluster_resources()
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        widest_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
        widest_gpus = max((node.get("GPU", 0) for node in nodes), default=0)
        if engine.cpus_per_worker > widest_cpus:
            raise SettingError("ray_cpus_per_worker", f"is {engine.cpus_per_worker}, but the largest node of the cluster has {widest_cpus:g} CPUs")
        if engine.gpus_per_worker > widest_gpus:
            raise SettingError("gpus_per_worker", f"is {engine.gpus_per_worker:g}, but the largest node of the cluster has {widest_gpus:g} GPUs")
        cpus = int(total.get("CPU", 0))
        count = engine.workers or max(1, cpus // engine.cpus_per_worker)
        if count * engine.cpus_per_worker > cpus:
            raise SettingError("ray_workers", f"is {count} workers of {engine.cpus_per_worker} CPUs, {count * engine.cpus_per_worker} "
                               f"in all, but the cluster has {cpus}")
        if count * engine.gpus_per_worker > total.get("GPU", 0):
            raise SettingError("ray_workers", f"is {count} workers of {engine.gpus_per_worker:g} GPUs, but the cluster has {total.get('GPU', 0):g}")
        return count

    def __exit__(self, *exc) -> None:
        ray = _ray()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started_ray:
            ray.shutdown()

    def map(self, method: str, items: Sequence[tuple]) -> Iterator[ShardOutcome]:
        """`method(*item)` on the actors for every item, answers in the items' order."""
        from ray.util import ActorPool

        return ActorPool(self.actors).map(lambda actor, item: getattr(actor, method).remote(*item), items)


REACH_TIMEOUT_S = 5.0


def _check_reachable(address: str) -> None:
    """Fail in one line, at once, when nothing listens at a cluster's address: ray.init
    otherwise retries for many minutes and prints a page of logs."""
    import socket

    if address in ("auto", "local"):
        return
    where = address.split("://", 1)[-1].rstrip("/")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise SettingError("ray_address", f"must be HOST:PORT (or ray://HOST:PORT, or auto), got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as error:
        raise HistoscreenError(f"Ray: cannot join {address}: nothing answers there ({error.strerror or error}); "
                               "start the cluster first (Ray's own 'ray start' command) or check the address") from None


def _ray():
    try:
        import ray
    except ImportError:
        raise HistoscreenError("the Ray engine needs the [distributed] extra: pip install 'histoscreen[distributed]'") from None
    return ray
