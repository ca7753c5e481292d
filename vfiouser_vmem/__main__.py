import sys

from vfiouser_vmem.cli import main

sys.exit(main())
