"""The web page's conversation store under concurrent processes and SIGKILL: no message
is ever left without its conversation, and no turn is ever half written."""

import multiprocessing
import os
import random
import signal
import sqlite3
import time

import pytest

from qwenkit.server.web.conversations import ConversationNotFound, ConversationStore


def hammer(path: str, seed: int) -> None:
    """Create conversations, append turns to and delete ones picked at random, until killed."""
    store = ConversationStore(path)
    rng = random.Random(seed)
    while True:
        ids = [c["id"] for c in store.list()]
        roll = rng.random()
        try:
            if roll < 0.15 or len(ids) < 3:
                store.create()
            elif roll < 0.85:
                turn = [{"role": "user", "content": "q" * rng.randint(1, 4000)}, {"role": "assistant", "content": "a"}]
                store.append(rng.choice(ids), turn)
            else:
                store.delete(rng.choice(ids))
        except ConversationNotFound:
            pass  # another process deleted it first


@pytest.mark.slow  # over 10 s (a whole engine in subprocesses, or many of them)
def test_racing_deletes_appends_and_kills_leave_no_orphan_messages(tmp_path):
    path = str(tmp_path / "conversations.sqlite3")
    ConversationStore(path).close()
    fork = multiprocessing.get_context("fork")  # starts at once: the modules are imported here already

    def start(seed: int):
        process = fork.Process(target=hammer, args=(path, seed), daemon=True)
        process.start()
        return process

    rng = random.Random(0)
    workers = [start(seed) for seed in range(4)]
    kills = 0
    try:
        while kills < 40:
            time.sleep(rng.uniform(0.02, 0.2))
            victim = rng.randrange(len(workers))
            os.kill(workers[victim].pid, signal.SIGKILL)  # mid-transaction, as often as not
            workers[victim].join()
            kills += 1
            workers[victim] = start(100 + kills)
    finally:
        for process in workers:
            process.kill()
            process.join()
    db = sqlite3.connect(path)
    num_messages, num_conversations = db.execute(
        "SELECT (SELECT COUNT(*) FROM messages), (SELECT COUNT(*) FROM web_conversations)").fetchone()
    orphans = db.execute("SELECT COUNT(*) FROM messages "
                         "WHERE conversation_id NOT IN (SELECT id FROM web_conversations)").fetchone()[0]
    per_conversation = db.execute("SELECT COUNT(*) FROM messages GROUP BY conversation_id").fetchall()
    assert orphans == 0
    assert all(n % 2 == 0 for (n,) in per_conversation)  # whole turns only (user + assistant)
    assert num_messages > 20 and num_conversations > 0, num_messages


def test_a_failed_append_or_delete_writes_nothing(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    conversation = store.create()
    with pytest.raises(ConversationNotFound):
        store.append("conv_missing", [{"role": "user", "content": "x"}])
    with pytest.raises(ConversationNotFound):
        store.delete("conv_missing")
    assert store.memory.conversation_ids() == []
    store.append(conversation["id"], [{"role": "user", "content": "x"}])
    store.delete(conversation["id"])
    assert store.memory.conversation_ids() == [] and store.list() == []
