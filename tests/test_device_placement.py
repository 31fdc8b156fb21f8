"""Every tensor a step touches is on the model's device, proven without a GPU.

The `meta` device stands in for CUDA: a meta tensor mixed with a CPU tensor in one op
raises, so a KV cache, metadata tensor or buffer created without a device (which lands
on the CPU) fails here exactly as it fails on the first CUDA step.
"""

import pytest
import torch
from tiny import ARCHS, reference_config

from qwenkit.config import ModelConfig
from qwenkit.engine.model_runner import ModelRunner
from qwenkit.engine.scheduler import ScheduledSequence
from qwenkit.engine.sequence import Sequence
from qwenkit.models import MODEL_REGISTRY

META = torch.device("meta")


def meta_model(arch: str):
    config = ModelConfig.from_hf(reference_config(arch, 300).to_dict())
    with META:
        return MODEL_REGISTRY[config.model_type](config, dtype=torch.bfloat16)


def sequence(num_tokens: int, *, computed: int, block_size: int, first_block: int) -> Sequence:
    seq = Sequence("r", 0, list(range(5, 5 + num_tokens)), num_tokens, 8)
    seq.block_table = list(range(first_block, first_block + -(-num_tokens // block_size) + 1))
    seq.num_computed_tokens = computed
    return seq


@pytest.mark.parametrize("arch", ARCHS)
def test_steps_run_on_the_models_device(arch):
    # bfloat16: where MoE experts run as grouped GEMMs off the CPU. A meta tensor cannot be
    # read back, so this also proves the step never syncs with the host (CUDA graphs need that).
    model = meta_model(arch)
    runner = ModelRunner(model, num_blocks=16, block_size=4, device=META, progress=False)
    assert all(k.device == META and v.device == META for k, v in runner.kv_caches)
    fresh = sequence(7, computed=0, block_size=4, first_block=0)
    cached = sequence(9, computed=4, block_size=4, first_block=4)  # a prefix-cache hit: reads the cache
    rows, logits = runner.run([ScheduledSequence(fresh, 7), ScheduledSequence(cached, 5)])
    assert rows == [0, 1] and logits.device == META
    fresh.num_computed_tokens, cached.num_computed_tokens = 7, 9
    fresh.token_ids.append(3)
    cached.token_ids.append(3)
    rows, logits = runner.run([ScheduledSequence(fresh, 1), ScheduledSequence(cached, 1)])
    assert rows == [0, 1] and logits.shape[0] == 2 and logits.device == META
