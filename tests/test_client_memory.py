"""Chat memory, tools and options of qwenkit.client: plain Python, no model, no torch."""

import json
import sqlite3
import subprocess
import sys
import threading
from typing import Literal

import pytest
from pydantic import BaseModel

from qwenkit.client import ChatOptions, InMemoryChatMemory, SQLiteChatMemory, tool


def turn(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": f"a{i}", "reasoning_content": f"r{i}"}]


def test_client_imports_without_torch():
    code = "import sys; import qwenkit.client; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_options_merge_keeps_defaults_and_overrides():
    defaults = ChatOptions(temperature=0.7, max_tokens=100, extra_body={"a": 1})
    merged = defaults.merged({"temperature": 0.0, "enable_thinking": False, "extra_body": {"b": 2}})
    assert merged.temperature == 0.0 and merged.max_tokens == 100 and merged.enable_thinking is False
    assert merged.extra_body == {"a": 1, "b": 2}
    assert defaults.temperature == 0.7  # unchanged
    with pytest.raises(ValueError):
        ChatOptions(temprature=1)


@pytest.mark.parametrize("make", [lambda p: InMemoryChatMemory(max_messages=4),
                                  lambda p: SQLiteChatMemory(p / "m.db", max_messages=4)])
def test_memory_window_starts_at_a_user_turn(tmp_path, make):
    memory = make(tmp_path)
    for i in range(3):
        memory.add("c", turn(i))
    memory.add("other", turn(9))
    assert [m["content"] for m in memory.get("c")] == ["q1", "a1", "q2", "a2"]
    assert memory.get("c")[1]["reasoning_content"] == "r1"  # kept with the assistant turn
    # A window of 3 would start at an assistant message: it starts at the next user one.
    assert [m["content"] for m in memory.get("c", last_n=3)] == ["q2", "a2"]
    assert sorted(memory.conversation_ids()) == ["c", "other"]
    memory.clear("c")
    assert memory.get("c") == [] and memory.get("other")


def test_sqlite_memory_survives_reopening(tmp_path):
    path = tmp_path / "chat.db"
    memory = SQLiteChatMemory(path, max_messages=None)
    memory.add("c", turn(0) + [{"role": "tool", "tool_call_id": "call_1", "content": "你好"}])
    memory.close()
    again = SQLiteChatMemory(path, max_messages=None)
    assert again.get("c") == turn(0) + [{"role": "tool", "tool_call_id": "call_1", "content": "你好"}]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_memory_from_two_threads_and_a_second_process(tmp_path):
    path = tmp_path / "chat.db"
    memory = SQLiteChatMemory(path, max_messages=None)

    def write(name):
        for i in range(50):
            memory.add(name, turn(i))

    threads = [threading.Thread(target=write, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    code = ("import sys; from qwenkit.client import SQLiteChatMemory\n"
            "m = SQLiteChatMemory(sys.argv[1], max_messages=None)\n"
            "[m.add('p', [{'role': 'user', 'content': str(i)}]) for i in range(50)]")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    for t in threads:
        t.join()
    for name in ("t1", "t2"):
        messages = memory.get(name)
        assert [m["content"] for m in messages[::2]] == [f"q{i}" for i in range(50)]  # whole turns, in order
    assert len(memory.get("p")) == 50


def test_sqlite_memory_killed_mid_write_loses_at_most_the_turn_in_flight(tmp_path):
    """A writer process is SIGKILLed while writing large turns: every turn it reported
    written is there, whole; nothing half-written is; the file is intact."""
    path = tmp_path / "chat.db"
    code = (
        "import sys\n"
        "from qwenkit.client import SQLiteChatMemory\n"
        "memory = SQLiteChatMemory(sys.argv[1], max_messages=None)\n"
        "big = 'x' * 200_000\n"
        "i = 0\n"
        "while True:\n"
        "    memory.add('c', [{'role': 'user', 'content': f'q{i}'},\n"
        "                     {'role': 'assistant', 'content': f'a{i}' + big}])\n"
        "    print(i, flush=True)\n"
        "    i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    reported = -1
    while reported < 30:
        reported = int(proc.stdout.readline())
    proc.kill()  # SIGKILL: no handler, no cleanup, most likely inside a write
    proc.wait(timeout=30)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    messages = SQLiteChatMemory(path, max_messages=None).get("c")
    assert len(messages) % 2 == 0  # whole turns only
    written = len(messages) // 2
    assert written >= reported + 1  # every reported turn survived (one more may have committed)
    assert [m["content"] for m in messages[::2]] == [f"q{i}" for i in range(written)]
    assert all(m["content"].startswith(f"a{i}") and len(m["content"]) > 200_000
               for i, m in enumerate(messages[1::2]))


def test_sqlite_memory_turn_is_all_or_nothing(tmp_path):
    memory = SQLiteChatMemory(tmp_path / "chat.db", max_messages=None)
    memory.add("c", turn(0))
    with pytest.raises(TypeError):
        memory.add("c", turn(1) + [{"role": "assistant", "content": object()}])  # not JSON: fails mid-turn
    assert memory.get("c") == turn(0)


class Place(BaseModel):
    city: str
    country: str = "FR"


def test_tool_schema_from_type_hints_and_docstring():
    @tool
    def get_weather(place: Place, unit: Literal["C", "F"] = "C", days: int = 1) -> dict:
        """Weather of a place.

        More detail that the model does not need."""
        return {"city": place.city, "unit": unit, "days": days}

    schema = get_weather.schema()["function"]
    assert schema["name"] == "get_weather" and schema["description"] == "Weather of a place."
    params = schema["parameters"]
    assert params["required"] == ["place"]
    assert params["properties"]["unit"]["enum"] == ["C", "F"]
    assert "Place" in json.dumps(params)
    assert json.loads(get_weather.invoke('{"place": {"city": "Paris"}, "days": 2}')) == {
        "city": "Paris", "unit": "C", "days": 2}
    assert get_weather.invoke('{"place": {"city": "Paris"}, "unit": "K"}').startswith("Error: invalid arguments")
    assert get_weather.invoke("not json").startswith("Error: JSONDecodeError")
    assert get_weather(Place(city="Rome"))["city"] == "Rome"  # still callable


def test_tool_exception_becomes_its_result():
    @tool(name="divide", description="a / b")
    def div(a: float, b: float) -> float:
        return a / b

    assert div.name == "divide" and div.invoke({"a": 1, "b": 4}) == "0.25"
    assert div.invoke({"a": 1, "b": 0}) == "Error: ZeroDivisionError: float division by zero"
