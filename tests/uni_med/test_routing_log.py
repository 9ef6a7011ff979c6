"""Per-task mean routing weights: the epoch metric, its MLflow names, stale-routing guard, the heatmap."""

from __future__ import annotations

import math

import pytest
import torch

from lightningmodules.metrics.routing import RoutingByTask, routing_metric_names


def test_mean_over_tokens_then_images_per_task() -> None:
    metric = RoutingByTask(num_tasks=3, num_experts=2)
    # image 0 (task 0): tokens (1, 0), (0, 1) -> mean (0.5, 0.5); image 1 (task 2): (0.2, 0.8) twice
    metric.update(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.2, 0.8], [0.2, 0.8]]]), torch.tensor([0, 2]))
    # a second batch: image of task 0 with (1, 0) on both tokens
    metric.update(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), torch.tensor([0]))
    table = metric.compute()
    torch.testing.assert_close(table[0], torch.tensor([0.75, 0.25]))  # (0.5 + 1) / 2, (0.5 + 0) / 2
    torch.testing.assert_close(table[2], torch.tensor([0.2, 0.8]))
    assert torch.isnan(table[1]).all()  # no image of task 1: no data, not zero
    names = routing_metric_names(table, ["vqa", "refer", "identify"])
    assert names == pytest.approx(
        {
            "routing/vqa/expert_0": 0.75,
            "routing/vqa/expert_1": 0.25,
            "routing/identify/expert_0": 0.2,
            "routing/identify/expert_1": 0.8,
        }
    )


def test_bad_updates_are_clear_errors() -> None:
    metric = RoutingByTask(num_tasks=2, num_experts=3)
    with pytest.raises(ValueError, match=r"\(N, P, 3\)"):
        metric.update(torch.ones(2, 4, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one task id per image"):
        metric.update(torch.ones(2, 4, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"task ids must be in \[0, 2\)"):
        metric.update(torch.ones(1, 4, 3), torch.tensor([2]))


def test_validation_ignores_the_routing_of_an_earlier_batch() -> None:
    """A text-only validation batch does not run the connector: its stale routing must not be counted."""
    from lightningmodules.models.cmoe import CMoEConnector
    from lightningmodules.models.multimodal import MultimodalOutput
    from lightningmodules.vlm_module import VLMModule

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.connector = CMoEConnector(in_dim=4, out_dim=4, num_experts=2, num_tasks=2, weighting="hard")

        def forward(self, pixel_values=None, image_task_ids=None, **_):
            if pixel_values is not None:
                self.connector(pixel_values, task_ids=image_task_ids)
            return MultimodalOutput(loss=torch.tensor(1.0), hidden_states=torch.zeros(1), token_count=1)

    module = VLMModule(model=Model(), task_names=["vqa", "refer"])
    module.log = lambda *a, **k: None  # no trainer attached
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    module.validation_step({**batch, "pixel_values": torch.randn(2, 5, 4), "image_task_ids": torch.tensor([1, 1])}, 0)
    module.validation_step({**batch, "pixel_values": None, "image_task_ids": torch.zeros(0, dtype=torch.long)}, 1)
    assert module.routing.counts.tolist() == [0.0, 2.0]  # two images, counted once
    torch.testing.assert_close(module.routing.compute()[1], torch.tensor([0.0, 1.0]))


def test_heatmap_leaves_out_tasks_without_images() -> None:
    import matplotlib.pyplot as plt

    from pipeline.plots import routing_heatmap

    table = torch.tensor([[0.7, 0.3], [math.nan, math.nan], [0.1, 0.9]])
    figure = routing_heatmap(table.numpy(), ["vqa", "refer", "identify"], title="t")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["vqa", "identify"]
    assert sorted(t.get_text() for t in ax.texts) == ["0.10", "0.30", "0.70", "0.90"]
    plt.close(figure)
