import sys

from koclip.train.main import main

sys.exit(main())
