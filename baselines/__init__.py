"""Baseline editors: one module per method, each registered by name in ``oig.registry``."""
