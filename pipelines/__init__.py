"""The top floor: the jobs and their command lines. Each job schedules the middle floor's work on Ray.

``ultraclean`` (ingest -> verify seeds -> train classifier -> score -> select -> verify output, as a step table),
``ingest``, ``score``, ``selection`` (with ``derived`` for versions made from a parent), ``verify`` (two-stage
annealing verification) and ``ultrachat`` (SFT synthesis). Nothing below imports this package.
"""
