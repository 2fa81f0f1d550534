"""Co-registration of a time series: every date of one area onto the grid of one reference date.

    python src/coregister.py +stack=t36uya [coregister.scheduler=tcp://host:8786]

- `stack.py`: which dates (catalogue AOI, folder or files), each opened with its cloud mask (s2match.s2.masks),
  surveyed on the AOI (clear share, picture), the too cloudy skipped, and the reference (default: the clearest);
- `graph.py`: the pairs to register (reference and neighbours in time), which are reliable, and each date's route
  to the reference: direct, or the most reliable chain, or failed (never forced);
- `matching.py`: one pair registered by the project's one registration path, with the pipeline built once per
  worker;
- `cluster.py`: where the tasks run: a Dask LocalCluster, a running Dask cluster, or this process; retries, and
  failures reported per task;
- `outputs.py`: the COG per date on the reference grid, shifts.csv, edges.csv, the shift plot, the HTML report;
- `run.py`: the entry point tying them together, and the MLflow run.
"""
