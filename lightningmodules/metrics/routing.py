"""Per-task mean routing weights of a connector mixture-of-experts (Uni-Med logs these while training).

Accumulates, over an epoch, the sum of every image's mean routing weight (over its visual tokens) per
(task, expert) and the image count per task; summed across ranks like any torchmetrics state.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def routing_sums_by_task(
    weights: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of every image's mean routing weight per (task, expert) and the images per task:
    (N, P, E) weights, (N,) ids -> (num_tasks, E) sums, (num_tasks,) counts, in the weights' dtype."""
    per_image = weights.mean(dim=1)  # (N, E)
    sums = per_image.new_zeros(num_tasks, per_image.shape[1]).index_add_(0, task_ids, per_image)  # (tasks, E)
    counts = torch.bincount(task_ids, minlength=num_tasks).to(sums.dtype)  # (tasks,)
    return sums, counts


def mean_weights_by_task(weights: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Mean routing weight per (task, expert) of one batch: (N, P, E) weights, (N,) ids -> (num_tasks, E).

    Tasks without any image in ``task_ids`` get a row of NaN (no data, not "zero weight").
    """
    sums, counts = routing_sums_by_task(weights.float(), task_ids, num_tasks)
    return sums / counts.unsqueeze(1)  # (tasks, E); 0 / 0 = NaN for absent tasks


class RoutingByTask(Metric):
    """``update((N, P, E) weights, (N,) task ids)``; ``compute()`` -> (num_tasks, E) mean weights, NaN rows
    for tasks without images."""

    full_state_update = False

    def __init__(self, *, num_tasks: int, num_experts: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.num_experts = num_experts
        self.add_state("sums", default=torch.zeros(num_tasks, num_experts, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, weights: torch.Tensor, task_ids: torch.Tensor) -> None:
        if weights.ndim != 3 or weights.shape[-1] != self.num_experts:
            raise ValueError(f"routing weights must be (N, P, {self.num_experts}), got {tuple(weights.shape)}")
        task_ids = task_ids.to(device=self.sums.device, dtype=torch.long)
        if task_ids.shape != weights.shape[:1]:
            raise ValueError(f"need one task id per image: {tuple(task_ids.shape)} ids for {weights.shape[0]} images")
        if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= self.num_tasks):
            raise ValueError(f"task ids must be in [0, {self.num_tasks}), got {task_ids.tolist()}")
        sums, counts = routing_sums_by_task(
            weights.detach().to(self.sums.device, torch.float64), task_ids, self.num_tasks
        )  # (tasks, E), (tasks,)
        self.sums += sums
        self.counts += counts

    def compute(self) -> torch.Tensor:
        return (self.sums / self.counts.unsqueeze(1)).float()  # (tasks, E); 0 / 0 = NaN for absent tasks


def routing_metric_names(table: torch.Tensor, task_names: list[str]) -> dict[str, float]:
    """``routing/<task>/expert_<e>`` for every task with images (rows that are not NaN)."""
    out: dict[str, float] = {}
    for task, row in enumerate(table):
        if torch.isnan(row).any():
            continue
        name = task_names[task] if task < len(task_names) else f"task{task}"
        out.update({f"routing/{name}/expert_{e}": float(w) for e, w in enumerate(row)})
    return out
