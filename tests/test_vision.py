"""Qwen2.5-VL: preprocessing, the vision tower, M-RoPE prefill and greedy decoding equal to
transformers on the same tiny random checkpoint (float32), through the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny_vl import hf_image_processor, hf_inputs, make_vl_checkpoint, test_image

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vl")
    reference = make_vl_checkpoint(folder)
    return folder, reference


@pytest.fixture(scope="module")
def vl_llm(vl_checkpoint):
    from qwenkit import LLM

    return LLM(str(vl_checkpoint[0]), dtype="float32", device="cpu", kv_cache_memory="16MiB", progress=False)


SIZES = [(28, 28), (56, 56), (100, 40), (40, 100), (13, 7), (224, 224), (300, 120), (640, 480), (57, 250),
         (99, 99), (1, 50), (200, 3), (29, 29), (111, 57), (500, 500), (84, 168), (17, 313), (450, 61),
         (1000, 30), (77, 1)]


def test_pixel_values_equal_transformers_processor():
    from qwenkit.multimodal import ImageProcessor
    from tests.tiny_vl import MAX_PIXELS, MIN_PIXELS

    ours, theirs = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), hf_image_processor()
    for i, (w, h) in enumerate(SIZES):
        image = test_image(w, h, seed=i)
        pixels, grid = ours.preprocess(image)
        ref = theirs(images=[image], return_tensors="np")
        assert grid == tuple(ref["image_grid_thw"][0].tolist()), (w, h)
        np.testing.assert_array_equal(pixels, ref["pixel_values"], err_msg=f"{w}x{h}")


def _prompt(llm, images, text="Describe."):
    """Token ids of a user turn with `images` then `text`, placeholders expanded, and their MultimodalPrompt."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    prepared = llm.prepare_chat([{"role": "user", "content": content}])
    return prepared.prompt_token_ids, prepared.multimodal


def test_vision_tower_equals_transformers(vl_checkpoint, vl_llm):
    _, reference = vl_checkpoint
    images = [test_image(100, 60, seed=1), test_image(200, 210, seed=2)]
    hf = hf_image_processor()(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = reference.model.visual(hf["pixel_values"], grid_thw=hf["image_grid_thw"]).pooler_output
    grids = [tuple(g) for g in hf["image_grid_thw"].tolist()]
    got = torch.cat(vl_llm.model.embed_images(hf["pixel_values"], grids))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_prefill_logits_equal_transformers(vl_checkpoint, vl_llm):
    from qwenkit.models.attention import AttentionMetadata

    _, reference = vl_checkpoint
    images = [test_image(90, 50, seed=3), test_image(60, 120, seed=4)]
    ids, mm = _prompt(vl_llm, images)
    with torch.no_grad():
        expected = reference(**hf_inputs(reference, ids, images)).logits[0]
        model = vl_llm.model
        h = model.model.embed_tokens(torch.tensor(ids))
        embeds = model.embed_images(torch.cat([i.pixel_values for i in mm.images]), [i.grid_thw for i in mm.images])
        for o, e in zip(mm.offsets, embeds):
            h[o:o + len(e)] = e
        kv = model.allocate_kv_cache(len(ids))
        hidden = model.model.forward_layers(h, mm.positions, kv, AttentionMetadata.contiguous(start=0, num_tokens=len(ids)))
        got = model.compute_logits(hidden)
    assert (got - expected).abs().max().item() <= 1e-4
