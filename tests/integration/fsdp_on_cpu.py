"""train.py under accelerate's FSDP2 on CPU processes (gloo), for the tests.

accelerate 1.15 turns FSDP on only for GPU-typed runs (AcceleratorState takes its FSDP branch from MULTI_GPU,
never from MULTI_CPU), while the engine underneath, torch's `fully_shard`, shards on a CPU mesh as well. This
entry point starts the process group as accelerate normally would on CPUs, then marks it GPU-typed before
train.py builds its Accelerator, so accelerate takes its FSDP2 path with the CPU as the device. Everything after
that is the real thing: accelerate's FSDP2 prepare, torch's sharding and collectives, sharded checkpoints on disk.

    python -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \
        tests/integration/fsdp_on_cpu.py +experiment=demo ...
"""

import runpy
import sys
from pathlib import Path

from accelerate.state import PartialState
from accelerate.utils import DistributedType

state = PartialState(cpu=True)
assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU

train_py = Path(__file__).resolve().parents[2] / "train.py"
sys.argv = [str(train_py), *sys.argv[1:]]
runpy.run_path(str(train_py), run_name="__main__")
