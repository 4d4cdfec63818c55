"""Bad input on the command line ends with `error: <one line>` on stderr and exit code 2, never a traceback
(issue #16, failure 9; the table in docs/reliability.md). Each case fails before any training starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsrd.cli import main
from fedsrd.server import save_adapter

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSRD_DEBUG", raising=False)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "columns.jsonl").write_text('{"foo": 1}\n{"foo": 2}\n')
    (tmp_path / "broken.jsonl").write_text('{"instruction": "x"\n')
    (tmp_path / "syntax.yaml").write_text("model_name_or_path: tiny-llama\nnum_rounds: [2\n")
    (tmp_path / "unknown.yaml").write_text("model_name_or_path: tiny-llama\nnum_roundz: 2\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken_config.json").write_text('{"algorithm": "fedavg",\n')
    (tmp_path / "update.bin").write_bytes(b"garbage")
    save_adapter({"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}, tmp_path / "global")
    (tmp_path / "extra_config.json").write_text('{"algorithm": "fedavg", "rounds": 3}')
    return tmp_path


TRAIN = ["train", "--model_name_or_path", "tiny-llama", "--report_to", "none", "--use_cpu", "true"]
TRAIN += ["--output_dir", "{d}/out"]

# (case, argv with {d} for the files' folder, what the one line must say)
CASES = [
    ("empty JSONL", [*TRAIN, "--data", "{d}/empty.jsonl", "--num_clients", "1"], ["empty.jsonl' is empty", "JSONL"]),
    ("JSONL that does not parse", [*TRAIN, "--data", "{d}/broken.jsonl", "--num_clients", "1"],
     ["cannot read", "broken.jsonl", "JSON parse error"]),
    ("data without instruction/output", [*TRAIN, "--data", "{d}/columns.jsonl", "--num_clients", "1"],
     ["missing column(s) ['instruction', 'output']", "['foo']"]),
    ("missing data file", [*TRAIN, "--data", "{d}/none.jsonl", "--num_clients", "1"],
     ["no such file or directory", "none.jsonl"]),
    ("missing model directory", ["train", "--model_name_or_path", "{d}/no_model"],
     ["no_model': no such directory", "Hub name"]),
    ("YAML syntax error", ["train", "--config", "{d}/syntax.yaml"], ["syntax.yaml: not valid YAML", "line 3"]),
    ("unknown key in the YAML", ["train", "--config", "{d}/unknown.yaml"],
     ["'num_roundz'", "unknown.yaml", "did you mean 'num_rounds'"]),
    ("YAML that is not a mapping", ["train", "--config", "{d}/list.yaml"], ["list.yaml: expected a mapping", "list"]),
    ("missing YAML file", ["train", "--config", "{d}/none.yaml"], ["--config: no such file", "none.yaml"]),
    ("unknown flag", [*TRAIN, "--num_roundz", "2"], ["'num_roundz' (on the command line; did you mean 'num_rounds'"]),
    ("value of the wrong type", [*TRAIN, "--num_rounds", "abc"], ["--num_rounds", "invalid int value: 'abc'"]),
    ("unknown algorithm", [*TRAIN, "--algorithm", "nope"], ["FedSRDConfig.algorithm", "'nope'", "fedavg"]),
    ("out-of-range value", [*TRAIN, "--lora_r", "0"], ["FedSRDConfig.lora_r: must be >= 1, got 0"]),
    ("unknown dtype", [*TRAIN, "--dtype", "float99"], ["dtype must be one of", "'float99'"]),
    ("unknown synthetic domain", [*TRAIN, "--num_clients", "1", "--domains", "nope"], ["unknown domain 'nope'"]),
    ("unknown partition", [*TRAIN, "--partition", "x"], ["--partition: expected domain, iid or dirichlet"]),
    ("clients and domains disagree", [*TRAIN, "--num_clients", "3", "--domains", "arithmetic", "units"],
     ["2 domains", "num_clients=3"]),
    ("merge: missing global adapter",
     ["merge", "--global", "{d}/no_global", "--updates", "{d}/u.bin", "--out", "{d}/o"],
     ["adapter weights not found", "no_global"]),
    ("merge: fed_config.json that does not parse",
     ["merge", "--global", "{d}", "--updates", "{d}/u.bin", "--out", "{d}/o", "--fed_config", "{d}/broken_config.json"],
     ["broken_config.json: not valid JSON", "line 2"]),
    ("merge: an update that is not a fedsrd message",
     ["merge", "--global", "{d}/global", "--updates", "{d}/update.bin", "--out", "{d}/o"],
     ["no update could be read", "update 0:", "--round"]),
    ("merge: unknown field in fed_config.json",
     ["merge", "--global", "{d}", "--updates", "{d}/u.bin", "--out", "{d}/o", "--fed_config", "{d}/extra_config.json"],
     ["extra_config.json: unknown FedSRDConfig field(s) ['rounds']"]),
    ("eval: missing adapter directory", ["eval", "--adapter", "{d}/no_adapter"], ["no_adapter': no such directory"]),
]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_naming_what_is_wrong(files, capsys, argv, expected):
    line = _one_line_error(capsys, [a.format(d=files) for a in argv])
    for part in expected:
        assert part in line, line


def test_fedsrd_debug_keeps_the_traceback(files, monkeypatch):
    monkeypatch.setenv("FEDSRD_DEBUG", "1")
    with pytest.raises(ValueError, match="not valid YAML"):
        main(["train", "--config", str(files / "syntax.yaml")])


def test_example_script_gives_the_one_line_error(files):
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "fed_train.py"), "--config", str(files / "syntax.yaml")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.stderr
