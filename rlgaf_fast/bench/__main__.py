import sys

from rlgaf_fast.bench.cli import main

sys.exit(main())
