"""The engine: turns a config into a run that owns its workdir.

The library (``sparse_robust.*``) is pure JAX over pytrees; this package is where configs, files,
locks and resumption live. Data flow one way: config -> :mod:`schema` -> :mod:`context` ->
pipelines (:mod:`lottery` chain, :mod:`branches`) -> records in the :mod:`layout` -> report.
"""
