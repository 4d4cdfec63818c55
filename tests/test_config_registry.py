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


# ---- algorithms own their options (AlgorithmOptions classes, composed into FedSRDConfig) ----------------------------
def _options_classes():
    from fedsrd.algorithms import get_algorithm_class

    classes = {get_algorithm_class(name).options for name in fedsrd.list_algorithms()}
    return sorted((c for c in classes if c is not None), key=lambda c: c.__name__)


def test_every_algorithms_options_are_flat_fields_of_the_config_with_help():
    from dataclasses import fields

    from fedsrd.algorithms import get_algorithm_class

    config_fields = {f.name: f for f in fields(FedSRDConfig)}
    assert {c.__name__ for c in _options_classes()} >= {"FedSRDOptions", "FedSRDEFOptions", "TopKOptions"}
    for name in fedsrd.list_algorithms():
        options = get_algorithm_class(name).options
        for f in fields(options) if options else ():
            assert f.metadata.get("help"), f"{options.__name__}.{f.name} has no help text"
            assert f.name in config_fields and config_fields[f.name].default == f.default, (name, f.name)
            assert issubclass(FedSRDConfig, options), name
    assert get_algorithm_class("fedavg").options is None
    assert get_algorithm_class("fedsrd_e").options.__name__ == "FedSRDOptions"  # inherited with the method


@pytest.mark.parametrize(
    "cls_name, kwargs, option",
    [
        ("FedSRDOptions", {"upload_sparsity_alpha": 1.0}, "upload_sparsity_alpha"),
        ("FedSRDOptions", {"download_drop": -0.1}, "download_drop"),
        ("FedSRDEFOptions", {"ef_download_selection": "largest"}, "ef_download_selection"),
        ("FedSRDEFOptions", {"upload_sparsity_cap": -1.0}, "upload_sparsity_cap"),  # a parent's field, checked too
        ("FedProxOptions", {"fedprox_mu": -1.0}, "fedprox_mu"),
        ("FedDAREOptions", {"fed_dare_drop": 1.0}, "fed_dare_drop"),
        ("TopKOptions", {"topk_density": 0.0}, "topk_density"),
        ("FedKRSOOptions", {"krso_tau": 0}, "krso_tau"),
        ("FedKSeedOptions", {"kseed_eps": 0.0}, "kseed_eps"),
    ],
)
def test_an_options_class_validates_its_fields_naming_the_option(cls_name, kwargs, option):
    cls = {c.__name__: c for c in _options_classes()}[cls_name]
    cls()  # the defaults are valid
    with pytest.raises(ValueError, match=rf"^{cls_name}\.{option}: "):
        cls(**kwargs)
    with pytest.raises(ValueError, match=rf"^FedSRDConfig\.{option}: "):  # the same check, through the config
        FedSRDConfig(**kwargs)


def test_flat_keys_still_work_in_yaml_command_line_and_constructor(tmp_path):
    from fedsrd.build import parse_train_args

    config = tmp_path / "run.yaml"
    config.write_text(
        "algorithm: fedsrd_ef\nupload_sparsity_alpha: 0.7\ndownload_drop: 0.6\nef_download_selection: magnitude\n"
        "topk_density: 0.2\nkrso_rank: 3\nkseed_eps: 0.001\nfedprox_mu: 0.5\noutput_dir: " + str(tmp_path) + "\n"
    )
    fed, _, _ = parse_train_args(["--config", str(config), "--upload_sparsity_alpha", "0.75", "--no_ef_upload"])
    assert (fed.algorithm, fed.upload_sparsity_alpha, fed.download_drop) == ("fedsrd_ef", 0.75, 0.6)
    assert (fed.ef_download_selection, fed.ef_upload, fed.topk_density, fed.krso_rank) == ("magnitude", False, 0.2, 3)
    assert (fed.kseed_eps, fed.fedprox_mu) == (0.001, 0.5)
    assert FedSRDConfig(upload_sparsity_alpha=0.5).upload_sparsity_alpha == 0.5
    assert FedSRDConfig(**FedSRDConfig(topk_density=0.3).to_dict()).topk_density == 0.3  # fed_config.json round trip
    with pytest.raises(ValueError, match="FedSRDConfig.download_drop"):
        parse_train_args(["--download_drop", "1.5", "--output_dir", str(tmp_path)])


def test_every_shipped_yaml_config_still_loads():
    from pathlib import Path

    from fedsrd.build import parse_train_args

    for path in sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml")):
        fed, _, _ = parse_train_args(["--config", str(path)])
        assert fed.algorithm in fedsrd.list_algorithms(), path.name


def test_docs_list_every_options_class_and_option():
    from dataclasses import fields
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "algorithms.md").read_text()
    section = text[text.index("## Each algorithm's options") :]
    for cls in _options_classes():
        assert cls.__name__ in section, cls.__name__
        for f in fields(cls):
            assert f"`{f.name}`" in section, f.name
