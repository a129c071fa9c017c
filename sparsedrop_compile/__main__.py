import sys

from sparsedrop_compile.cli import main

sys.exit(main())
