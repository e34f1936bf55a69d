"""Reproduction experiments for the paper's claims: ``espro experiment NAME``.

Each experiment is a module with a ``run(ctx)`` function; :mod:`.registry` lists them and runs
one end to end (timing, ``results.json``, ``report.md`` with PNG figures). matplotlib is
imported only here, inside the experiments, never by ``training.cli``.
"""
