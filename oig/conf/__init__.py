"""The Hydra configs of ``oig-run`` (``config.yaml`` and one folder per config group).

They ship inside the package so an installed ``oig`` (wheel or editable) finds them as
``pkg://oig.conf``; ``oig.run.CONF_DIR`` is this folder on disk. In a checkout the top-level
``conf/`` is a symbolic link to this folder, so ``conf/method/oig.yaml`` and
``oig/conf/method/oig.yaml`` are the same file.
"""
