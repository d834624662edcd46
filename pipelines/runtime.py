"""Ray start-up and progress, shared by every UltraClean job."""

from __future__ import annotations

import os
from typing import Any

import ray
from tqdm import tqdm


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the configured (or ``RAY_ADDRESS``, as under ``ray job submit``) cluster, else start one in-process."""
    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    else:
        ray.init(address=address, logging_level="WARNING")


def gather(refs: list[ray.ObjectRef], desc: str) -> list[Any]:
    """Results in submission order, with a progress bar; a task that failed for good yields its exception."""
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
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as error:
            results.append(error)
    return results
