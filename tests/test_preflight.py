"""Pre-flight checks (issue 14, point 8): LoRA targets and trainable groups resolve in the built model, per
family, and model paths are checkpoint folders, all checked before any stage trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "experiments" / "demo.yaml"

PHI_LORA_ERROR = (
    "stages.instruct.lora.target_modules: gate_proj, up_proj not in the LLM "
    "(its Linear layers: q_proj, k_proj, v_proj, dense, fc1, fc2, lm_head)"
)


def _demo(tmp_path: Path, *overrides: str, check_paths: bool = True):
    from pipeline.config import load_config

    base = [f"output_dir={tmp_path}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    return load_config(DEMO, [*base, *overrides], check_paths=check_paths)


def test_phi_lora_targets_fail_before_any_stage_trains(tmp_path: Path, cache_dir: Path) -> None:
    """Llama's FFN names on a Phi LLM (fc1 / fc2, dense): the run stops before its first stage starts."""
    from pipeline.preflight import PreflightError
    from pipeline.runner import run_experiment

    cfg = _demo(tmp_path, "model.llm.path=tiny:phi", "stages.instruct.lora.target_modules=[q_proj,gate_proj,up_proj]")
    started: list[str] = []
    with pytest.raises(PreflightError) as info:
        run_experiment(cfg, on_stage_start=lambda name, model: started.append(name))
    assert str(info.value) == PHI_LORA_ERROR
    assert started == []  # stage align (which has no LoRA) did not train either
    assert not (tmp_path / "out" / "stages").exists()
    assert not (tmp_path / "mlflow.db").exists()  # nothing was logged: the check runs before the MLflow run


def test_phi_targets_pass_and_all_linear_always_resolves(tmp_path: Path, cache_dir: Path) -> None:
    from pipeline.preflight import preflight

    preflight(_demo(tmp_path, "model.llm.path=tiny:phi", "stages.instruct.lora.target_modules=[q_proj,fc1,fc2]"))
    preflight(_demo(tmp_path, "model.llm.path=tiny:phi"))  # the demo's all-linear


def test_lora_targets_match_as_peft_matches_them(tiny_llama: Path, cache_dir: Path) -> None:
    """A target is a module's last name or a dotted suffix of its name."""
    from transformers import AutoConfig

    from lightningmodules.models.language import causal_lm_from_config
    from pipeline.preflight import linear_names
    from pipeline.trainable import LoraTargetError, lora_targets

    llm = causal_lm_from_config(AutoConfig.from_pretrained(tiny_llama), vocab_size=64)
    assert "gate_proj" in linear_names(llm) and "fc1" not in linear_names(llm)
    assert lora_targets(llm, ["q_proj", "mlp.down_proj"]) == ["q_proj", "mlp.down_proj"]
    assert lora_targets(llm, ["all-linear"]) == "all-linear"
    with pytest.raises(LoraTargetError, match=r"^fc1, dense not in the LLM \(its Linear layers: q_proj, "):
        lora_targets(llm, ["q_proj", "fc1", "dense"])


def test_an_empty_trainable_group_fails_naming_the_groups_the_model_has(tmp_path: Path, cache_dir: Path) -> None:
    """MedPLIB without its region adapter: stage IV's ``region`` group (it trains the adapter, as released) has
    no parameters."""
    from pipeline.config import load_config
    from pipeline.preflight import PreflightError, preflight

    cfg = load_config(
        REPO / "experiments" / "medplib" / "tiny.yaml",
        ["model.grounding.region=false", f"output_dir={tmp_path}/out"],
        check_paths=False,
    )
    with pytest.raises(PreflightError) as info:
        preflight(cfg, checkpoints=False)
    message = str(info.value)
    assert message.startswith("stages.moe.train: region has no parameters in this model (groups with")
    assert "connector" in message and "lora" in message and "grounding" in message


@pytest.mark.parametrize("recipe", ["demo.yaml", "med_moe/med_moe.yaml", "medplib/medplib.yaml", "uni_med/recipe.yaml"])
def test_shipped_recipes_pass_preflight_at_paper_size(recipe: str, tmp_path: Path, cache_dir: Path) -> None:
    """Every stage of the papers' recipes resolves on the paper-size models (meta device, no memory)."""
    from pipeline.config import load_config
    from pipeline.preflight import preflight

    cfg = load_config(REPO / "experiments" / recipe, [f"output_dir={tmp_path}/out"], check_paths=False)
    preflight(cfg, checkpoints=False)


def test_medplib_with_phi2_fails_at_stage_three_lora(tmp_path: Path) -> None:
    """The issue's report: MedPLIB's stage III targeted gate/up/down_proj, which Phi-2 does not have (the recipe
    now says ``mlp``, which resolves on Phi-2: tests/test_lora_targets.py)."""
    from pipeline.config import load_config
    from pipeline.preflight import PreflightError, preflight

    cfg = load_config(
        REPO / "experiments" / "medplib" / "medplib.yaml",
        [
            "model.llm.path=/models/phi-2",
            f"output_dir={tmp_path}/out",
            "stages.grounding_expert.lora.target_modules=[gate_proj,up_proj,down_proj]",
        ],
        check_paths=False,
    )
    with pytest.raises(PreflightError) as info:
        preflight(cfg, checkpoints=False)
    assert str(info.value) == (
        "stages.grounding_expert.lora.target_modules: gate_proj, up_proj, down_proj not in the LLM "
        "(its Linear layers: q_proj, k_proj, v_proj, dense, fc1, fc2, lm_head)"
    )


def _folder(root: Path, *files: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).write_text(json.dumps({}))
    return root


def test_a_folder_that_is_not_a_checkpoint_names_the_missing_files(tmp_path: Path) -> None:
    from pipeline.preflight import NotACheckpointError, require_checkpoint

    empty = _folder(tmp_path / "empty")
    with pytest.raises(NotACheckpointError) as info:
        require_checkpoint("model.llm.path", str(empty), tokenizer=True)
    message = str(info.value)
    assert message.startswith(f"model.llm.path: {empty} is not a checkpoint folder: no config.json; no tokenizer")
    assert "model.safetensors" in message

    llm = _folder(tmp_path / "llm", "config.json", "model.safetensors")
    with pytest.raises(NotACheckpointError, match=r"no tokenizer files \(one of tokenizer.json, tokenizer.model"):
        require_checkpoint("model.llm.path", str(llm), tokenizer=True)
    require_checkpoint("model.llm.path", str(_folder(llm, "tokenizer.json")), tokenizer=True)

    vision = _folder(tmp_path / "vision", "config.json", "model.safetensors")
    with pytest.raises(NotACheckpointError, match="no preprocessor_config.json in it"):
        require_checkpoint("model.vision.path", str(vision), processor=True)
    with pytest.raises(NotACheckpointError, match="does not exist"):
        require_checkpoint("model.vision.path", str(tmp_path / "absent"), processor=True)
    require_checkpoint("model.vision.path", "tiny:clip", processor=True)  # the zoo builds it on first use


def test_run_names_the_not_a_checkpoint_llm_folder(tmp_path: Path, cache_dir: Path) -> None:
    """A folder with a config.json and weights but no tokenizer files: named before the tokenizer is read."""
    from pipeline.preflight import NotACheckpointError
    from pipeline.runner import run_experiment

    llm = _folder(tmp_path / "llm", "config.json", "model.safetensors")
    with pytest.raises(NotACheckpointError, match=r"^model.llm.path: .* is not a checkpoint folder: no tokenizer"):
        run_experiment(_demo(tmp_path, f"model.llm.path={llm}"))


# -- the first record of every dataset split, encoded with the model's chat template --------------------------

# the tiny Llama's template (llava's plain vicuna turns), but the assistant role raises as a prompt-only template's
# would; a template that drops the user's content (and with it the <image> placeholder)
REJECTS_ASSISTANT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ raise_exception('Conversation roles must be user only') }}{% endif %}"
    "USER: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
DROPS_USER_CONTENT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}USER:\n"
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _demo_with_template(tmp_path: Path, template: str, *overrides: str):
    """The demo with ``model.llm.chat_template`` set in an experiment file, as a user sets one."""
    from pipeline.config import load_config

    experiment = tmp_path / "templated.yaml"
    experiment.write_text(f"defaults: [{DEMO}]\nmodel:\n  llm:\n    chat_template: {json.dumps(template)}\n")
    base = [f"output_dir={tmp_path}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    return load_config(experiment, [*base, *overrides])


def test_demo_encodes_the_first_record_of_every_split_it_reads(tmp_path: Path, cache_dir: Path) -> None:
    from pipeline.preflight import data_checks, preflight

    cfg = _demo(tmp_path)
    assert data_checks(cfg) == [
        ("stages.align", "phantom_captions", "train", True),
        ("stages.align", "phantom_captions", "val", True),
        ("stages.align (evaluation)", "phantom_slake", "test", False),
        ("stages.instruct", "phantom_slake", "train", True),
        ("stages.instruct", "phantom_slake", "val", True),
    ]
    preflight(cfg)
    assert (tmp_path / "out" / "data" / "phantom_slake").is_dir()  # the synthetic data it read, written once


def test_a_template_rejecting_the_assistant_role_fails_before_any_stage_trains(tmp_path: Path, cache_dir: Path) -> None:
    from pipeline.preflight import PreflightError
    from pipeline.runner import run_experiment

    cfg = _demo_with_template(tmp_path, REJECTS_ASSISTANT)
    started: list[str] = []
    with pytest.raises(PreflightError) as info:
        run_experiment(cfg, on_stage_start=lambda name, model: started.append(name))
    assert str(info.value) == (
        "stages.align: dataset phantom_captions, train split (train), record phantom_captions/cap-0 "
        "(training encoding): the chat template failed: Conversation roles must be user only"
    )
    assert started == [] and not (tmp_path / "out" / "stages").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_a_template_dropping_the_user_content_and_an_overlong_prompt_fail_naming_the_record(
    tmp_path: Path, cache_dir: Path
) -> None:
    from pipeline.preflight import PreflightError, preflight

    cfg = _demo_with_template(tmp_path, DROPS_USER_CONTENT)
    with pytest.raises(
        PreflightError,
        match=r"^stages.align: dataset phantom_captions, train split \(train\), record "
        r"phantom_captions/cap-0 \(training encoding\): the encoded conversation has 0 image tokens",
    ):
        preflight(cfg)
    with pytest.raises(PreflightError) as info:
        preflight(_demo(tmp_path, "data.max_length=12"))
    message = str(info.value)
    assert message.startswith(
        "stages.align: dataset phantom_captions, train split (train), record phantom_captions/cap-0"
    )
    assert message.endswith("longer than data.max_length=12; raise max_length") and "\n" not in message
    # under skip the DataModule leaves such records out and counts them: the pre-flight lets the run start
    preflight(_demo(tmp_path, "data.max_length=12", "data.on_bad_record=skip"))


def test_evaluation_datasets_are_checked_as_generation_prompts(tmp_path: Path, cache_dir: Path) -> None:
    """Stage align trains on captions only and is evaluated on the VQA test split: a template that fails only on
    the VQA questions is named at align's evaluation, as generation prompts."""
    from pipeline.preflight import PreflightError, preflight

    template = (
        "{{ bos_token }}{% for message in messages %}{% if 'normal' in message['content'] %}"
        "{{ raise_exception('no such question') }}{% endif %}{% if message['role'] == 'user' %}"
        "USER: {{ message['content'] }}\n{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    cfg = _demo_with_template(tmp_path, template)
    with pytest.raises(PreflightError) as info:
        preflight(cfg)
    assert str(info.value) == (
        "stages.align (evaluation): dataset phantom_slake, test split (test), record phantom_slake/1620 "
        "(generation prompt): the chat template failed: no such question"
    )
