"""LLaVA-1.5 checkpoints in both layouts, imported into medpipe's model: every key accounted for, and the
imported model computes the source model's logits.

The sources are tiny checkpoints written here with random weights and the real key names and config fields:
the original release's ``LlavaLlamaForCausalLM`` folder (LLM keys, ``model.mm_projector.{0,2}``, with or
without ``model.vision_tower.vision_tower.*``) and transformers' ``LlavaForConditionalGeneration`` (its own
``save_pretrained``, and the earlier key names of the llava-hf folders). The references are independent: the
original layout's forward re-implemented here as LLaVA's ``prepare_inputs_labels_for_multimodal`` does it
(image features spliced at the ``-200`` position), and transformers' own Llava model for the HF layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from import_helpers import copy_tokenizer, image, ours_logits, random_clip
from safetensors.torch import save_file

from pipeline.config import ConfigError, load_config
from pipeline.model_factory import build_model

REPO = Path(__file__).resolve().parents[2]
TOWER = "model.vision_tower.vision_tower.vision_model."  # the original layout's CLIP keys (transformers 4.31)


def write_original_llava(root: Path, clip_dir: Path, llama_dir: Path, *, with_vision: bool) -> Path:
    """A LLaVA-1.5 release folder at tiny size (LLaVA-Med v1.5 when the LLM is a Mistral): config.json with
    the mm_* fields, safetensors weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = root / ("llava-with-tower" if with_vision else "llava")
    out.mkdir()
    config = AutoConfig.from_pretrained(llama_dir)
    torch.manual_seed(1)
    llm = AutoModelForCausalLM.from_config(config)
    clip = random_clip(clip_dir, seed=2)
    d_vision, d_llm = clip.config.hidden_size, config.hidden_size
    state = {k: v.clone() for k, v in llm.state_dict().items()}
    generator = torch.Generator().manual_seed(3)
    state["model.mm_projector.0.weight"] = torch.randn(d_llm, d_vision, generator=generator) * 0.1
    state["model.mm_projector.0.bias"] = torch.randn(d_llm, generator=generator) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(d_llm, d_llm, generator=generator) * 0.1
    state["model.mm_projector.2.bias"] = torch.randn(d_llm, generator=generator) * 0.1
    if with_vision:
        # the released folders' names (transformers 4.31: CLIPVisionModel's parameters under vision_model.)
        tower = {f"model.vision_tower.vision_tower.vision_model.{k}": v.clone() for k, v in clip.state_dict().items()}
        state.update(tower)
    save_file(state, str(out / "model.safetensors"))
    fields = {
        **config.to_dict(),
        "model_type": f"llava_{config.model_type}",  # llava_llama (LLaVA-1.5), llava_mistral (LLaVA-Med v1.5)
        "architectures": [f"Llava{type(llm).__name__}"],
        "mm_vision_tower": str(clip_dir),
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": d_vision,
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
    }
    (out / "config.json").write_text(json.dumps(fields))
    copy_tokenizer(llama_dir, out)
    return out


def write_hf_llava(root: Path, clip_dir: Path, llama_dir: Path, *, old_keys: bool) -> tuple[Path, int]:
    """transformers' LlavaForConditionalGeneration saved by itself (or with the earlier key names), plus the
    tokenizer with <image> and the CLIP image processor; returns the folder and the image token id."""
    from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    out = root / ("hf-llava-old" if old_keys else "hf-llava")
    out.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = AutoConfig.from_pretrained(llama_dir)
    text.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=AutoConfig.from_pretrained(clip_dir).to_dict() | {"model_type": "clip_vision_model"},
        text_config=text.to_dict(),
        image_token_index=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(4)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    if old_keys:  # the llava-hf folders' names (transformers < 4.52)
        from safetensors.torch import load_file

        state = load_file(str(out / "model.safetensors"))
        renamed = {}
        for key, value in state.items():
            if key.startswith("model.language_model."):
                key = "language_model.model." + key.removeprefix("model.language_model.")
            elif key == "lm_head.weight":
                key = "language_model.lm_head.weight"
            elif key.startswith("model.vision_tower."):  # transformers 4.x: CLIPVisionModel.vision_model
                key = "vision_tower.vision_model." + key.removeprefix("model.vision_tower.")
            elif key.startswith("model."):
                key = key.removeprefix("model.")
            renamed[key] = value
        save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    CLIPImageProcessor.from_pretrained(clip_dir).save_pretrained(out)
    return out, image_id


def _cfg(tmp: Path, *overrides: str):
    return load_config(
        REPO / "experiments" / "demo.yaml",
        [
            f"output_dir={tmp}/out",
            "model.connector.type=mlp",
            "model.connector.aggregation=none",
            "model.vision.select_layer=-2",
            *overrides,
        ],
        check_paths=False,
    )


@pytest.mark.parametrize(("family", "with_vision"), [("llama", False), ("llama", True), ("mistral-instruct", False)])
def test_original_llava_equals_its_own_forward(tmp_path, tiny_clip, cache_dir, family, with_vision) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

    from pipeline.zoo import ensure_tiny

    folder = write_original_llava(tmp_path, tiny_clip, ensure_tiny(family, cache_dir), with_vision=with_vision)
    cfg = _cfg(
        tmp_path,
        f"model.vision.path={tiny_clip}",
        "model.vision.pad_square=true",
        f"model.llm.path={folder}",
        f"model.init={{format: llava, path: {folder}}}",
    )
    built = build_model(cfg.model, cache_dir=cache_dir)
    # the reference: LLaVA's forward re-implemented on the folder's own tensors
    state = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    base = config["model_type"].removeprefix("llava_")
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**config, "model_type": base})).eval()
    llm.load_state_dict({k: v for k, v in state.items() if not k.startswith(("model.mm_projector", "model.vision"))})
    if with_vision:
        clip = random_clip(tiny_clip, seed=0)
        clip.load_state_dict({k.removeprefix(TOWER): v for k, v in state.items() if k.startswith(TOWER)})
    else:
        clip = CLIPVisionModel.from_pretrained(tiny_clip).eval()  # mm_vision_tower
    pixels = image()
    prefix, suffix = [1, 5, 9], [11, 12]
    with torch.no_grad():
        features = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, P, Dv)
        projected = torch.nn.functional.linear(
            torch.nn.functional.gelu(
                torch.nn.functional.linear(
                    features, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"]
                )
            ),
            state["model.mm_projector.2.weight"],
            state["model.mm_projector.2.bias"],
        )  # (1, P, D)
        embed = llm.get_input_embeddings()
        embeds = torch.cat(
            [embed(torch.tensor([prefix])), projected, embed(torch.tensor([suffix]))], dim=1
        )  # (1, T, D)
        reference = llm(inputs_embeds=embeds).logits[0]  # (T, V_src)
    ours = ours_logits(built, prefix, suffix, pixels)  # (T, V_src + added tokens)
    torch.testing.assert_close(ours[:, : reference.shape[1]], reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("old_keys", [False, True])
def test_hf_llava_equals_transformers_llava(tmp_path, tiny_clip, tiny_llama, cache_dir, old_keys) -> None:
    from transformers import LlavaForConditionalGeneration

    folder, image_id = write_hf_llava(tmp_path, tiny_clip, tiny_llama, old_keys=old_keys)
    cfg = _cfg(
        tmp_path,
        f"model.vision.path={folder}",
        "model.vision.pad_square=false",
        f"model.llm.path={folder}",
        f"model.init={{format: hf_llava, path: {folder}}}",
    )
    built = build_model(cfg.model, cache_dir=cache_dir)
    assert built.model.image_token_id == image_id  # the folder's own <image>
    reference_model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    pixels = image(6)
    prefix, suffix = [1, 5, 9], [11, 12]
    ids = torch.tensor([prefix + [image_id] * built.model.num_image_tokens + suffix])
    with torch.no_grad():
        reference = reference_model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits[0]
    torch.testing.assert_close(ours_logits(built, prefix, suffix, pixels), reference, atol=1e-4, rtol=1e-4)


def test_a_key_no_rule_knows_and_a_missing_key_are_named(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    from safetensors.torch import load_file

    folder = write_original_llava(tmp_path, tiny_clip, tiny_llama, with_vision=False)
    state = load_file(str(folder / "model.safetensors"))
    state["model.mm_projector.1.weight"] = torch.zeros(1)  # a projector this layout does not have
    del state["model.layers.0.mlp.down_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    cfg = _cfg(
        tmp_path,
        f"model.vision.path={tiny_clip}",
        "model.vision.pad_square=true",
        f"model.llm.path={folder}",
        f"model.init={{format: llava, path: {folder}}}",
    )
    with pytest.raises(ConfigError) as info:
        build_model(cfg.model, cache_dir=cache_dir)
    message = str(info.value)
    assert message.startswith("model.init: ") and "not a llava checkpoint" in message
    assert "model.mm_projector.1.weight" in message and "llm.model.layers.0.mlp.down_proj.weight" in message


def test_settings_that_disagree_with_the_checkpoint_name_the_key(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    folder = write_original_llava(tmp_path, tiny_clip, tiny_llama, with_vision=False)
    cfg = _cfg(
        tmp_path,
        f"model.vision.path={tiny_clip}",
        "model.vision.pad_square=false",  # the checkpoint pads (image_aspect_ratio: pad)
        f"model.llm.path={folder}",
        f"model.init={{format: llava, path: {folder}}}",
    )
    with pytest.raises(ConfigError, match=r"model.vision.pad_square: False, but .*image_aspect_ratio = 'pad'"):
        build_model(cfg.model, cache_dir=cache_dir)
    plain = _cfg(tmp_path, f"model.vision.path={tiny_clip}", f"model.llm.path={folder}")
    with pytest.raises(ConfigError, match=r"model.llm.path: .* is a LLaVA checkpoint .*set model.init"):
        build_model(plain.model, cache_dir=cache_dir)


@pytest.mark.parametrize("layout", ["llava", "hf_llava"])
def test_medpipe_evaluate_runs_on_the_imported_model(
    tmp_path, tiny_clip, tiny_llama, cache_dir, capsys, layout
) -> None:
    """``medpipe evaluate`` without ``ckpt``: the released checkpoint as it is, through ``model.init``."""
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main

    if layout == "llava":
        folder, vision, pad = (
            write_original_llava(tmp_path, tiny_clip, tiny_llama, with_vision=False),
            tiny_clip,
            "true",
        )
    else:
        folder, vision, pad = write_hf_llava(tmp_path, tiny_clip, tiny_llama, old_keys=False)[0], None, "false"
    vision = vision or folder
    code = main(
        [
            "evaluate",
            str(REPO / "experiments" / "demo.yaml"),
            f"output_dir={tmp_path}/out",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "mlflow.system_metrics=false",
            "model.connector.aggregation=none",
            f"model.vision.path={vision}",
            f"model.vision.pad_square={pad}",
            f"model.llm.path={folder}",
            f"model.init={{format: {layout}, path: {folder}}}",
            "data.datasets.phantom_slake.synthetic.train_images=6",
            "data.datasets.phantom_slake.synthetic.val_images=0",
            "data.datasets.phantom_slake.synthetic.test_images=3",
            "evaluation.max_new_tokens=3",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    (evaluation,) = (tmp_path / "out" / "evaluations").iterdir()  # its own folder, never eval/
    assert evaluation.name.endswith(f"-init-{layout}")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["n_scored"] == metrics["n_expected"] > 0
    assert metrics["provenance"]["weights"]["model_init"] == {"format": layout, "path": str(folder)}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("medpipe-demo").experiment_id
    runs = client.search_runs([experiment], filter_string="tags.stage = 'evaluate'")
    assert [r.data.tags["checkpoint"] for r in runs] == [f"model.init {layout}:{folder}"]  # what gave the numbers
