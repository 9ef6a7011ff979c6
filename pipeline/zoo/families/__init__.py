"""Real-architecture checkpoints at tiny sizes, each saved as its family's download looks (``llms.py``: nine
LLM families with their tokenizers, chat templates and generation configs; ``towers.py``: CLIP-336, SigLIP
with even and odd grids, DINOv2 with registers). Built on first use through the same cache as every
``tiny:<name>`` (``pipeline/zoo/cache.py``); the tests' zoo x recipe matrix runs on them.
"""

from pipeline.zoo.families.llms import LLM_FAMILIES, LLMFamily, llm_builder
from pipeline.zoo.families.towers import TOWER_FAMILIES, TowerFamily, tower_builder

__all__ = ["LLM_FAMILIES", "TOWER_FAMILIES", "LLMFamily", "TowerFamily", "llm_builder", "tower_builder"]
