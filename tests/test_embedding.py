"""Qwen3-Embedding and Qwen3-Reranker on the engine: parity with transformers computed as
the model cards do, batched == alone, Matryoshka dimensions, instructions, errors."""

import pytest
import torch
import torch.nn.functional as F
from tiny_retrieval import make_retrieval_checkpoint

from qwenkit import LLM
from qwenkit.capabilities import model_capabilities
from qwenkit.embedding import RERANK_PREFIX, RERANK_SUFFIX, embed, format_query, rerank_pair, score, whole_prompt_groups
from qwenkit.errors import ContextLengthError, QwenkitError

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Qwen3 thinks before it answers.",
    "1234567890",
] + ["The quick brown fox " * 12]  # a prompt over a block and a prefill chunk of 64 tokens


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedding")
    ref = make_retrieval_checkpoint(folder, "embedding")
    return LLM(str(folder), dtype="float32", kv_cache_dtype="float32", progress=False,
               max_num_batched_tokens=64), ref, folder


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    # Named as Qwen publishes it (Qwen/Qwen3-Reranker-0.6B): its name is what marks a reranker.
    folder = tmp_path_factory.mktemp("checkpoints") / "Qwen3-Reranker-tiny"
    ref = make_retrieval_checkpoint(folder, "reranker")
    return LLM(str(folder), dtype="float32", kv_cache_dtype="float32", progress=False), ref, folder


def hf_tokenizer(folder):
    import transformers

    # The tokenizer.json as written (transformers 5's Qwen2Tokenizer swaps in Qwen's own
    # pre-tokenizer, which the tiny vocabulary was not trained with).
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                pad_token="<|endoftext|>", padding_side="left")


def card_embeddings(model, tok, texts):
    """Qwen3-Embedding's model card: the texts and <|endoftext|>, left-padded as one batch,
    the last position's hidden state, L2-normalised."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|endoftext|>")] for t in texts]
    batch = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    return F.normalize(hidden[:, -1], p=2, dim=1)


def card_scores(model, tok, query, documents, instruction):
    """Qwen3-Reranker's model card: prefix + pair + suffix, left-padded, P(yes) of [no, yes]."""
    prefix = tok.encode(RERANK_PREFIX, add_special_tokens=False)
    suffix = tok.encode(RERANK_SUFFIX, add_special_tokens=False)
    pairs = [rerank_pair(query, d, instruction) for d in documents]
    ids = [prefix + tok(p, add_special_tokens=False)["input_ids"] + suffix for p in pairs]
    batch = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits[:, -1, :]
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    pair = torch.log_softmax(torch.stack([logits[:, no], logits[:, yes]], dim=1), dim=1)
    return pair[:, 1].exp()


def test_embeddings_match_the_model_card(embedder):
    llm, ref, folder = embedder
    got = embed(llm, TEXTS)
    expected = card_embeddings(ref, hf_tokenizer(folder), TEXTS)
    assert got.data.shape == (len(TEXTS), 64)
    assert (got.data - expected).abs().max() <= 1e-5
    assert torch.allclose(got.data.norm(dim=1), torch.ones(len(TEXTS)))
    tok = hf_tokenizer(folder)
    assert got.num_tokens == sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS)


def test_batched_equals_alone_and_prefix_cache_hits_equal_misses(embedder):
    llm = embedder[0]
    batched = embed(llm, TEXTS).data
    alone = torch.cat([embed(llm, [t]).data for t in TEXTS])  # second time: prefix-cache hits
    assert (batched - alone).abs().max() <= 1e-5
    again = embed(llm, TEXTS[::-1]).data.flip(0)
    assert (batched - again).abs().max() <= 1e-5


def test_query_instruction_and_token_ids(embedder):
    llm, ref, folder = embedder
    task = "Given a question, retrieve passages that answer it"
    got = embed(llm, ["what is the fox?"], instruction=task).data
    expected = card_embeddings(ref, hf_tokenizer(folder), [format_query("what is the fox?", task)])
    assert format_query("q", task) == f"Instruct: {task}\nQuery:q"
    assert (got - expected).abs().max() <= 1e-5
    ids = llm.tokenizer.encode(TEXTS[0])
    by_ids = embed(llm, [ids]).data  # <|endoftext|> appended, as for text
    assert (by_ids - embed(llm, [TEXTS[0]]).data).abs().max() == 0
    assert llm.embed(TEXTS[0]) == embed(llm, [TEXTS[0]]).tolist()


def test_dimensions_truncate_then_renormalise(embedder):
    llm = embedder[0]
    full = embed(llm, TEXTS[:2], normalize=False).data
    short = embed(llm, TEXTS[:2], dimensions=16).data
    assert short.shape == (2, 16)
    assert (short - F.normalize(full[:, :16], dim=1)).abs().max() <= 1e-6
    for bad in (0, 65):
        with pytest.raises(ValueError, match="dimensions must be between 1 and 64"):
            embed(llm, TEXTS[:1], dimensions=bad)


def test_embedding_errors(embedder):
    llm = embedder[0]
    with pytest.raises(ValueError, match=r"input\[1\] is empty"):
        embed(llm, ["a", ""])
    with pytest.raises(ValueError, match=r"input\[0\]: token ids must be in"):
        embed(llm, [[10**6]])
    with pytest.raises(ContextLengthError, match=r"input\[0\] is \d+ tokens"):
        embed(llm, [[1] * 5000])
    with pytest.raises(QwenkitError, match="embedding model"):
        score(llm, "q", ["d"])


def test_capabilities_tell_embedding_and_rerank_apart(embedder, reranker, llm):
    assert model_capabilities(embedder[0]).names() == ["embedding"]
    assert "rerank" in model_capabilities(reranker[0]).names()
    assert model_capabilities(llm).names()[0] == "completion"  # the tiny chat model: no "yes" token
    assert "embedding" not in model_capabilities(llm).names()


def test_embedding_checkpoint_with_an_lm_head(tmp_path):
    """Qwen3-Embedding-0.6B's layout: a causal LM's names (tied head) with the pooling config."""
    import json
    import shutil

    import transformers

    make_retrieval_checkpoint(tmp_path / "base", "embedding")
    base = transformers.Qwen3Model.from_pretrained(tmp_path / "base").eval()
    cfg = base.config
    cfg.tie_word_embeddings = True
    causal = transformers.Qwen3ForCausalLM(cfg).eval()
    causal.model.load_state_dict(base.state_dict())
    causal.tie_weights()
    causal.save_pretrained(tmp_path / "lm")
    for f in ("tokenizer.json", "tokenizer_config.json", "modules.json", "1_Pooling"):
        src = tmp_path / "base" / f
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / "lm" / f)
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["tie_word_embeddings"]
    llm = LLM(str(tmp_path / "lm"), dtype="float32", kv_cache_dtype="float32", progress=False)
    assert model_capabilities(llm).names() == ["embedding"]
    expected = card_embeddings(base, hf_tokenizer(tmp_path / "base"), TEXTS[:3])
    assert (embed(llm, TEXTS[:3]).data - expected).abs().max() <= 1e-5


def test_scores_match_the_model_card(reranker):
    llm, ref, folder = reranker
    docs = ["Hello world!", "def add(a, b): return a + b", "The quick brown fox jumps over the lazy dog." * 3]
    got = score(llm, "the fox", docs)
    expected = card_scores(ref, hf_tokenizer(folder), "the fox", docs,
                           "Given a web search query, retrieve relevant passages that answer the query")
    assert max(abs(a - b) for a, b in zip(got.data, expected.tolist())) <= 1e-5
    alone = [score(llm, "the fox", [d]).data[0] for d in docs]
    assert max(abs(a - b) for a, b in zip(got.data, alone)) <= 1e-5
    assert llm.score("the fox", docs) == got.data
    custom = score(llm, "the fox", docs[:1], instruction="Find code").data[0]
    assert abs(custom - card_scores(ref, hf_tokenizer(folder), "the fox", docs[:1], "Find code")[0].item()) <= 1e-5


def test_pooling_leaves_a_running_generation_alone(reranker):
    """Prompts pooled between two steps of a generation do not change its tokens."""
    from qwenkit import SamplingParams

    llm = reranker[0]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate("Hello world", params)[0].token_ids
    prompt = llm.tokenizer.encode("Hello world")
    tokens = []
    for i, update in enumerate(llm.stream(prompt, params)):
        tokens += [t.token_id for t in update.outputs]
        if i == 2:
            score(llm, "q", ["a document", "another"])
    assert tokens == expected


def test_embeddings_from_a_gguf(tmp_path):
    """A GGUF as llama.cpp writes Qwen3-Embedding-0.6B (tied: no output.weight)."""
    from test_gguf import tiny_model, write_gguf

    ref = tiny_model("qwen3", tie_word_embeddings=True)
    path = write_gguf(tmp_path / "embed.gguf", ref, "qwen3")
    llm = LLM(str(path), dtype="float32", kv_cache_dtype="float32", progress=False)
    prompts = [[5, 9, 30, 7], [100, 3, 4, 200, 17, 8, 9]]
    got = embed(llm, prompts).data
    with torch.inference_mode():
        expected = torch.cat([F.normalize(ref.model(input_ids=torch.tensor([p + [0]])).last_hidden_state[:, -1], dim=1)
                              for p in prompts])
    assert (got - expected).abs().max() <= 1e-5


def test_a_gguf_is_an_embedding_model_by_its_pooling_type(tmp_path):
    """llama.cpp writes Qwen3-Embedding's GGUF with `qwen3.pooling_type` LAST; its tied weights
    alone look like a chat model's. A pooling qwenkit does not compute is refused by name."""
    import gguf
    from test_gguf import tiny_model, write_gguf

    ref = tiny_model("qwen3", tie_word_embeddings=True)
    found = {}
    for pooling in (None, gguf.PoolingType.LAST, gguf.PoolingType.MEAN):
        path = write_gguf(tmp_path / f"model-{pooling}.gguf", ref, "qwen3",
                          extra=None if pooling is None else lambda w, p=pooling: w.add_pooling_type(p))
        llm = LLM(str(path), dtype="float32", kv_cache_dtype="float32", progress=False)
        found[pooling] = (llm.pooling, model_capabilities(llm).names())
        if pooling == gguf.PoolingType.MEAN:
            with pytest.raises(QwenkitError, match="declares mean pooling"):
                embed(llm, [[5, 9, 30]])
    assert found[None] == (None, ["completion"])
    assert found[gguf.PoolingType.LAST] == ("last", ["embedding"])
    assert found[gguf.PoolingType.MEAN][0] == "mean"


def test_a_prefix_cache_hit_that_leaves_one_token_takes_the_decode_path(embedder):
    """33 tokens embedded again: 32 come from the cache, the last one is a one-token step (the
    runner's decode path, fused on the CPU), whose hidden state must be the same."""
    llm, ref, folder = embedder
    ids = (llm.tokenizer.encode(TEXTS[4]) * 3)[:32]  # + <|endoftext|> = 33
    first = embed(llm, [ids]).data
    runs = []
    original = llm.engine.runner._run_decode
    llm.engine.runner._run_decode = lambda step, pooling=False: runs.append(pooling) or original(step, pooling)
    try:
        again = embed(llm, [ids]).data
    finally:
        llm.engine.runner._run_decode = original
    assert runs == [True]
    assert (again - first).abs().max() <= 1e-5
    end = llm.tokenizer.token_to_id("<|endoftext|>")
    with torch.inference_mode():
        expected = F.normalize(ref(input_ids=torch.tensor([ids + [end]])).last_hidden_state[:, -1], dim=1)
    assert (again - expected).abs().max() <= 1e-5


def test_whole_prompts_attend_by_sdpa_as_the_paged_kernel_does(embedder):
    """A pooling step of prompts from position 0 attends by SDPA over their own keys (the CPU's
    faster path for embeddings); the paged kernel's embeddings are the same, and prompts are
    grouped whole within the budget, never split across steps."""
    llm = embedder[0]
    runner = llm.engine.runner
    assert runner.pool_with_sdpa and runner.paged_prefill  # two paths here, one without the toggle
    by_sdpa = embed(llm, TEXTS).data
    runner.pool_with_sdpa = False
    try:
        by_kernel = embed(llm, TEXTS).data
    finally:
        runner.pool_with_sdpa = True
    assert (by_sdpa - by_kernel).abs().max() <= 1e-5
    assert whole_prompt_groups([[1] * 30, [2] * 30, [3] * 10, [4] * 70, [5] * 5], 64, max_num_seqs=32) == [
        [[1] * 30, [2] * 30], [[3] * 10], [[4] * 70], [[5] * 5]]
    assert whole_prompt_groups([[1]] * 3, 64, max_num_seqs=2) == [[[1], [1]], [[1]]]
