"""Helpers every layer shares: answer normalisation, the box text format, de-duplication by id, model path
prefixes and the config's choices.

A leaf package: it imports nothing from ``pipeline``, ``datamodules`` or ``lightningmodules``, and no torch,
so datamodules, the model parts, the LightningModules and the config validation can all use it
(``tests/test_import_rules.py``).
"""
