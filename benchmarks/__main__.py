"""`python -m benchmarks`: every performance figure in one run; see `benchmarks/run.py`."""

from benchmarks.run import main

raise SystemExit(main())
