import sys

from fulltune.cli import main

sys.exit(main())
