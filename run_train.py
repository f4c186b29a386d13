"""Report 03's command: ``python run_train.py --config configs/train.yaml`` (= ``amt-train``)."""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
