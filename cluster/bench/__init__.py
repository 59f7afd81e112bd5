"""``framecast bench``: the benchmarks, apart from the control plane that runs them (as Ray
keeps ``serve/_private/benchmarks/``). Each measures on this machine, against baselines and
peers in the same run:

- :mod:`cluster.bench.model` - each model x each export, one thread and all cores; its work
  runs in child processes (``python -m cluster.bench.model``).
- :mod:`cluster.bench.serve` - direct LiteRT vs the same model behind Ray Serve.
- :mod:`cluster.bench.pipeline` - Kafka -> Serve -> Kafka at offered loads and flat out, vs a
  naive Keras-per-frame consumer.
- :mod:`cluster.bench.scaling` - the pipeline against Serve replicas x classifier processes.
- :mod:`cluster.bench.runs` - what pipeline and scaling share: fresh topics, the labels read
  back, their percentiles.
- :mod:`cluster.bench.report` - each section's ``bench-<what>.json|.md|.png`` and
  ``bench all``'s combined report.

The machine description and the report-file writer are :mod:`jobs.machine` (``framecast
sweep`` uses them too). The ``framecast bench`` command (cluster/cli.py) only parses options,
runs the sections and calls the writers.
"""
