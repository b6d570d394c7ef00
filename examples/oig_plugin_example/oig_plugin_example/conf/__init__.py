"""Hydra config groups of the example plugin, appended to ``oig-run``'s search path (entry point
``oig.configs``); the same layout as ``oig/conf``."""
