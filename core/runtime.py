"""Ray for the jobs: join the configured cluster or start one in-process; gather task results with progress.

Only jobs (``pipelines/``) import this module: stages and the other middle-floor packages never know the executor.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from tqdm import tqdm

from core.config import ConfigError
from core.storage import is_remote


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the configured (or ``RAY_ADDRESS``, as under ``ray job submit``) cluster, else start one in-process."""
    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    else:
        ray.init(address=address, logging_level="WARNING")


def require_reachable(paths: list, shared_filesystem: bool) -> None:
    """Refuse, before any work, local paths on a cluster of more than one node: a task on another node would not
    find the driver's files. Remote URLs are reachable from every node; ``shared_filesystem`` vouches for the rest."""
    if shared_filesystem:
        return
    local = [str(path) for path in paths if not is_remote(path)]
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if local and len(nodes) > 1:
        shown = ", ".join(local[:3]) + (f" and {len(local) - 3} more" if len(local) > 3 else "")
        raise ConfigError(
            f"the Ray cluster has {len(nodes)} nodes, but {shown} is a local path that tasks on the other nodes cannot "
            "see: put inputs and output.root on object storage (s3://..., gs://...), or set "
            "output.shared_filesystem: true if every node mounts these paths"
        )


class TasksFailed(RuntimeError):
    """Ray tasks that failed for good (after their retries); the message names each one."""


def gather(refs: list[ray.ObjectRef], desc: str, *, labels: list[str] | None = None,
           raise_on_error: bool = True) -> list[Any]:
    """Task results in submission order, with a progress bar.

    A task that failed for good raises ``TasksFailed`` naming every failed task (by its label), after all tasks
    have finished; with ``raise_on_error=False`` its exception is returned in its place instead.
    """
    bar = tqdm(total=len(refs), desc=desc, unit="task", disable=not refs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        bar.update(len(done))
    bar.close()
    results: list[Any] = []
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayError as error:
            results.append(error)
    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, ray.exceptions.RayError)]
    if failed and raise_on_error:
        names = labels or [f"task {i}" for i in range(len(refs))]
        details = "\n".join(f"  {names[i]}: {type(e).__name__}: {str(e)[:2000]}" for i, e in failed)
        raise TasksFailed(f"{desc}: {len(failed)} of {len(refs)} task(s) failed:\n{details}")
    return results


_PROC_STATUS, _PROC_CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"


def reset_peak_rss() -> None:
    """Start a task's peak-memory measure: Linux resets the process's RSS high-water mark on ``5`` written to
    clear_refs (a Ray worker runs many tasks; without the reset its peak would be the peak of all of them)."""
    try:
        with open(_PROC_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the worker's life so far


def peak_rss_mb() -> int | None:
    """The process's RSS high-water mark in MiB (since ``reset_peak_rss``), or None where /proc does not say."""
    try:
        with open(_PROC_STATUS) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None
