"""An example oig plugin: one editor (:class:`~oig_plugin_example.editor.MaskedSwap`), one metric
(:class:`~oig_plugin_example.metric.OutsideChange`) and their Hydra configs (``conf/``), registered
with oig through the entry points in ``pyproject.toml``."""
