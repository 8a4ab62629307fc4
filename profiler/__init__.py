"""natten's profiler: ``python -m natten.profiler --help``.

Installed as the package ``natten.profiler`` (source folder ``profiler/``), with the console
script ``natten-profiler``.
"""

from .cli import main
from .problem import Problem
from .timing import Timing, measure, time_pass

__all__ = ["main", "Problem", "Timing", "measure", "time_pass"]
