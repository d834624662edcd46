"""UltraClean pipeline stages: small units with a typed config, a ``run`` generator and per-stage statistics."""
