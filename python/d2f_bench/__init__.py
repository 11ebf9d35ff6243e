"""Benchmarks of d2f_ext, each a module run with ``python -m d2f_bench.<name>`` that prints a table
and writes JSON, a markdown table and a plot: ``kernels``, ``step``, ``decode``, ``conformance``,
``serve`` and ``ar``. ``tiny`` writes the small checkpoints the benchmarks and the tests use;
``common`` holds the timing and report helpers.
"""
