"""The main job: federated fine-tuning from a YAML config.

    python examples/fed_train.py --config examples/configs/demo.yaml [--num_rounds 3 ...]
    accelerate launch examples/fed_train.py --config examples/configs/demo.yaml
    fedsrd train --config examples/configs/demo.yaml

Arguments are FedSRDConfig + transformers.TrainingArguments + ModelDataArguments (see `--help`); values on the command
line override the YAML.
"""

import sys

from fedsrd.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])  # bad input: `error: <one line>`, exit code 2 (FEDSRD_DEBUG=1: traceback)
