"""Threads, ONNX Runtime sessions and ordered worker pipelines: the CPU policy in one place (no torch).

The fast path measured on this project's 2-core machines: W workers (one per core),
each decoding a whole batch and then running it through one shared ONNX Runtime
session with a single intra-op thread, without spinning. Decoding (Pillow) and
inference (ORT) both release the GIL, so the workers overlap fully and no thread
pool fights another for the cores.
"""
from __future__ import annotations

import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


# torch's vectorised CPU kernels (ATen) are picked per machine: AVX-512 where the CPU has it, else AVX2. The two
# round float sums differently, so the same run on an AVX-512 and an AVX2 machine drifted apart over the epochs
# (the demo: val median 1,098 vs 1,115 km; forcing AVX2 on the AVX-512 machine gave the AVX2 machine's run
# exactly). Pinned to AVX2, which every x86-64 CPU of the last decade has, both give the same run, ~4 % slower there.
PORTABLE_CPU_KERNELS = "avx2"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (x86: ``avx2``, ``fma``, ...); empty where there is no such file."""
    try:
        return set(next((line.split(":", 1)[1].split() for line in Path(cpuinfo).read_text().splitlines()
                         if line.startswith("flags")), []))
    except OSError:
        return set()


def pin_cpu_kernels(environ=os.environ, modules=sys.modules, cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """Pin torch's CPU kernels to :data:`PORTABLE_CPU_KERNELS` for runs that reproduce across x86 machines.

    Called when ``geolocate`` is imported: torch reads ``ATEN_CPU_CAPABILITY`` once, so this only takes effect
    while torch is not imported yet. Leaves alone a value the user set (``ATEN_CPU_CAPABILITY=avx512`` for the
    machine's own kernels) and machines without AVX2 + FMA (or without ``/proc/cpuinfo``: other OSes, ARM).
    Returns the value it set, else None.
    """
    if "ATEN_CPU_CAPABILITY" in environ or "torch" in modules or not {"avx2", "fma"} <= cpu_flags(cpuinfo):
        return None
    environ["ATEN_CPU_CAPABILITY"] = PORTABLE_CPU_KERNELS
    return PORTABLE_CPU_KERNELS


def cpu_count() -> int:
    """Cores this process may use (affinity/cgroup aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None, ahead: int = 1) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, results in input order, at most ``workers + ahead`` in flight.

    Memory stays bounded for any number of items; with one worker it runs inline (no thread at all).
    """
    workers = workers or cpu_count()
    if workers <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers + ahead:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(pool.submit(fn, item))
                break
            yield result


def ort_session(source: str | Path | bytes, threads: int | None = 1):
    """A CPU ONNX Runtime session over a file or bytes.

    ``threads`` intra-op threads (default 1: callers run one session from several workers, which
    beats one call on several threads here); ``None`` lets ORT pick. Idle threads sleep instead of
    spinning: spinning took ~35 % of the throughput of a server decoding uploads on other threads.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    src = bytes(source) if isinstance(source, (bytes, bytearray)) else str(source)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def session_metadata(session) -> dict[str, str]:
    """The custom metadata of a session's model (read by ORT while loading: no second parse)."""
    return dict(session.get_modelmeta().custom_metadata_map)
