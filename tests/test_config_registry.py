import pytest
from transformers import HfArgumentParser

import fedsrd
from fedsrd import FedSRDConfig


def test_list_algorithms_has_fedavg():
    assert "fedavg" in fedsrd.list_algorithms()


def test_every_field_has_help():
    from dataclasses import fields

    for f in fields(FedSRDConfig):
        assert f.metadata.get("help"), f"FedSRDConfig.{f.name} has no help text"


def test_hf_argument_parser_round_trip():
    parser = HfArgumentParser(FedSRDConfig)
    (cfg,) = parser.parse_args_into_dataclasses(
        args=["--num_clients", "3", "--lora_target_modules", "q_proj", "v_proj", "--clients_per_round", "2"]
    )
    assert cfg.num_clients == 3 and cfg.clients_per_round == 2
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    lora = cfg.to_lora_config()
    assert lora.r == cfg.lora_r and set(lora.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 2, "clients_per_round": 3}, "clients_per_round"),
        ({"algorithm": "nope"}, "algorithm"),
        ({"aggregation": "median"}, "aggregation"),
        ({"local_steps": 0}, "local_steps"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"value_dtype": "int8"}, "value_dtype"),
        ({"download_drop": 1.0}, "download_drop"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"FedSRDConfig.{field}"):
        FedSRDConfig(**kwargs)


def test_all_linear_maps_to_peft_string():
    assert FedSRDConfig().to_lora_config().target_modules == "all-linear"
