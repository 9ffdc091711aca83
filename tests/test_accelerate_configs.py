"""The accelerate configs in configs/accelerate/ (README, "More than one GPU") are read the
way `accelerate launch --config_file` reads them: no unknown keys, consistent counts, and
the names they refer to exist."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from conftest import ROOT

CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_there_are_configs_for_each_kind():
    kinds = {load_config_from_file(str(p)).distributed_type.value for p in CONFIGS}
    assert kinds == {"MULTI_GPU", "DEEPSPEED", "FSDP"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_what_accelerate_launch_reads(path):
    config = load_config_from_file(str(path))  # a ClusterConfig: an unknown key is a TypeError
    assert config.num_processes % config.num_machines == 0 and 0 <= config.machine_rank < config.num_machines
    assert config.mixed_precision == "no"  # the scripts pick fp16 / bf16 from the GPU themselves
    args = launch_command_parser().parse_args(["--config_file", str(path), str(ROOT / "sft_qlora.py")])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == config.num_processes and args.num_machines == config.num_machines
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port


def launcher_options() -> set[str]:
    return {action.dest for action in launch_command_parser()._actions}


def test_fsdp_config_names_phi_layers_and_real_options():
    from transformers.models.phi import modeling_phi

    (path,) = [p for p in CONFIGS if load_config_from_file(str(p)).distributed_type.value == "FSDP"]
    fsdp = load_config_from_file(str(path)).fsdp_config
    assert hasattr(modeling_phi, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    assert set(fsdp) <= launcher_options(), set(fsdp) - launcher_options()  # the launcher passes each on


def test_deepspeed_config_uses_the_recipes_clipping():
    import yaml

    (path,) = [p for p in CONFIGS if load_config_from_file(str(p)).distributed_type.value == "DEEPSPEED"]
    deepspeed = load_config_from_file(str(path)).deepspeed_config
    recipe = yaml.safe_load((ROOT / "recipes" / "sft_phi2_t4.yaml").read_text())
    assert deepspeed["zero_stage"] == 2 and deepspeed["gradient_clipping"] == recipe["max_grad_norm"]
    assert set(deepspeed) <= launcher_options(), set(deepspeed) - launcher_options()
