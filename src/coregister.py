"""Co-register every date of a stack (one area, many dates) onto one reference date, on a Dask cluster.

    python src/coregister.py +stack=t36uya                               # a stack config from conf/stack/
    python src/coregister.py +stack.name=mine +stack.folder=PATH         # every product under a folder
    python src/coregister.py +stack=t36uya coregister.scheduler=tcp://host:8786   # a running Dask cluster

Outputs in outputs/coregister/<stack> (see s2match.timeseries). Exit status: 0 done (dates that could not be
registered are reported there), 1 bad input or configuration.
"""

from s2match.cli import run
from s2match.timeseries.run import coregister

if __name__ == "__main__":
    run(coregister)
