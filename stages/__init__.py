"""sppnet pipeline stages, side by side over ``stages.core``.

Each stage module has ``run(cfg, ...) -> StageResult``: it builds a ``core.runner.StagePlan`` (the upstream
manifests it reads, the config record its results depend on, the files it writes) and hands its work to
``core.runner.execute``, which skips it when up to date, locks its folder, times it and writes its manifest.
Stage names, commands, folders and tags are in ``core.registry``; no stage module imports another (checked by
import-linter in ``make test``).
"""
