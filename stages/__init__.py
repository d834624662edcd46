"""The middle floor, UltraClean's stages: small units with a typed config, a ``run(data, rank, world_size)``
generator and per-stage accounting, after datatrove's ``PipelineStep``. Stages never know the executor (no Ray
here): the jobs in ``pipelines/`` schedule them. They build on ``core`` (and ``model`` for tokenizers)."""
