"""The shipped accelerate configs, read by accelerate's own code exactly as `accelerate launch` reads them.

accelerate's loader rejects unknown top-level keys but not unknown keys inside `fsdp_config` or
`deepspeed_config`, so those are checked against `accelerate launch`'s own options. The launcher's
interpretation (which launcher, how many processes, which precision) comes from its validation step, without
starting any process. The Slurm script runs against stand-in `srun`/`scontrol`/`accelerate` commands.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted([REPO / "accelerate_config.yaml", *(REPO / "experiments" / "accelerate").glob("*.yaml")])

# What each file must mean: (distributed_type, num_processes, num_machines, mixed_precision).
EXPECTED = {
    "accelerate_config.yaml": (DistributedType.NO, 1, 1, "no"),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, 1, "bf16"),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 16, 2, "bf16"),
    "fsdp.yaml": (DistributedType.FSDP, 8, 1, "bf16"),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, 1, "bf16"),
}


def test_every_shipped_config_is_listed_here():
    assert sorted(path.name for path in SHIPPED) == sorted(EXPECTED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_config_loads_with_accelerates_loader(path: Path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    distributed_type, num_processes, num_machines, mixed_precision = EXPECTED[path.name]
    assert config.distributed_type == distributed_type
    assert (config.num_processes, config.num_machines) == (num_processes, num_machines)
    assert config.mixed_precision == mixed_precision
    assert config.machine_rank == 0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_nested_keys_are_launcher_options(path: Path):
    """A typo inside fsdp_config/deepspeed_config would be silently ignored by the loader; not here."""
    config = load_config_from_file(str(path))
    options = {action.dest for action in launch_command_parser()._actions}
    nested = [*config.fsdp_config, *config.deepspeed_config]
    assert [key for key in nested if key not in options] == []


def launcher_view(path: Path, *flags: str):
    """The arguments `accelerate launch --config_file PATH` would launch with (nothing is started)."""
    argv = ["--config_file", str(path), *flags, "experiments/cola.py", "experiments/recipes/tutorial.yaml"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args


def test_default_config_launches_one_process():
    args = launcher_view(REPO / "accelerate_config.yaml")
    assert not (args.multi_gpu or args.use_fsdp or args.use_deepspeed)
    assert (args.num_processes, args.mixed_precision) == (1, "no")


def test_mixed_precision_is_a_launch_flag_away():
    assert launcher_view(REPO / "accelerate_config.yaml", "--mixed_precision", "fp16").mixed_precision == "fp16"
    multi_gpu = REPO / "experiments" / "accelerate" / "multi_gpu.yaml"
    assert launcher_view(multi_gpu, "--mixed_precision", "no").mixed_precision == "no"


def test_multi_node_config_takes_rank_and_address_from_the_command_line():
    args = launcher_view(
        REPO / "experiments" / "accelerate" / "multi_node.yaml",
        *("--machine_rank", "1", "--main_process_ip", "node-a", "--num_processes", "32", "--num_machines", "4"),
    )
    assert args.multi_gpu
    assert (args.machine_rank, args.main_process_ip, args.num_processes, args.num_machines) == (1, "node-a", 32, 4)


def test_fsdp_config_saves_a_full_checkpoint():
    args = launcher_view(REPO / "experiments" / "accelerate" / "fsdp.yaml")
    assert args.use_fsdp
    assert (args.fsdp_version, args.fsdp_state_dict_type) == (2, "FULL_STATE_DICT")
    assert args.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP"
    assert args.fsdp_sync_module_states  # the launcher requires it with cpu_ram_efficient_loading


def test_deepspeed_leaves_accumulation_and_clipping_to_the_trainer():
    """Unset, accelerate hands DeepSpeed "auto" and the Trainer fills in the recipe's values."""
    args = launcher_view(REPO / "experiments" / "accelerate" / "deepspeed_zero2.yaml")
    assert args.use_deepspeed and args.zero_stage == 2
    assert args.gradient_accumulation_steps is None and args.gradient_clipping is None


def test_unknown_top_level_key_is_rejected(tmp_path: Path):
    """The claim the configs' comments make: accelerate's loader stops on a misspelt key."""
    text = (REPO / "accelerate_config.yaml").read_text(encoding="utf-8") + "num_proceses: 2\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="num_proceses"):
        load_config_from_file(str(bad))


def test_slurm_script_gives_each_node_its_own_rank(tmp_path: Path):
    """Run the script with stand-ins for srun (two nodes), scontrol and accelerate, and read the launches."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "launches.txt"
    stand_ins = {
        "scontrol": 'printf "node-a\\nnode-b\\n"',
        # srun runs its command once per node, with that node's SLURM_NODEID.
        "srun": 'shift; for node in 0 1; do SLURM_NODEID=$node "$@" || exit 1; done',
        "accelerate": f'echo "$*" >> "{log}"',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n", encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    script = REPO / "experiments" / "accelerate" / "slurm_multinode.sh"
    subprocess.run(
        ["bash", str(script), "experiments/recipes/tutorial.yaml", "--output_dir", "out dir"],
        env=env,
        check=True,
        capture_output=True,
    )
    launches = log.read_text(encoding="utf-8").splitlines()
    common = (
        "launch --config_file experiments/accelerate/multi_node.yaml --num_machines 2 --num_processes 8 "
        "--machine_rank {rank} --main_process_ip node-a --main_process_port 24242 "
        "experiments/cola.py experiments/recipes/tutorial.yaml --output_dir out dir"
    )
    assert launches == [common.format(rank=0), common.format(rank=1)]
