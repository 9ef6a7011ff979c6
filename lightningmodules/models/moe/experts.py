"""E feed-forward experts with stacked weights, computing only the tokens routed to each.

Gated experts (Llama / Qwen / Mistral / StableLM): ``down(act(gate(x)) * up(x))``; the gate and up
projections are stored side by side in ``w_in`` as ``[gate | up]``. Ungated experts (Phi, GPT style):
``fc2(act(fc1(x)))``, usually with biases. Weights are stacked along the expert dimension in matmul layout
(``x @ w``), as torchtune and megablocks do:

    w_in  (E, D, 2F) gated or (E, D, F) ungated      b_in  (E, 2F) or (E, F)   [bias=True]
    w_out (E, F, O)                                  b_out (E, O)              [bias=True]

with output width O = D for a decoder's FFN (the CMoE connector's experts map D = vision width to
O = F = LLM width). ``forward`` gathers the rows of each expert's tokens into one contiguous block per
expert (a ``DispatchPlan`` from ``dispatch.py``), runs the experts on their blocks, weights the rows by the
combine weights and scatters them back with ``index_add``. The experts run as one
``torch.nn.functional.grouped_mm`` call per projection or as a loop over the non-empty experts with a
hand-written backward (``LoopExpertsFFN``); see ``GroupedExperts`` for which runs when. ``mix_dense``
runs every expert on every token and mixes them with dense weights (the CMoE's ``soft`` / ``constant``).

Distributed training: the experts of a layer are three or four stacked Parameters, so as soon as one token
reaches one expert every expert's slice gets a gradient (zeros for experts without tokens), and a layer
that no token reached adds ``0 * sum(params)``; DDP therefore needs no ``find_unused_parameters``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .dispatch import DispatchPlan

GroupedMM = Literal["auto", "always", "never"]


def make_activation(name: str) -> nn.Module:
    """The activation module for a config ``hidden_act`` name (transformers' registry)."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACT2FN)}")
    activation = ACT2FN[name]
    if any(True for _ in activation.parameters()):
        raise ValueError(f"activation {name!r} has parameters; experts support parameter-free activations only")
    return activation


def grouped_mm_available() -> bool:
    """Whether this torch build has a grouped matmul (``F.grouped_mm`` >= 2.10, ``torch._grouped_mm`` >= 2.8)."""
    return hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offsets)


def _autocast_inputs(x: torch.Tensor, weights: list[torch.Tensor | None]) -> tuple[torch.Tensor, list]:
    """Cast to the autocast dtype outside the custom function (as ``custom_fwd(cast_inputs=...)`` does)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weights
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), [None if w is None else w.to(dtype) for w in weights]


class LoopExpertsFFN(torch.autograd.Function):
    """Per-expert FFNs over contiguous row groups, with a hand-written backward (megablocks-like).

    Forward writes each expert's projections straight into preallocated (S, 2F|F) and (S, D) buffers and
    keeps only the input rows and the pre-activation; backward recomputes the activation per expert (cheap,
    saves the (S, F) activation memory) and writes every gradient into place, so no concatenation or
    per-expert weight-slice gradient has to be stacked. Empty experts get exact zero gradients.
    """

    @staticmethod
    def forward(
        ctx,
        x_sorted: torch.Tensor,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
        b_in: torch.Tensor | None,
        b_out: torch.Tensor | None,
        group_sizes: list[int],
        hidden_fn,
    ) -> torch.Tensor:
        projected = x_sorted.new_empty(x_sorted.shape[0], w_in.shape[2])  # (S, 2F|F)
        out = x_sorted.new_empty(x_sorted.shape[0], w_out.shape[2])  # (S, O)
        start = 0
        with torch.no_grad():
            for e, rows in enumerate(group_sizes):
                if rows == 0:
                    continue
                end = start + rows
                if b_in is not None:
                    torch.addmm(b_in[e], x_sorted[start:end], w_in[e], out=projected[start:end])  # (n_e, 2F|F)
                    torch.addmm(b_out[e], hidden_fn(projected[start:end]), w_out[e], out=out[start:end])  # (n_e, D)
                else:
                    torch.mm(x_sorted[start:end], w_in[e], out=projected[start:end])  # (n_e, 2F|F)
                    torch.mm(hidden_fn(projected[start:end]), w_out[e], out=out[start:end])  # (n_e, D)
                start = end
        ctx.save_for_backward(x_sorted, w_in, w_out, projected)
        ctx.group_sizes = group_sizes
        ctx.hidden_fn = hidden_fn
        ctx.has_bias = b_in is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x_sorted, w_in, w_out, projected = ctx.saved_tensors
        need_x, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()  # (S, D)
        grad_x = torch.empty_like(x_sorted) if need_x else None  # (S, D)
        grad_w_in = torch.zeros_like(w_in) if need_w_in else None  # (E, D, 2F|F)
        grad_w_out = torch.zeros_like(w_out) if need_w_out else None  # (E, F, D)
        grad_b_in = w_in.new_zeros(w_in.shape[0], w_in.shape[2]) if need_b_in else None  # (E, 2F|F)
        grad_b_out = w_out.new_zeros(w_out.shape[0], w_out.shape[2]) if need_b_out else None  # (E, D)
        start = 0
        for e, rows in enumerate(ctx.group_sizes):
            if rows == 0:
                continue
            end = start + rows
            grad_rows = grad_out[start:end]  # (n_e, D)
            with torch.enable_grad():
                pre = projected[start:end].detach().requires_grad_()  # (n_e, 2F|F)
                hidden = ctx.hidden_fn(pre)  # (n_e, F) recomputed
            if need_w_out:
                torch.mm(hidden.detach().t(), grad_rows, out=grad_w_out[e])  # (F, D)
            if need_b_out:
                torch.sum(grad_rows, dim=0, out=grad_b_out[e])  # (D,)
            if need_x or need_w_in or need_b_in:
                grad_hidden = grad_rows @ w_out[e].t()  # (n_e, F)
                (grad_pre,) = torch.autograd.grad(hidden, pre, grad_hidden)  # (n_e, 2F|F)
                if need_w_in:
                    torch.mm(x_sorted[start:end].t(), grad_pre, out=grad_w_in[e])  # (D, 2F|F)
                if need_b_in:
                    torch.sum(grad_pre, dim=0, out=grad_b_in[e])  # (2F|F,)
                if need_x:
                    torch.mm(grad_pre, w_in[e].t(), out=grad_x[start:end])  # (n_e, D)
            start = end
        return grad_x, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None


class ExpertLoRA(nn.Module):
    """LoRA adapters on every expert of a :class:`GroupedExperts`, as peft puts them on each expert's Linears.

    MedPLIB stage IV trains LoRA on each expert's gate, up and down projections. The stacked input projection
    ``w_in`` holds ``parts`` Linears side by side (gated: ``[gate | up]``, 2 parts; ungated: 1), each with its
    own rank-``r`` pair, exactly as two peft-adapted Linears would have:

        lora_a_in (E, parts, D, r)   lora_b_in (E, parts, r, F)   lora_a_out (E, F, r)   lora_b_out (E, r, O)

    ``delta = scale * dropout(x) @ A @ B`` with ``scale = alpha / r``, A initialised as peft does (nn.Linear's
    default uniform bound 1/sqrt(fan_in)) and the same for every expert (MedPLIB puts LoRA on the dense FFN
    and then deep-copies it into each expert), B zero, so the adapted experts start equal to the base ones.
    Each adapted projection draws its own dropout mask (separate peft layers do).
    """

    def __init__(
        self, *, num_experts: int, hidden_size: int, ffn_size: int, out_size: int, parts: int, rank: int, alpha: float,
        dropout: float,
    ) -> None:  # fmt: skip
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.parts = parts
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a_in = nn.Parameter(torch.empty(num_experts, parts, hidden_size, rank))
        self.lora_b_in = nn.Parameter(torch.zeros(num_experts, parts, rank, ffn_size))
        self.lora_a_out = nn.Parameter(torch.empty(num_experts, ffn_size, rank))
        self.lora_b_out = nn.Parameter(torch.zeros(num_experts, rank, out_size))
        with torch.no_grad():
            self.lora_a_in.copy_(torch.empty_like(self.lora_a_in[0]).uniform_(-1, 1) / math.sqrt(hidden_size))
            self.lora_a_out.copy_(torch.empty_like(self.lora_a_out[0]).uniform_(-1, 1) / math.sqrt(ffn_size))

    def delta_in(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The input projections' update for expert ``index``'s rows ``x`` (n, D) -> (n, parts*F)."""
        a, b = self.lora_a_in[index].to(x.dtype), self.lora_b_in[index].to(x.dtype)  # (parts, D, r), (parts, r, F)
        return torch.cat([(self.dropout(x) @ a[p]) @ b[p] for p in range(self.parts)], dim=-1) * self.scale

    def delta_out(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """The output projection's update for expert ``index``'s hidden rows (n, F) -> (n, O)."""
        a, b = self.lora_a_out[index].to(hidden.dtype), self.lora_b_out[index].to(hidden.dtype)  # (F, r), (r, O)
        return (self.dropout(hidden) @ a) @ b * self.scale

    @torch.no_grad()
    def merged_updates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale * A @ B`` of every expert: (E, D, parts*F) for ``w_in`` and (E, F, O) for ``w_out``."""
        delta_in = torch.matmul(self.lora_a_in, self.lora_b_in)  # (E, parts, D, F)
        delta_in = delta_in.permute(0, 2, 1, 3).flatten(2)  # (E, D, parts*F): [gate | up] side by side
        delta_out = torch.bmm(self.lora_a_out, self.lora_b_out)  # (E, F, O)
        return delta_in * self.scale, delta_out * self.scale

    def zero_touch(self) -> torch.Tensor:
        return sum(p.sum() for p in self.parameters()) * 0.0

    def extra_repr(self) -> str:
        return f"rank={self.rank}, parts={self.parts}, scale={self.scale}"


class GroupedExperts(nn.Module):
    """``num_experts`` FFNs ``hidden_size -> ffn_size -> out_size`` (default ``hidden_size``), stacked on dim 0.

    Dispatch: ``grouped_mm`` ``"auto"`` uses ``torch.nn.functional.grouped_mm`` on CUDA
    (sm80+) in bf16/fp16, where it is one fast kernel; torch 2.13 has a CPU grouped_mm, but on this project's
    CPU benchmark it was slower than the loop (forward 95 vs 55 ms, forward+backward 208 vs 182 ms at 4096
    tokens, d 256, ffn 688, 4 experts, 1 thread), and in a later run within noise of it
    (``benchmarks/moe.py``, top-1 of 4 + meta: 181 vs 184 ms at 2 threads, 350 vs 354 ms at 1) with a higher
    peak (118 vs 103 MB: autograd keeps its projections). ``"always"`` / ``"never"`` force it on or off.
    Otherwise one matmul per non-empty expert on exactly its rows. (Padding every expert's block to the
    largest one and running one batched matmul, as the CMoE once did for balanced routing, was no faster
    than this loop: CMoE sparse top-2 of 5 1.00x, hard 1.16x, LLM top-1 of 4 1.04x, top-2 of 8 1.17x the
    loop's forward+backward time, 1 thread.)
    """

    def __init__(
        self,
        *,
        num_experts: int,
        hidden_size: int,
        ffn_size: int,
        gated: bool,
        bias: bool,
        activation: str,
        out_size: int | None = None,
        grouped_mm: GroupedMM = "auto",
    ) -> None:
        super().__init__()
        if grouped_mm not in ("auto", "always", "never"):
            raise ValueError(f"grouped_mm must be 'auto', 'always' or 'never', got {grouped_mm!r}")
        if grouped_mm == "always" and not grouped_mm_available():
            raise ValueError("grouped_mm='always' but this torch has no grouped matmul")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.out_size = out_size or hidden_size
        self.gated = gated
        self.activation_name = activation
        self.grouped_mm = grouped_mm
        in_width = 2 * ffn_size if gated else ffn_size
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_size, in_width))
        self.w_out = nn.Parameter(torch.empty(num_experts, ffn_size, self.out_size))
        self.b_in = nn.Parameter(torch.empty(num_experts, in_width)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, self.out_size)) if bias else None
        self.activation = make_activation(activation)
        self.lora: ExpertLoRA | None = None  # add_lora: per-expert adapters (MedPLIB stage IV), merged after
        self.reset_parameters()

    def add_lora(self, *, rank: int, alpha: float, dropout: float) -> ExpertLoRA:
        """Put LoRA adapters on every expert's projections (:class:`ExpertLoRA`); :meth:`merge_lora` folds them in."""
        if self.lora is not None:
            raise ValueError("the experts already have LoRA adapters")
        lora = ExpertLoRA(
            num_experts=self.num_experts,
            hidden_size=self.hidden_size,
            ffn_size=self.ffn_size,
            out_size=self.out_size,
            parts=2 if self.gated else 1,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
        )
        self.lora = lora.to(device=self.w_in.device, dtype=self.w_in.dtype)
        return self.lora

    @torch.no_grad()
    def merge_lora(self) -> bool:
        """Fold the adapters into ``w_in`` / ``w_out`` and drop them; False when there are none."""
        if self.lora is None:
            return False
        delta_in, delta_out = self.lora.merged_updates()  # (E, D, 2F|F), (E, F, O)
        self.w_in.add_(delta_in.to(self.w_in.dtype))
        self.w_out.add_(delta_out.to(self.w_out.dtype))
        self.lora = None
        return True

    @property
    def has_bias(self) -> bool:
        return self.b_in is not None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert."""
        for weight, bias in ((self.w_in, self.b_in), (self.w_out, self.b_out)):
            bound = 1.0 / math.sqrt(weight.shape[1])  # fan_in
            weight.uniform_(-bound, bound)
            if bias is not None:
                bias.uniform_(-bound, bound)

    @torch.no_grad()
    def load_expert(
        self,
        index: int,
        *,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
        b_in: torch.Tensor | None = None,
        b_out: torch.Tensor | None = None,
    ) -> None:
        """Copy one expert's weights, given in matmul layout: ``w_in`` (D, 2F or F), ``w_out`` (F, O)."""
        if tuple(w_in.shape) != tuple(self.w_in.shape[1:]) or tuple(w_out.shape) != tuple(self.w_out.shape[1:]):
            raise ValueError(
                f"expert {index}: got w_in {tuple(w_in.shape)} and w_out {tuple(w_out.shape)}, "
                f"expected {tuple(self.w_in.shape[1:])} and {tuple(self.w_out.shape[1:])}"
            )
        if (b_in is not None or b_out is not None) != self.has_bias:
            raise ValueError(f"expert {index}: biases given={b_in is not None}, experts have bias={self.has_bias}")
        self.w_in[index].copy_(w_in)
        self.w_out[index].copy_(w_out)
        if self.has_bias:
            self.b_in[index].copy_(b_in if b_in is not None else torch.zeros_like(self.b_in[index]))
            self.b_out[index].copy_(b_out if b_out is not None else torch.zeros_like(self.b_out[index]))

    def _hidden(self, projected: torch.Tensor) -> torch.Tensor:
        """Activation (gated: ``act(gate) * up``) of the input projection (..., 2F or F) -> (..., F)."""
        if self.gated:
            gate, up = projected.chunk(2, dim=-1)  # (..., F), (..., F)
            return self.activation(gate) * up
        return self.activation(projected)

    def expert_forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` on every row of ``x`` (n, D) -> (n, O). For tests and reference code."""
        w_in, w_out = self.w_in[index], self.w_out[index]  # (D, 2F|F), (F, O)
        if self.lora is not None:  # the merged weights, without LoRA dropout
            delta_in, delta_out = self.lora.merged_updates()
            w_in, w_out = w_in + delta_in[index], w_out + delta_out[index]
        projected = x @ w_in  # (n, 2F or F)
        if self.has_bias:
            projected = projected + self.b_in[index]
        out = self._hidden(projected) @ w_out  # (n, O)
        return out + self.b_out[index] if self.has_bias else out

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.grouped_mm != "auto":
            return self.grouped_mm == "always"
        return (
            x.is_cuda
            and x.dtype in (torch.bfloat16, torch.float16)
            and grouped_mm_available()
            and torch.cuda.get_device_capability(x.device) >= (8, 0)
        )

    def _loop_ffn(self, x_sorted: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        """One matmul per projection for each non-empty expert (``LoopExpertsFFN``); empty experts are skipped."""
        x_sorted, weights = _autocast_inputs(x_sorted, [self.w_in, self.w_out, self.b_in, self.b_out])
        with torch.autocast(device_type=x_sorted.device.type, enabled=False):
            return LoopExpertsFFN.apply(x_sorted, *weights, group_sizes, self._hidden)

    def _grouped_ffn(self, x_sorted: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        """Both projections as single grouped matmuls over all experts (``offs`` = group ends)."""
        params = [self.w_in, self.w_out, self.b_in, self.b_out]
        x_sorted, (w_in, w_out, b_in, b_out) = _autocast_inputs(x_sorted, params)
        sizes = torch.tensor(group_sizes, device=x_sorted.device)  # (E,)
        offsets = torch.cumsum(sizes, dim=0).to(torch.int32)  # (E,)
        projected = _grouped_mm(x_sorted, w_in, offsets)  # (S, 2F|F)
        if b_in is not None:
            projected = projected + b_in.repeat_interleave(sizes, dim=0, output_size=x_sorted.shape[0])  # (S, 2F|F)
        out = _grouped_mm(self._hidden(projected).contiguous(), w_out, offsets)  # (S, O)
        if b_out is not None:
            out = out + b_out.repeat_interleave(sizes, dim=0, output_size=x_sorted.shape[0])  # (S, O)
        return out

    def _lora_ffn(self, x_sorted: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        """The experts with their LoRA updates, one expert at a time (plain autograd; the base weights are frozen
        when adapters train, so the loop's backward computes the input and adapter gradients only)."""
        outputs = []
        for index, rows in enumerate(torch.split(x_sorted, group_sizes)):
            if rows.shape[0] == 0:
                continue
            projected = rows @ self.w_in[index].to(rows.dtype) + self.lora.delta_in(index, rows)  # (n_e, 2F|F)
            if self.has_bias:
                projected = projected + self.b_in[index].to(rows.dtype)
            hidden = self._hidden(projected)  # (n_e, F)
            out = hidden @ self.w_out[index].to(rows.dtype) + self.lora.delta_out(index, hidden)  # (n_e, O)
            outputs.append(out + self.b_out[index].to(rows.dtype) if self.has_bias else out)
        return torch.cat(outputs)  # (S, O)

    def _zero_touch(self) -> torch.Tensor:
        """0 * every parameter, so all experts join autograd even when no token reached any of them."""
        total = self.w_in.sum() + self.w_out.sum()
        if self.has_bias:
            total = total + self.b_in.sum() + self.b_out.sum()
        if self.lora is not None:
            total = total + self.lora.zero_touch()
        return total * 0.0

    def forward(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Experts on their routed rows of ``x`` (N, D), weighted and summed per token -> (N, O)."""
        if plan.token_index.numel() == 0:
            return x.new_zeros(x.shape[0], self.out_size) + self._zero_touch().to(x.dtype)  # (N, O)
        x_sorted = x.index_select(0, plan.token_index)  # (S, D) grouped by expert
        if self.lora is not None:
            y_sorted = self._lora_ffn(x_sorted, plan.group_sizes)  # (S, O)
        elif self._use_grouped_mm(x):
            y_sorted = self._grouped_ffn(x_sorted, plan.group_sizes)  # (S, O)
        else:
            y_sorted = self._loop_ffn(x_sorted, plan.group_sizes)  # (S, O)
        y_sorted = y_sorted * plan.weights.to(y_sorted.dtype).unsqueeze(1)  # (S, O)
        out = y_sorted.new_zeros(x.shape[0], self.out_size)  # (N, O); tokens with no kept assignment stay 0
        return out.index_add(0, plan.token_index, y_sorted)  # (N, O)

    def mix_dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_e w_e * expert_e(x)`` with every expert on every row: (N, D), (N|1, E) -> (N, O).

        Without LoRA adapters (the CMoE connector's experts have none).

        The input projection is one batched matmul; the weights scale the hidden activations (the output
        projection is linear), so it plus the weighted sum over experts is a single matmul contracting (E, F).
        """
        num_rows = x.shape[0]
        shared = x.unsqueeze(0).expand(self.num_experts, -1, -1)  # (E, N, D), no copy
        if self.has_bias:
            projected = torch.baddbmm(self.b_in.unsqueeze(1), shared, self.w_in)  # (E, N, 2F|F)
        else:
            projected = torch.bmm(shared, self.w_in)  # (E, N, 2F|F)
        hidden = self._hidden(projected)  # (E, N, F)
        # (N, E, 1) first: the product takes its memory layout, so it is born row-major per token and the
        # reshape below is a view, not a copy
        weighted = weights.unsqueeze(-1) * hidden.transpose(0, 1)  # (N, E, F)
        flat = weighted.reshape(num_rows, self.num_experts * self.ffn_size)  # (N, E*F)
        w_out = self.w_out.reshape(self.num_experts * self.ffn_size, self.out_size)  # (E*F, O)
        if self.has_bias:
            return torch.addmm(weights @ self.b_out, flat, w_out)  # (N, O)
        return flat @ w_out  # (N, O)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
            f"out_size={self.out_size}, gated={self.gated}, bias={self.has_bias}, "
            f"activation={self.activation_name!r}, grouped_mm={self.grouped_mm!r}"
        )
