"""Configs that ship with Distillery (package data): teacher presets, ontologies, curation
rules and device profiles. Read them with :mod:`distillery.engine.config`
(``resolve_config``, ``list_configs``) or ``distillery configs list|show``."""
