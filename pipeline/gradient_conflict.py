"""Per-task gradient conflict ("tug of war", Uni-Med paper section 3; its code does not ship it).

Every ``every_n_steps`` optimiser steps the callback takes a fixed probe batch per task (the first
``samples_per_task`` training records of each task), computes each task's loss gradient on the
shared parameters of each group (``connector``, ``experts``, ``router``, or any name substring),
and logs the cosine similarity of every task pair: ``grad_conflict/<group>/<task_a>.vs.<task_b>``, their
mean and the share of negative pairs. A negative cosine means a step that helps one task hurts the
other. The probes run in eval mode under a forked RNG and never touch ``.grad``, so training is
unchanged; only rank 0 computes (weights are identical on every rank under DDP).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from itertools import combinations
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

log = logging.getLogger("medpipe")

GROUP_PATTERNS = {"connector": ("connector.",), "experts": (".experts.", "experts."), "router": ("router.", ".gate.")}


def group_parameters(model: torch.nn.Module, groups: list[str]) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Trainable parameters per group; a group that is not a known name matches as a substring."""
    out: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for group in groups:
        patterns = GROUP_PATTERNS.get(group, (group,))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and any(s in n for s in patterns)]
        if params:
            out[group] = params
    return out


def task_gradients(
    model: torch.nn.Module, batch: dict[str, Any], params: dict[str, list[tuple[str, torch.nn.Parameter]]]
) -> dict[str, torch.Tensor]:
    """Loss gradient of one batch, flattened per group: group -> (P_group,)."""
    from lightningmodules.vlm_module import model_inputs

    flat = [p for group in params.values() for _, p in group]
    loss = model(**model_inputs(batch)).loss
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    out, i = {}, 0
    for group, named in params.items():
        parts = [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for (_, p), g in zip(named, grads[i : i + len(named)], strict=True)
        ]
        out[group] = torch.cat(parts).float()  # (P_group,)
        i += len(named)
    return out


def conflict_matrix(grads: dict[str, dict[str, torch.Tensor]], group: str) -> tuple[list[str], torch.Tensor]:
    """Tasks and their pairwise gradient cosine similarity on one group: (T, T)."""
    tasks = sorted(grads)
    stacked = torch.stack([grads[t][group] for t in tasks])  # (T, P)
    unit = F.normalize(stacked, dim=1)
    return tasks, unit @ unit.T  # (T, T)


class GradientConflict(L.Callback):
    def __init__(
        self,
        *,
        every_n_steps: int,
        samples_per_task: int = 8,
        groups: list[str] | None = None,
        tracker: Any = None,
        run_id: str | None = None,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.samples_per_task = samples_per_task
        self.groups = list(groups or ["connector", "experts"])
        self.tracker, self.run_id = tracker, run_id
        self.probes: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        dataset = dm.dataset("train", with_answers=True)
        by_task: dict[str, list[int]] = defaultdict(list)
        for index, record in enumerate(dataset.records):
            if len(by_task[record.task]) < self.samples_per_task:
                by_task[record.task].append(index)
        if len(by_task) < 2:
            log.warning("gradient conflict: the training data has one task (%s); nothing to compare", list(by_task))
            return
        collate = dm.collator()
        self.probes = {task: collate([dataset[i] for i in indices]) for task, indices in sorted(by_task.items())}
        params = group_parameters(pl_module.model, self.groups)
        missing = sorted(set(self.groups) - set(params))
        if missing:
            log.info("gradient conflict: no trainable parameters in group(s) %s", missing)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.probes or trainer.global_step % self.every_n_steps != 0:
            return
        metrics = self.measure(pl_module)
        # straight to the loggers at the step train/loss uses (Lightning's self.log from a callback
        # would repeat the value on every later step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step - 1)

    def measure(self, pl_module: L.LightningModule) -> dict[str, float]:
        model = pl_module.model
        params = group_parameters(model, self.groups)
        was_training = model.training
        model.eval()  # no dropout: the gradient of the loss itself
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                grads = {
                    task: task_gradients(model, pl_module.transfer_batch_to_device(batch, pl_module.device, 0), params)
                    for task, batch in self.probes.items()
                }
        finally:
            model.train(was_training)
        metrics: dict[str, float] = {}
        entry: dict[str, Any] = {"step": pl_module.global_step, "groups": {}}
        for group in params:
            tasks, cos = conflict_matrix(grads, group)
            pairs = list(combinations(range(len(tasks)), 2))
            for a, b in pairs:
                metrics[f"grad_conflict/{group}/{tasks[a]}.vs.{tasks[b]}"] = float(cos[a, b])
            values = torch.tensor([cos[a, b] for a, b in pairs])
            metrics[f"grad_conflict/{group}/mean_cos"] = float(values.mean())
            metrics[f"grad_conflict/{group}/negative_share"] = float((values < 0).float().mean())
            entry["groups"][group] = {"tasks": tasks, "cos": cos.tolist()}
        self.history.append(entry)
        return metrics

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history or self.tracker is None or not trainer.is_global_zero:
            return
        import matplotlib.pyplot as plt

        from pipeline.plots import similarity_figure

        self.tracker.log_text(self.run_id, json.dumps(self.history, indent=1), "analysis/grad_conflict.json")
        for group, last in self.history[-1]["groups"].items():
            figure = similarity_figure(
                last["cos"], last["tasks"], title=f"task gradient cosine, {group} (step {self.history[-1]['step']})"
            )
            self.tracker.log_figure(self.run_id, figure, f"plots/grad_conflict_{group}.png")
            plt.close(figure)
