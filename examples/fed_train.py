"""The main job: federated fine-tuning from a YAML config.

    python examples/fed_train.py --config examples/configs/demo.yaml [--num_rounds 3 ...]
    accelerate launch examples/fed_train.py --config examples/configs/demo.yaml
    fedsrd train --config examples/configs/demo.yaml

Arguments are FedSRDConfig + transformers.TrainingArguments + ModelDataArguments (see `--help`); values on the command
line override the YAML.
"""

from fedsrd.cli import run_train

if __name__ == "__main__":
    run_train()
