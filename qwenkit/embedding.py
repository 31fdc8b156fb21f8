"""Embeddings (Qwen3-Embedding) and relevance scores (Qwen3-Reranker) on the engine.

Both are Qwen3 models run as their model cards run them, with a different head:

* Qwen3-Embedding: a text and a closing ``<|endoftext|>`` (which its tokenizer appends);
  the embedding is that last token's final hidden state (last-token pooling),
  L2-normalised. A query carries an instruction, ``Instruct: {task}\\nQuery:{query}``;
  documents carry none. ``dimensions`` (Matryoshka) keeps the first d values, renormalised.
* Qwen3-Reranker: a query and a document in its chat prompt; the score is P("yes") of
  the softmax over the last token's logits of "no" and "yes".

The prompts take the engine's own path up to the last token (its block pool and prefix
cache, its runner: batched, chunked, paged) on a scheduler of their own, so nothing is
sampled and nothing decoded, and a generation in flight on the same engine is not touched
(on `AsyncLLM`, they run on the engine thread between two of its steps).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.engine.scheduler import Scheduler
from qwenkit.engine.sequence import Sequence
from qwenkit.errors import ContextLengthError, QwenkitError

END_OF_TEXT = "<|endoftext|>"
DEFAULT_QUERY_TASK = "Given a web search query, retrieve relevant passages that answer the query"
RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def format_query(query: str, task: str = DEFAULT_QUERY_TASK) -> str:
    """A query as Qwen3-Embedding's model card writes it (documents are embedded as they are)."""
    return f"Instruct: {task}\nQuery:{query}"


def rerank_pair(query: str, document: str, instruction: str = DEFAULT_QUERY_TASK) -> str:
    """The user turn of Qwen3-Reranker's prompt (between RERANK_PREFIX and RERANK_SUFFIX)."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


@dataclass(frozen=True)
class Embeddings:
    """data: float32 [N, dimensions], one row per input; num_tokens: the tokens computed for them."""

    data: torch.Tensor
    num_tokens: int

    def tolist(self) -> list[list[float]]:
        return self.data.tolist()


@dataclass(frozen=True)
class Scores:
    """data: P("yes") per document, in the order given; num_tokens: the prompt tokens computed."""

    data: list[float]
    num_tokens: int


def embedding_prompts(tokenizer, inputs: Seq[str | Seq[int]], *, instruction: str | None = None) -> list[list[int]]:
    """Token ids per input: a string is encoded (as a query under `instruction`, if given),
    token ids are taken as they are; each ends with ``<|endoftext|>`` (appended if missing)."""
    end = tokenizer.token_to_id(END_OF_TEXT)
    prompts = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            ids = tokenizer.encode(format_query(item, instruction) if instruction is not None else item)
        else:
            ids = list(item)
        if not ids:
            raise ValueError(f"input[{i}] is empty")
        if end is not None and ids[-1] != end:
            ids.append(end)
        prompts.append(ids)
    return prompts


def embed(llm, inputs: str | Seq[str | Seq[int]], *, instruction: str | None = None,
          dimensions: int | None = None, normalize: bool = True) -> Embeddings:
    """Embed texts (or token-id lists) with `llm` (a loaded `LLM`); see the module docstring."""
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    hidden_size = llm.config.hidden_size
    if getattr(llm, "pooling", None) in ("mean", "cls"):
        raise QwenkitError(f"{llm.model_name} declares {llm.pooling} pooling (its GGUF pooling_type); qwenkit "
                           "embeds with Qwen3-Embedding's last-token pooling only")
    if dimensions is not None and not 1 <= dimensions <= hidden_size:
        raise ValueError(f"dimensions must be between 1 and {hidden_size} (the model's width), got {dimensions}")
    prompts = embedding_prompts(llm.tokenizer, inputs, instruction=instruction)
    data = torch.stack(run_prompts(llm.engine, prompts, pooling=True)) if prompts else torch.empty(0, hidden_size)
    if dimensions is not None:
        data = data[:, :dimensions]
    if normalize:
        data = torch.nn.functional.normalize(data, p=2, dim=-1)
    return Embeddings(data, sum(map(len, prompts)))


def rerank_prompts(tokenizer, query: str, documents: Seq[str], *, instruction: str | None = None) -> list[list[int]]:
    """Qwen3-Reranker's prompt per document, tokenized in three parts as its model card does."""
    prefix, suffix = tokenizer.encode(RERANK_PREFIX), tokenizer.encode(RERANK_SUFFIX)
    task = DEFAULT_QUERY_TASK if instruction is None else instruction
    return [prefix + tokenizer.encode(rerank_pair(query, d, task)) + suffix for d in documents]


def yes_no_ids(tokenizer) -> tuple[int, int]:
    """The ids of the single tokens "yes" and "no" the reranker answers with."""
    yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
    if yes is None or no is None:
        raise QwenkitError("this model cannot rerank: its vocabulary has no single tokens \"yes\" and \"no\"")
    return yes, no


def score(llm, query: str, documents: str | Seq[str], *, instruction: str | None = None) -> Scores:
    """Relevance of each document to `query`: Qwen3-Reranker's P("yes"), in [0, 1]."""
    if isinstance(documents, str):
        documents = [documents]
    if getattr(llm.model, "is_headless", False):
        raise QwenkitError(f"{llm.model_name} is an embedding model: it has no lm_head to score with")
    yes, no = yes_no_ids(llm.tokenizer)
    prompts = rerank_prompts(llm.tokenizer, query, documents, instruction=instruction)
    if not prompts:
        return Scores([], 0)
    logits = torch.stack(run_prompts(llm.engine, prompts, pooling=False))
    pair = torch.log_softmax(logits[:, [no, yes]].float(), dim=-1)
    return Scores(pair[:, 1].exp().tolist(), sum(map(len, prompts)))


def run_prompts(engine: LLMEngine, prompts: list[list[int]], *, pooling: bool) -> list[torch.Tensor]:
    """Each prompt's last token through the engine's runner: its final hidden state
    [hidden] (pooling) or its float32 logits [vocab]. On a scheduler of these prompts only,
    over the engine's block pool; call it where the engine steps (its thread)."""
    vocab = engine.model.config.vocab_size
    for i, ids in enumerate(prompts):
        if len(ids) > min(engine.max_model_len, engine.num_kv_tokens):
            raise ContextLengthError(f"input[{i}] is {len(ids)} tokens, but the model's context is "
                                     f"{min(engine.max_model_len, engine.num_kv_tokens)} tokens")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"input[{i}]: token ids must be in [0, {vocab})")
    main = engine.scheduler
    # The engine's budget, not more: steps of 2048 and 4112 tokens (8 and 16 texts of 257) were
    # 1.27x and 1.33x slower than steps of one such text, on 2 cores (docs/retrieval.md#speed).
    budget = main.max_num_batched_tokens
    outputs: list[torch.Tensor] = []
    for group in whole_prompt_groups(prompts, budget, max_num_seqs=main.max_num_seqs):
        # A group is one step: each prompt whole, not chunked across steps, so that it attends
        # over its own keys alone (ModelRunner.pool_with_sdpa); a prompt over the budget is a
        # group of its own, computed in chunks.
        scheduler = Scheduler(engine.block_manager, max_num_seqs=main.max_num_seqs, max_num_batched_tokens=budget)
        outputs += _run_group(engine, scheduler, group, pooling=pooling)
    return outputs


def whole_prompt_groups(prompts: list[list[int]], budget: int, *, max_num_seqs: int) -> list[list[list[int]]]:
    """Consecutive prompts in groups of at most `budget` tokens and `max_num_seqs` prompts, no
    prompt split (one over the budget is a group of its own)."""
    groups: list[list[list[int]]] = []
    tokens = 0
    for ids in prompts:
        if groups and tokens + len(ids) <= budget and len(groups[-1]) < max_num_seqs:
            groups[-1].append(ids)
            tokens += len(ids)
        else:
            groups.append([ids])
            tokens = len(ids)
    return groups


def _run_group(engine: LLMEngine, scheduler: Scheduler, prompts: list[list[int]], *,
               pooling: bool) -> list[torch.Tensor]:
    seqs = [Sequence(f"pool-{i}", 0, list(ids), len(ids), 0) for i, ids in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    outputs: dict[int, torch.Tensor] = {}
    try:
        while len(outputs) < len(seqs):
            batch = scheduler.schedule()
            if not batch:
                raise QwenkitError("the KV cache is full (requests in flight hold it): try again later, or raise "
                                   "kv_cache_memory")
            rows, out = engine.runner.run(batch, pooling=pooling)
            for s in batch:
                s.seq.num_computed_tokens += s.num_tokens
                engine.block_manager.commit_full_blocks(s.seq)
            for row, r in enumerate(rows):
                seq = batch[r].seq
                outputs[seq.seq_id] = out[row].float().cpu()
                scheduler.finish(seq, "stop")
    finally:
        for seq in seqs:
            if not seq.is_finished:
                scheduler.finish(seq, "abort")
    return [outputs[seq.seq_id] for seq in seqs]
