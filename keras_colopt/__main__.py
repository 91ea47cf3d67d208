import sys

from keras_colopt.cli import main

sys.exit(main())
