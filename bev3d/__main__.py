import sys

from bev3d.cli import main

sys.exit(main())
