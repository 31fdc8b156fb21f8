"""The one builder of a decode step's inputs (engine/decode_batch.py): what every decode path
(eager, fused CPU, compiled, CUDA graphs) takes."""

import pytest
import torch

from qwenkit.engine.decode_batch import CONTEXT_LENS, IDS, POSITIONS, SLOTS, bucket_for, prepare_decode


def test_rows_slots_and_tables():
    # block size 4: position 5 of table [7, 2] is block 2, offset 1 -> slot 9
    batch = prepare_decode([11, 12], [5, 0], [[7, 2], [3]], block_size=4)
    assert batch.num_seqs == 2 and batch.inputs.dtype == batch.block_tables.dtype == torch.int32
    assert batch.inputs.tolist() == [[11, 12], [5, 0], [9, 12], [6, 1]]
    assert batch.block_tables.tolist() == [[7, 2], [3, 0]]
    meta = batch.metadata()
    assert meta.slot_mapping.dtype == torch.int64 and meta.slot_mapping.tolist() == [9, 12]
    assert meta.decode.context_lens.tolist() == [6, 1] and meta.decode.block_size == 4


def test_padding_rows_write_to_the_spare_slot_and_see_nothing():
    batch = prepare_decode([11], [5], [[7, 2]], block_size=4, rows=4, width=3, padding_slot=99)
    assert batch.inputs[:, 1:].tolist() == [[0] * 3, [0] * 3, [99] * 3, [0] * 3]
    assert batch.block_tables.tolist() == [[7, 2, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="padding_slot"):
        prepare_decode([11], [5], [[7, 2]], block_size=4, rows=2)
    with pytest.raises(ValueError, match="does not fit"):
        prepare_decode([11, 12], [5, 0], [[7, 2], [3]], block_size=4, rows=1)


def test_reused_buffers_keep_nothing_of_a_bigger_step():
    out = torch.full((4, 8), -1, dtype=torch.int32), torch.full((8, 5), -1, dtype=torch.int32)
    prepare_decode([1] * 6, [9] * 6, [[1, 2, 3]] * 6, block_size=4, rows=8, padding_slot=50, out=out)
    batch = prepare_decode([5], [2], [[4]], block_size=4, rows=2, padding_slot=50, out=out)
    assert batch.inputs.data_ptr() == out[0].data_ptr()
    assert batch.inputs[[IDS, POSITIONS, SLOTS, CONTEXT_LENS]].tolist() == [[5, 0], [2, 0], [18, 50], [3, 0]]
    assert batch.block_tables.tolist() == [[4], [0]]


def test_bucket_for():
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
