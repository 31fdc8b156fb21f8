"""Models as Ollama users expect them: short names, `qwenkit pull / list / show / rm`, on a
Hugging Face cache built offline in a tmp folder (the Hub itself is faked for `pull`)."""

import json
import shutil
import socket

import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants
from hub_cache import COMMIT, add_folder, add_snapshot, write_tiny_gguf
from tiny import SPECIAL_TOKENS

from qwenkit import model_names
from qwenkit.cli import main
from qwenkit.errors import ModelLoadError
from qwenkit.hub import find_local, list_models
from qwenkit.model_files import ModelFiles, resolve_model
from qwenkit.model_names import QWEN_MODELS, lookup, short_name_of

QWEN3_TOKENS = [f"t{i}" for i in range(40)] + SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tiny_qwen3(tiny_checkpoints):
    return tiny_checkpoints("qwen3")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty HF cache and qwenkit home; offline; any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path / "home"))
    return hub


@pytest.fixture
def filled(cache, tiny_qwen3, tmp_path):
    """The cache with Qwen/Qwen3-0.6B (a tiny safetensors checkpoint), a Q4_K_M file of
    Qwen/Qwen3-8B-GGUF and a GGUF of a repo the short-name table does not know."""
    add_folder(cache, "Qwen/Qwen3-0.6B", tiny_qwen3)
    gguf = write_tiny_gguf(tmp_path / "a.gguf", tokens=QWEN3_TOKENS, chat_template=None)
    add_snapshot(cache, "Qwen/Qwen3-8B-GGUF", {"Qwen3-8B-Q4_K_M.gguf": gguf})
    other = write_tiny_gguf(tmp_path / "b.gguf", tokens=QWEN3_TOKENS[:40], chat_template=None, file_type=7)
    add_snapshot(cache, "someone/Qwen3-4B-GGUF", {"Qwen3-4B-Q8_0.gguf": other})
    return cache


# -- the table ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, repo, quantization", [
    ("qwen3:0.6b", "Qwen/Qwen3-0.6B", None),
    ("qwen3:8b-q4_k_m", "Qwen/Qwen3-8B-GGUF", "q4_k_m"),
    ("Qwen3:8B-Q4_K_M", "Qwen/Qwen3-8B-GGUF", "q4_k_m"),
    ("qwen3:30b-a3b", "Qwen/Qwen3-30B-A3B", None),
    ("qwen3:30b-a3b-q8_0", "Qwen/Qwen3-30B-A3B-GGUF", "q8_0"),
    ("qwen2.5-coder:0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct", None),
    ("qwen3", "Qwen/Qwen3-8B", None),
    ("qwq", "Qwen/QwQ-32B", None),
])
def test_short_names(name, repo, quantization):
    model = lookup(name)
    assert (model.repo_id, model.quantization) == (repo, quantization)
    assert model_names.is_short_name(name)


@pytest.mark.parametrize("name, words", [
    ("qwen3:7b", "known: qwen3:0.6b, qwen3:1.7b"),
    ("qwen3:8b-q3_k_s", "unknown quantization 'q3_k_s'"),
    ("qwen3:4b-instruct-2507-q4_k_m", "publishes no GGUF"),
    ("llama3:8b", "unknown model name"),
])
def test_unknown_short_names(name, words):
    with pytest.raises(ValueError, match=words):
        lookup(name)


def test_the_table_is_documented():
    """docs/models.md shows the code's table, whole."""
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "models.md").read_text()
    for name, (repo, gguf_repo) in QWEN_MODELS.items():
        assert f"| `{name}` | `{repo}` | " + (f"`{gguf_repo}`" if gguf_repo else "none") + " |" in docs, name
    assert short_name_of("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf") == "qwen3:8b-q4_k_m"
    assert short_name_of("Qwen/Qwen3-0.6B") == "qwen3:0.6b"


# -- resolution ---------------------------------------------------------------------------


def test_short_names_resolve_from_the_cache(filled):
    snapshot = filled / "models--Qwen--Qwen3-0.6B" / "snapshots" / COMMIT
    assert resolve_model("qwen3:0.6b", progress=False) == ModelFiles("hf", snapshot, "Qwen/Qwen3-0.6B")
    gguf = filled / "models--Qwen--Qwen3-8B-GGUF" / "snapshots" / COMMIT / "Qwen3-8B-Q4_K_M.gguf"
    assert resolve_model("qwen3:8b-q4_k_m", progress=False).path == gguf
    assert resolve_model("Qwen/Qwen3-8B-GGUF/Qwen3-8B-Q4_K_M.gguf", progress=False).path == gguf


def test_a_name_not_here_says_how_to_get_it(filled):
    with pytest.raises(ModelLoadError, match=r"qwen3:8b-q8_0 \(Qwen/Qwen3-8B-GGUF\) is not on this machine .*"
                                             r"run `qwenkit pull qwen3:8b-q8_0` while online"):
        resolve_model("qwen3:8b-q8_0", progress=False)
    with pytest.raises(ModelLoadError, match=r"qwen3:1.7b \(Qwen/Qwen3-1.7B\) is not on this machine"):
        resolve_model("qwen3:1.7b", progress=False)


def test_llm_and_run_take_short_names(filled, capsys):
    from qwenkit import LLM

    llm = LLM("qwen3:0.6b", progress=False)
    assert llm.model_name == "Qwen/Qwen3-0.6B"
    assert main(["run", "--model", "qwen3:0.6b", "--json", "--max-tokens", "2", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] <= 2


# -- list, show, rm -----------------------------------------------------------------------


def test_list(filled, capsys):
    names = {m.name: m for m in list_models()}
    assert set(names) == {"qwen3:0.6b", "qwen3:8b-q4_k_m", "someone/Qwen3-4B-GGUF/Qwen3-4B-Q8_0.gguf"}
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "NEEDS", "CAPABILITIES"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["qwen3:0.6b"][1:4] == ["qwen3", "0M", "F32"]  # ~127k parameters
    assert rows["qwen3:0.6b"][-1] == "completion,thinking,hybrid_thinking,tools"
    assert rows["qwen3:8b-q4_k_m"][1:4] == ["qwen3", "0M", "Q4_K_M"]
    # The tiny GGUF carries no template: qwenkit uses Qwen3's, as when it loads it.
    assert rows["qwen3:8b-q4_k_m"][-1] == "completion,thinking,hybrid_thinking,tools"
    assert rows["someone/Qwen3-4B-GGUF/Qwen3-4B-Q8_0.gguf"][3] == "Q8_0"
    assert rows["someone/Qwen3-4B-GGUF/Qwen3-4B-Q8_0.gguf"][-1] == "completion"  # no marker tokens
    assert main(["list", "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {e["name"]: e["parameters"] for e in entries}["qwen3:0.6b"] == sum(
        p.numel() for p in __import__("safetensors.torch").torch.load_file(
            str(names["qwen3:0.6b"].files.path / "model.safetensors")).values())


def test_show_and_its_errors(filled, capsys):
    assert main(["show", "qwen3:8b-q4_k_m"]) == 0
    out = capsys.readouterr().out
    assert "architecture    qwen3" in out and "quantization    Q4_K_M" in out and "context length  4096" in out
    assert main(["show", "Qwen/Qwen3-0.6B", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "Qwen/Qwen3-0.6B"
    assert main(["show", "qwen3:32b"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: qwen3:32b is not on this machine (here: qwen3:0.6b, qwen3:8b-q4_k_m, ")
    assert "get it with `qwenkit pull qwen3:32b`" in err


def test_rm(filled, capsys):
    gguf_repo = filled / "models--Qwen--Qwen3-8B-GGUF"
    assert main(["rm", "qwen3:8b-q4_k_m"]) == 0
    assert capsys.readouterr().out.startswith("deleted qwen3:8b-q4_k_m (Qwen/Qwen3-8B-GGUF, ")
    assert not gguf_repo.exists()  # its only file: the repo folder goes too
    assert main(["rm", "Qwen/Qwen3-0.6B"]) == 0
    assert not (filled / "models--Qwen--Qwen3-0.6B").exists()
    assert [m.name for m in list_models()] == ["someone/Qwen3-4B-GGUF/Qwen3-4B-Q8_0.gguf"]
    assert main(["rm", "qwen3:0.6b"]) == 1
    assert "qwen3:0.6b is not on this machine" in capsys.readouterr().err


def test_rm_keeps_the_other_files_of_a_repo(filled, tmp_path):
    other = write_tiny_gguf(tmp_path / "c.gguf", tokens=QWEN3_TOKENS, chat_template=None, file_type=7)
    add_snapshot(filled, "Qwen/Qwen3-8B-GGUF", {"Qwen3-8B-Q8_0.gguf": other})
    assert main(["rm", "qwen3:8b-q4_k_m"]) == 0
    assert [m.name for m in list_models() if m.source == "Qwen/Qwen3-8B-GGUF"] == ["qwen3:8b-q8_0"]
    assert len(list((filled / "models--Qwen--Qwen3-8B-GGUF" / "blobs").iterdir())) == 1


def test_rm_never_deletes_what_a_link_points_to_outside_the_store(cache, tmp_path):
    # A snapshot whose file is a link to the user's own copy elsewhere, and a snapshot that
    # is itself a link to a folder elsewhere: rm removes the links, the outside files stay.
    outside = tmp_path / "mine"
    outside.mkdir()
    mine = write_tiny_gguf(outside / "Qwen3-8B-Q4_K_M.gguf", tokens=QWEN3_TOKENS, chat_template=None)
    snapshot = add_snapshot(cache, "Qwen/Qwen3-8B-GGUF", {})
    (snapshot / mine.name).symlink_to(mine)
    linked_repo = add_snapshot(cache, "Qwen/Qwen3-4B-GGUF", {}).parent
    shutil.rmtree(linked_repo / COMMIT)
    (outside / "4b").mkdir()
    theirs = write_tiny_gguf(outside / "4b" / "Qwen3-4B-Q8_0.gguf", tokens=QWEN3_TOKENS, chat_template=None,
                             file_type=7)
    (linked_repo / COMMIT).symlink_to(outside / "4b", target_is_directory=True)
    assert {m.name for m in list_models()} == {"qwen3:8b-q4_k_m", "qwen3:4b-q8_0"}

    assert main(["rm", "qwen3:8b-q4_k_m", "qwen3:4b-q8_0"]) == 0
    assert mine.read_bytes()[:4] == b"GGUF" and theirs.read_bytes()[:4] == b"GGUF"
    assert not (snapshot / mine.name).is_symlink()  # the link in the store is gone
    assert list_models() == []  # the store's entries are gone, the files they linked to are not
    assert sorted(p.name for p in outside.rglob("*.gguf")) == ["Qwen3-4B-Q8_0.gguf", "Qwen3-8B-Q4_K_M.gguf"]


def test_default_model_is_listed_and_removed(cache, tmp_path, capsys):
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    from qwenkit.default_model import DEFAULT_MODEL_NAME

    write_tiny_gguf(models / f"{DEFAULT_MODEL_NAME}.gguf", tokens=QWEN3_TOKENS, chat_template=None)
    assert find_local("default").source == "qwenkit home"
    # Listed by its own name (the one /v1/models reports), with `default` as its alias.
    assert main(["list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-1] == "ALIAS" and row.split()[0] == DEFAULT_MODEL_NAME and row.split()[-1] == "default"
    assert main(["list", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert (entry["name"], entry["aliases"]) == (DEFAULT_MODEL_NAME, ["default"])
    assert find_local(DEFAULT_MODEL_NAME) == find_local("default")
    assert main(["rm", "default"]) == 0
    assert "assemble it again on next use" in capsys.readouterr().out
    assert list_models() == []
    assert main(["list"]) == 0
    assert "no models yet: `qwenkit pull qwen3:0.6b`" in capsys.readouterr().out


# -- pull (the Hub faked) -------------------------------------------------------------------


@pytest.fixture
def fake_hub(cache, tmp_path, monkeypatch):
    """huggingface_hub's download calls answered from a folder of 'remote' files."""
    remote = {"Qwen/Qwen3-8B-GGUF": {
        "Qwen3-8B-Q4_K_M.gguf": write_tiny_gguf(tmp_path / "r1.gguf", tokens=QWEN3_TOKENS, chat_template=None),
        "Qwen3-8B-Q8_0.gguf": write_tiny_gguf(tmp_path / "r2.gguf", tokens=QWEN3_TOKENS, chat_template=None,
                                              file_type=7),
        "README.md": b"readme"},
        "Qwen/Qwen3-235B-A22B-GGUF": {"Q4_K_M/Qwen3-235B-A22B-Q4_K_M-00001-of-00003.gguf": b"GGUF"}}
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    calls = []

    def list_repo_files(self, repo_id, **kwargs):
        return list(remote[repo_id])

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        snapshot = add_snapshot(cache, repo_id, {filename: remote[repo_id][filename]})
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_pull_a_short_name_finds_its_file(fake_hub, capsys):
    assert main(["pull", "qwen3:8b-q8_0"]) == 0
    # The memory plan reads the model's config.json first (hub.plan_remote), then the GGUF comes.
    assert fake_hub == [("Qwen/Qwen3-8B", "config.json"), ("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q8_0.gguf")]
    err = capsys.readouterr().err
    assert "pulled qwen3:8b-q8_0" in err and "qwenkit run --model qwen3:8b-q8_0" in err
    assert [m.name for m in list_models()] == ["qwen3:8b-q8_0"]


def test_pull_a_repo_file(fake_hub, capsys):
    assert main(["pull", "Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf"]) == 0
    assert "qwenkit run --model Qwen/Qwen3-8B-GGUF/Qwen3-8B-Q4_K_M.gguf" in capsys.readouterr().err
    assert main(["pull", "Qwen/Qwen3-8B-GGUF", "README.md"]) == 1
    assert "README.md is not a .gguf file" in capsys.readouterr().err


def test_pull_refuses_split_ggufs(fake_hub, capsys):
    assert main(["pull", "qwen3:235b-a22b-q4_k_m"]) == 1
    assert "only as a split GGUF" in capsys.readouterr().err
    assert fake_hub == []


@pytest.mark.slow  # over 10 s (a whole engine in subprocesses, or many of them)
def test_pull_a_safetensors_repo(cache, tiny_qwen3, monkeypatch, capsys):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(add_folder(cache, repo_id, tiny_qwen3))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert main(["pull", "qwen3:0.6b"]) == 0
    assert calls[0][0] == "Qwen/Qwen3-0.6B" and "*.safetensors" in calls[0][1]["allow_patterns"]
    assert "(capabilities: completion, thinking, hybrid_thinking, tools)" in capsys.readouterr().err
    assert [m.name for m in list_models()] == ["qwen3:0.6b"]


def test_gguf_files_are_found_by_their_ending():
    assert lookup("qwen3:8b-q4_k_m").is_its_file("Qwen3-8B-Q4_K_M.gguf")
    assert lookup("qwen2.5-coder:0.5b-q4_k_m").is_its_file("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    assert lookup("qwen2.5:0.5b-f16").is_its_file("qwen2.5-0.5b-instruct-fp16.gguf")  # one quantization, two spellings
    assert not lookup("qwen3:8b-q4_0").is_its_file("Qwen3-8B-Q4_K_M.gguf")


def test_serve_accepts_the_short_name_too():
    from qwenkit.cli import _served_names

    assert _served_names("qwen3:0.6b", "Qwen/Qwen3-0.6B") == ["Qwen/Qwen3-0.6B", "qwen3:0.6b"]
    assert _served_names("Qwen3:8B-Q4_K_M", "Qwen3-8B-Q4_K_M") == ["Qwen3-8B-Q4_K_M", "qwen3:8b-q4_k_m"]
    assert _served_names("default", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M") == ["Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"]
