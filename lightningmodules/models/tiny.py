"""Tiny stand-ins for real checkpoints, built once from configs and saved with ``save_pretrained``.

``tiny:<name>`` model paths resolve here. Each part is written to ``<cache>/tiny/<VERSION>/<name>``
exactly as a real checkpoint directory looks, so tests and the demo load them through the same
``from_pretrained`` code as CLIP, Llama or Phi-2 weights. Two parts are briefly pretrained so the
tiny pipeline can learn in minutes, standing in for the real models' pretraining:

- the vision tower on phantom attributes (modality, body part, lesions, per-patch organ/lesion),
- the language models on the text of the synthetic corpus (question -> answer priors).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

TINY_VERSION = "v4"  # bump when a build changes in a way the source digest below cannot see
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<image>"]
VISION_IMAGE_SIZE = 64
VISION_PATCH = 8
# Builds pretrain on one intra-op thread: the result depends on the thread count (reductions split
# differently), so a fixed count makes the cache the same on every machine with the same kernels.
BUILD_THREADS = 1
_REPO = Path(__file__).resolve().parents[2]
# what each build reads besides this file (the tokenizer's sources are every LM's too)
_CORPUS = ("datamodules/synthetic/phantoms.py", "datamodules/synthetic/questions.py")
BUILD_SOURCES: dict[str, tuple[str, ...]] = {
    "tokenizer": _CORPUS,
    "llama": _CORPUS,
    "qwen2": _CORPUS,
    "phi": _CORPUS,
    "stablelm": _CORPUS,
    "clip": ("datamodules/synthetic/phantoms.py", "datamodules/images.py"),
    "sam": (),
    "medsam": ("datamodules/synthetic/phantoms.py", "lightningmodules/models/grounding.py"),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDPIPE_CACHE", Path.home() / ".cache" / "medpipe"))


def resolve_model_path(path: str, cache_dir: str | Path | None = None) -> Path:
    """A checkpoint directory: ``tiny:<name>`` is built on first use, anything else is a path."""
    if path.startswith("tiny:"):
        return ensure_tiny(path.removeprefix("tiny:"), cache_dir)
    return Path(path).expanduser()


def build_inputs(name: str) -> dict[str, str]:
    """Everything that decides the bytes of a tiny build: recipe version, the sources it runs, the library
    versions, the CPU kernels torch dispatches to and the thread count. Two machines agreeing on all of
    these build the same weights."""
    import tokenizers
    import transformers

    from lightningmodules.models.language import DEFAULT_CHAT_TEMPLATE

    sources = hashlib.sha256(Path(__file__).read_bytes())
    for relative in BUILD_SOURCES[name]:
        sources.update((_REPO / relative).read_bytes())
    sources.update(DEFAULT_CHAT_TEMPLATE.encode())
    return {
        "recipe": TINY_VERSION,
        "sources": sources.hexdigest()[:16],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "auto"),
        "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "auto"),
        "build_threads": str(BUILD_THREADS),
    }


def _digest(inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def cache_key(name: str) -> str:
    return _digest(build_inputs(name))


def ensure_tiny(name: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/tiny/<name>-<key>``, built on first use; the key changes with anything that changes the build."""
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; available: {sorted(BUILDERS)}")
    cache = Path(cache_dir or default_cache_dir())
    root = cache / "tiny"
    inputs = build_inputs(name)
    target = root / f"{name}-{_digest(inputs)}"
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    start = time.perf_counter()
    log.info("building tiny:%s into %s (once per cache key)", name, target)
    with _build_threads():
        BUILDERS[name](tmp, cache)
    (tmp / "build_inputs.json").write_text(json.dumps(inputs, indent=1, sort_keys=True) + "\n")
    (tmp / ".complete").write_text(f"built in {time.perf_counter() - start:.1f}s\n")
    try:
        os.replace(tmp, target)  # atomic: concurrent builders never see half a checkpoint
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return target


@contextmanager
def _build_threads():
    """BUILD_THREADS for the build, and the caller's random state untouched: a run that builds its tiny models
    (cold cache) must initialise everything after that exactly as a run that finds them built."""
    import random

    saved_threads, saved_random, saved_numpy = torch.get_num_threads(), random.getstate(), np.random.get_state()
    torch.set_num_threads(BUILD_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(saved_threads)
        random.setstate(saved_random)
        np.random.set_state(saved_numpy)


# -- synthetic corpus ---------------------------------------------------------------------------


def synthetic_corpus(n_phantoms: int = 1500, seed: int = 123) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from the phantom generator, for the tiny tokenizer and LMs.

    The prompt starts with the phantom's report, standing in for the image: the LM learns to
    answer questions from a description in its context and to repeat the description when asked.
    LLaVA-style alignment then teaches the connector to put the image's content where those words
    were, and the LM's skills carry over to images.
    """
    from datamodules.synthetic.phantoms import make_phantom
    from datamodules.synthetic.questions import CAPTION_PROMPTS, phantom_questions, report_text

    rng = np.random.default_rng(seed)
    pairs: list[tuple[str, str]] = []
    for i in range(n_phantoms):
        p = make_phantom(i, seed=seed, size=32)  # attributes only; pixels are not used
        report = report_text(p)
        pairs += [(f"{report}\n{qa.question}", qa.answer) for qa in phantom_questions(p, rng, 6)]
        pairs.append((f"{report}\n{CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)]}", report))
    return pairs


def _build_tokenizer(out: Path, _cache: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lightningmodules.models.language import DEFAULT_CHAT_TEMPLATE

    texts = [f"USER: {q}\nASSISTANT: {a}" for q, a in synthetic_corpus(600)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.save_pretrained(out)


def _load_tiny_tokenizer(cache: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny("tokenizer", cache))


# -- language models ----------------------------------------------------------------------------


def _lm_config(family: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=8,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(num_key_value_heads=8, **common)
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(num_key_value_heads=8, **common)
    if family == "phi":
        from transformers import PhiConfig

        return PhiConfig(partial_rotary_factor=0.5, **common)
    if family == "stablelm":
        from transformers import StableLmConfig

        return StableLmConfig(num_key_value_heads=8, partial_rotary_factor=0.25, **common)
    raise ValueError(family)


def warmup_cosine(step: int, *, total: int, warmup: float = 0.05) -> float:
    """LR multiplier for the tiny models' pretraining: 5% linear warmup, then cosine to zero."""
    n_warm = max(1, int(total * warmup))
    if step < n_warm:
        return (step + 1) / n_warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))


def _encode_corpus(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chat-formatted (prompt, answer) pairs -> ids, attention mask and answer-only labels."""
    ids, labels = [], []
    for prompt, answer in pairs:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
        )
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        tail_ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
        ids.append(head_ids + tail_ids)
        labels.append([-100] * len(head_ids) + tail_ids)
    longest = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (longest - len(x)) for x in ids])  # (N, T)
    mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids])  # (N, T)
    label_ids = torch.tensor([y + [-100] * (longest - len(y)) for y in labels])  # (N, T)
    return input_ids, mask, label_ids


def _pretrain_lm(
    model: nn.Module, tokenizer, *, steps: int, seed: int = 0, peak_lr: float = 3e-3, batch_size: int = 64
) -> float:
    """Answer-only next-token training on the corpus under a cosine schedule; returns held-out accuracy
    of the first answer token."""
    torch.manual_seed(seed)
    ids, mask, labels = _encode_corpus(tokenizer, synthetic_corpus(1000))
    val_ids, val_mask, val_labels = _encode_corpus(tokenizer, synthetic_corpus(150, seed=321))
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, total=steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=gen)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=val_ids, attention_mask=val_mask).logits  # (N, T, V)
    first = (val_labels != -100).float().argmax(1)  # (N,) position of the first answer token
    rows = torch.arange(val_ids.shape[0])
    predicted = logits[rows, first - 1].argmax(-1)
    accuracy = float((predicted == val_ids[rows, first]).float().mean())
    log.info("tiny LM pretrained for %d steps; held-out first-answer-token accuracy %.3f", steps, accuracy)
    return accuracy


def _lm_builder(family: str, pretrain_steps: int) -> Callable[[Path, Path], None]:
    def build(out: Path, cache: Path) -> None:
        from transformers import AutoModelForCausalLM

        tokenizer = _load_tiny_tokenizer(cache)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_lm_config(family, len(tokenizer)))
        if pretrain_steps > 0:
            _pretrain_lm(model, tokenizer, steps=pretrain_steps)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return build


# -- vision tower -------------------------------------------------------------------------------


def phantom_vision_batch(n: int, seed: int, image_size: int = VISION_IMAGE_SIZE):
    """Pixels as the data pipeline delivers them (JPEG round trip + CLIP transform) and targets."""
    from PIL import Image

    from datamodules.images import ImageTransform
    from datamodules.synthetic.phantoms import BODY_PARTS, LESION_ORGANS, MODALITIES, make_phantom

    organ_names = sorted({o for organs in LESION_ORGANS.values() for o in organs})
    transform = ImageTransform(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    grid = image_size // VISION_PATCH
    pixels, modality, part, count, organ, side, patch_lesion = [], [], [], [], [], [], []
    for i in range(n):
        p = make_phantom(i, seed=seed, size=128)
        buf = io.BytesIO()
        Image.fromarray(p.image).convert("RGB").save(buf, format="JPEG", quality=95)
        pixels.append(transform(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        modality.append(MODALITIES.index(p.modality))
        part.append(BODY_PARTS.index(p.body_part))
        count.append(p.lesion_count)
        organ.append(organ_names.index(p.lesion_organ) + 1 if p.lesions else 0)
        side.append({None: 0, "left": 1, "right": 2}[p.lesion_side])
        lesion = p.lesion_mask if p.lesion_mask is not None else np.zeros(p.image.shape, bool)
        cell = lesion.shape[0] // grid
        per_patch = lesion.reshape(grid, cell, grid, cell).mean(axis=(1, 3)) > 0.05  # (g, g)
        patch_lesion.append(torch.from_numpy(per_patch.reshape(-1)))
    targets = {
        "modality": torch.tensor(modality),
        "part": torch.tensor(part),
        "count": torch.tensor(count),
        "organ": torch.tensor(organ),
        "side": torch.tensor(side),
        "patch_lesion": torch.stack(patch_lesion).float(),
    }
    return torch.stack(pixels), targets, len(organ_names) + 1


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _build_clip(out: Path, _cache: Path, pretrain_steps: int = 1000) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=VISION_IMAGE_SIZE,
        patch_size=VISION_PATCH,
        projection_dim=64,
    )
    model = CLIPVisionModel(config)
    if pretrain_steps > 0:
        _pretrain_vision(model, steps=pretrain_steps)
    model.save_pretrained(out)
    CLIPImageProcessorPil(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(out)


GLOBAL_TARGETS = ("modality", "part", "count", "organ", "side")


def _pretrain_vision(
    model: nn.Module, *, steps: int, select_layer: int = -2, peak_lr: float = 4e-3, batch_size: int = 64
) -> dict[str, float]:
    """Supervised pretraining on phantom attributes, read from the ``select_layer`` patch tokens.

    Global attributes are predicted from the mean patch token, lesions also per patch, so the
    patch tokens the LLM sees carry what the questions ask about.
    """
    pixels, targets, n_organs = phantom_vision_batch(3000, seed=1)
    val_pixels, val_targets, _ = phantom_vision_batch(300, seed=2)
    d = model.config.hidden_size
    sizes = {"modality": 3, "part": 3, "count": 3, "organ": n_organs, "side": 3}
    heads = nn.ModuleDict({k: nn.Linear(d, n) for k, n in sizes.items()})
    heads["patch_lesion"] = nn.Linear(d, 1)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, total=steps))
    gen = torch.Generator().manual_seed(0)

    def run(px: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = model(pixel_values=px, output_hidden_states=True).hidden_states[select_layer][:, 1:]  # (B, P, D)
        out = {k: heads[k](hidden.mean(1)) for k in GLOBAL_TARGETS}  # each (B, n_k)
        out["patch_lesion"] = heads["patch_lesion"](hidden).squeeze(-1)  # (B, P)
        return out

    model.train()
    for _ in range(steps):
        idx = torch.randint(0, pixels.shape[0], (batch_size,), generator=gen)
        out = run(pixels[idx])
        loss = sum(F.cross_entropy(out[k], targets[k][idx]) for k in GLOBAL_TARGETS)
        loss = loss + 2.0 * F.binary_cross_entropy_with_logits(out["patch_lesion"], targets["patch_lesion"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        out = run(val_pixels)
    acc = {k: float((out[k].argmax(-1) == val_targets[k]).float().mean()) for k in GLOBAL_TARGETS}
    acc["presence"] = float(((out["count"].argmax(-1) > 0) == (val_targets["count"] > 0)).float().mean())
    log.info(
        "tiny CLIP pretrained for %d steps; held-out accuracy %s",
        steps,
        ", ".join(f"{k} {v:.2f}" for k, v in acc.items()),
    )
    return acc


# -- SAM (pixel grounding) ----------------------------------------------------------------------

SAM_IMAGE_SIZE = 64
SAM_PATCH = 8


def _build_sam(out: Path, _cache: Path, width: int = 32, image_size: int = SAM_IMAGE_SIZE) -> None:
    """Tiny SAM (random weights) in the real checkpoint layout: 64 px input, 8x8 embedding grid,
    32-d prompts, 32x32 low-res masks, plus the SAM image processor config (ImageNet mean/std)."""
    from transformers import SamConfig, SamModel
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(0)
    grid = image_size // SAM_PATCH
    config = SamConfig(
        vision_config=dict(
            hidden_size=width,
            output_channels=width,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=SAM_PATCH,
            mlp_dim=64,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=width // 2,  # 2 * num_pos_feats = prompt dim
            initializer_range=0.02,
        ),  # SamVisionConfig's 1e-10 would give constant features
        prompt_encoder_config=dict(
            hidden_size=width, image_size=image_size, patch_size=SAM_PATCH, mask_input_channels=8
        ),
        mask_decoder_config=dict(
            hidden_size=width, mlp_dim=2 * width, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=width
        ),
    )
    SamModel(config).save_pretrained(out)
    SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": 4 * grid},
        mask_pad_size={"height": 4 * grid, "width": 4 * grid},
    ).save_pretrained(out)


def _pretrain_sam(
    model: nn.Module, *, steps: int, batch_size: int = 16, seed: int = 0, peak_lr: float = 3e-3, n_images: int = 600
) -> float:
    """Promptable segmentation on phantom masks (lesions and organs) from box and point prompts, all
    parts training: stands in for SAM / SAM-Med2D pretraining, so the frozen image encoder of the tiny
    grounding runs has features that separate lesions from tissue. Returns the final mean Dice."""
    import numpy as np
    import torch.nn.functional as F

    from datamodules.synthetic.phantoms import make_phantom
    from lightningmodules.models.grounding import sam_preprocess

    size = model.config.vision_config.image_size
    low_res = 4 * model.config.prompt_encoder_config.image_embedding_size
    pixels, targets, boxes, points = [], [], [], []
    for i in range(n_images):
        p = make_phantom(i, seed=seed + 7000, size=128)
        candidates = ([p.lesion_mask] if p.lesion_mask is not None else []) * 2 + [
            m for m in p.organ_masks.values() if m.any()
        ]
        mask = candidates[i % len(candidates)]
        pixels.append(sam_preprocess(np.stack([p.image] * 3, axis=-1), image_size=size)[0])
        target = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, 128, 128)
        targets.append(F.interpolate(target, size=(low_res, low_res), mode="area")[0, 0])  # (m, m)
        ys, xs = np.nonzero(mask)
        scale = size / 128.0
        boxes.append([xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale, (ys.max() + 1) * scale])
        k = len(xs) // 2
        points.append([xs[k] * scale + 0.5, ys[k] * scale + 0.5])
    pixels, targets = torch.stack(pixels), torch.stack(targets)  # (N, 3, S, S), (N, m, m)
    boxes, points = (
        torch.tensor(boxes, dtype=torch.float32),
        torch.tensor(points, dtype=torch.float32),
    )  # (N, 4), (N, 2)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.0)
    model.train()
    dice = 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * warmup_cosine(step, total=steps)
        idx = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        use_box = step % 2 == 0
        prompt = (
            {"input_boxes": boxes[idx][:, None]}
            if use_box  # (b, 1, 4)
            else {
                "input_points": points[idx][:, None, None],
                "input_labels": torch.ones(batch_size, 1, 1, dtype=torch.long),
            }
        )
        out = model(pixel_values=pixels[idx], multimask_output=False, **prompt)
        logits = out.pred_masks[:, 0, 0]  # (b, m, m)
        target = targets[idx]  # (b, m, m)
        prob = torch.sigmoid(logits)
        dice_terms = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)  # (b,)
        loss = F.binary_cross_entropy_with_logits(logits, target) + dice_terms.mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        batch_dice = float(1 - dice_terms.detach().mean())
        dice = 0.9 * dice + 0.1 * batch_dice if step else batch_dice
    model.eval()
    return dice


def _build_medsam(out: Path, _cache: Path, pretrain_steps: int = 1600) -> None:
    """``tiny:medsam``: a tiny SAM (128 px input, 16x16 grid) pretrained on phantom masks (``_pretrain_sam``,
    a phantom stream disjoint from the synthetic datasets'); it stands in for SAM-Med2D (trained on
    SA-Med2D-20M) in the MedPLIB recipe's tiny runs. ``tiny:sam`` (64 px) stays random. 1600 steps (~1 min): with
    400 (final running Dice 0.30) the tiny grounding run's test mDice sat at 0.58-0.62 whatever its own length;
    with 1600 (Dice 0.53) it reaches 0.74."""
    from transformers import SamModel

    _build_sam(out, _cache, image_size=2 * SAM_IMAGE_SIZE)  # 128 px: the phantoms' own size, 64x64 masks
    torch.manual_seed(0)
    model = SamModel.from_pretrained(out)
    dice = _pretrain_sam(model, steps=pretrain_steps)  # on BUILD_THREADS, like every build
    model.save_pretrained(out)
    (out / "pretraining.txt").write_text(
        f"promptable phantom segmentation, {pretrain_steps} steps, final running Dice {dice:.3f}\n"
    )


MODEL_NAMES = ("clip", "llama", "phi", "qwen2", "stablelm", "sam", "medsam")  # what a model path may name

BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "tokenizer": _build_tokenizer,
    "llama": _lm_builder("llama", pretrain_steps=600),
    "qwen2": _lm_builder("qwen2", pretrain_steps=0),
    "phi": _lm_builder("phi", pretrain_steps=0),
    "stablelm": _lm_builder("stablelm", pretrain_steps=0),
    "clip": _build_clip,
    "sam": _build_sam,
    "medsam": _build_medsam,
}
