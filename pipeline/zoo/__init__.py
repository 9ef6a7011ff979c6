"""The model zoo: ``tiny:<name>`` model paths, built once from configs and saved with ``save_pretrained``.

Each part is written to ``<cache>/tiny/<name>-<key>`` exactly as a real checkpoint directory looks, so tests
and the demo load them through the same ``from_pretrained`` code as CLIP, Llama or Phi-2 weights. Some are
briefly pretrained (``pretrain.py``, one loop) so the tiny pipeline can learn in minutes, standing in for the
real models' pretraining: the vision tower on phantom attributes (``vision.py``), the language models on the
synthetic corpus (``language.py``, ``corpus.py``), the grounding SAM on phantom masks (``sam.py``).

Importing this package is cheap: the builders (torch, transformers) load when a model is built.
"""

from pipeline.zoo.cache import BUILD_SOURCES, BUILD_THREADS, TINY_VERSION, build_inputs, cache_key, ensure_tiny
from pipeline.zoo.paths import resolve_model_path

__all__ = [
    "BUILD_SOURCES",
    "BUILD_THREADS",
    "TINY_VERSION",
    "build_inputs",
    "cache_key",
    "ensure_tiny",
    "resolve_model_path",
]
