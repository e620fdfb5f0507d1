import sys

from hetmm_jax.cli import main

sys.exit(main())
