"""Flax modules that hold parameters and wire the ops together.

``build.build_model(config)`` is the only place a config is read; every module
takes plain keyword arguments whose defaults are the paper's recipe.
"""
