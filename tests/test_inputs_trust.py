"""Every input a user hands usp: data and tokenizers edited in place, folders that ask for custom
code, configs with impossible sizes, tokenizers whose ids exceed the vocabulary, NaN weights,
empty prompts, and folders given to the wrong flag.

Each refusal is one line (``usp ...: error: ...``, exit code 2) before any rank starts, or a
``ValueError`` on every rank, naming the file, the tensor or the numbers. Everything is built here
(no download): a BPE tokenizer, a tiny random Llama in safetensors, text files; runs use one rank
and a micro model.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.test_pretrained import SENTENCES, _save_model, _save_tokenizer
from usp import cli
from usp.models.llama import CONFIGS, LlamaConfig
from usp.training.loop import train
from usp.training.setup import validate
from tests.specs import run_spec

MICRO = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
FLAGS = ["--nproc", "1", "--model", "test-micro", "--no-progress"]
PLANTED_MODULE = """open({marker!r}, "w").write("code from the folder ran")
from transformers import PreTrainedTokenizerFast


class PlantedTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture(autouse=True)
def micro_model(monkeypatch):
    monkeypatch.setitem(CONFIGS, "test-micro", MICRO)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    _save_tokenizer(root / "tokenizer")
    _save_model(root / "model", "llama", tie_word_embeddings=False)
    _save_tokenizer(root / "model")
    data = []
    for index, sentence in enumerate(SENTENCES):
        data.append(root / f"doc{index}.txt")
        data[-1].write_text(sentence * 20)
    (root / "prompt.txt").write_text("the ring passes keys")
    return {"root": root, "tokenizer": root / "tokenizer", "model": root / "model",
            "data": [str(p) for p in data], "prompt": root / "prompt.txt"}


def _main(capsys, *arguments: str) -> tuple[int, str]:
    rc = cli.main([str(a) for a in arguments])
    return rc, capsys.readouterr().err


def _one_line_refusal(capsys, *arguments: str) -> str:
    rc, error = _main(capsys, *arguments)
    assert rc == 2, error[-3000:]
    assert error.count("\n") == 1, f"not one line: {error[-3000:]}"
    return error


# ------------------------------------------------------------------------ data edited in place
def test_a_data_file_edited_in_place_is_refused_naming_it(files, tmp_path, capsys):
    data = []
    for name in ("a.txt", "b.txt"):
        data.append(tmp_path / name)
        shutil.copy(files["data"][len(data) - 1], data[-1])
    run = tmp_path / "run"
    rc, error = _main(capsys, "train", *FLAGS, "--seq-len", "64", "--steps", "2",
                      "--ckpt-every", "1", "--data", *data, "--out", run)
    assert rc == 0, error[-3000:]
    shutil.rmtree(run / "checkpoints/step_000002")
    text = data[1].read_text()
    data[1].write_text(("X" if text[0] != "X" else "Y") + text[1:])  # the same size
    error = _one_line_refusal(capsys, "train", "--resume", run)
    assert f"data file {data[1].resolve()} changed since the checkpoint was saved" in error
    assert "BLAKE2b" in error and str(data[0]) not in error


def test_a_tokenizer_edited_in_place_is_refused_naming_the_file(files, tmp_path, capsys):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(files["tokenizer"], tokenizer)
    run = tmp_path / "run"
    rc, error = _main(capsys, "train", *FLAGS, "--seq-len", "24", "--steps", "2",
                      "--ckpt-every", "1", "--tokenizer", tokenizer, "--data", *files["data"],
                      "--out", run)
    assert rc == 0, error[-3000:]
    shutil.rmtree(run / "checkpoints/step_000002")
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    error = _one_line_refusal(capsys, "train", "--resume", run)
    assert "tokenizer file tokenizer_config.json changed since the checkpoint was saved" in error


# ------------------------------------------------------------------------ no code from a folder
def _plant_tokenizer_code(directory: Path, marker: Path) -> None:
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PlantedTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_planted.PlantedTokenizer", None]})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "tokenization_planted.py").write_text(PLANTED_MODULE.format(marker=str(marker)))


def _plant_model_code(directory: Path, marker: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="planted",
                  auto_map={"AutoConfig": "configuration_planted.PlantedConfig",
                            "AutoModelForCausalLM": "modeling_planted.PlantedModel"})
    (directory / "config.json").write_text(json.dumps(config))
    for module in ("configuration_planted", "modeling_planted"):
        (directory / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


def _answering_yes(monkeypatch, capsys, marker: Path, *arguments) -> str:
    """Run the command with "y" waiting on stdin (transformers asks before running a folder's
    code); the module must not have run, and the refusal is one line."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 4))
    try:
        rc, error = _main(capsys, *arguments)
    except Exception as exc:  # transformers' own failure, after the folder's code ran
        rc, error = None, repr(exc)
    assert not marker.exists(), "a module of the folder ran"
    assert rc == 2 and error.count("\n") == 1, error[-3000:]
    return error


def test_a_tokenizer_asking_for_custom_code_is_refused_without_a_prompt(files, tmp_path,
                                                                        capsys, monkeypatch):
    marker = tmp_path / "marker"
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(files["model"], tokenizer)  # a tokenizer saved with its model's config
    _plant_tokenizer_code(tokenizer, marker)
    error = _answering_yes(monkeypatch, capsys, marker, "train", *FLAGS, "--seq-len", "24",
                           "--steps", "1", "--tokenizer", tokenizer, "--data", *files["data"],
                           "--out", tmp_path / "run")
    assert f"{tokenizer / 'tokenizer_config.json'} asks for custom code" in error


@pytest.mark.parametrize("planted", ["tokenizer", "model"])
def test_a_model_folder_asking_for_custom_code_is_refused_by_generate(planted, files, tmp_path,
                                                                      capsys, monkeypatch):
    marker = tmp_path / "marker"
    model = tmp_path / "model"
    shutil.copytree(files["model"], model)
    (_plant_tokenizer_code if planted == "tokenizer" else _plant_model_code)(model, marker)
    error = _answering_yes(monkeypatch, capsys, marker, "generate", "--prompt-file",
                           files["prompt"], "--hf-model", model, "--max-new-tokens", "1")
    planted_file = "tokenizer_config.json" if planted == "tokenizer" else "config.json"
    assert f"{model / planted_file} asks for custom code" in error


# ------------------------------------------------------------------------ sizes and vocabularies
def test_tokenizer_ids_beyond_the_vocabulary_are_refused(files, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "ring": 600}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>",
                            eos_token="<eos>").save_pretrained(tmp_path / "gaps")
    config = run_spec(model="test-micro", tokenizer=str(tmp_path / "gaps"), seq_len=24,
                         data=files["data"], out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"has 3 tokens \(ids up to 600\), but the model "
                                         r"test-micro has vocab_size=512"):
        validate(config, 1)


SIZES = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=384,
             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 10**12}, "has at least 256,000,000,294,912 parameters"),
    ({"vocab_size": 2 * 10**8}, "has at least 51,200,294,912 parameters"),
    ({"num_hidden_layers": 100000}, "has at least 14,745,731,072 parameters"),
    ({"num_attention_heads": 0}, "num_attention_heads=0; a size of a model is a positive whole"),
    ({"hidden_size": 128.0}, "hidden_size=128.0; a size of a model is a positive whole"),
])
def test_config_sizes_are_checked_before_anything_is_built(change, message, tmp_path,
                                                           monkeypatch):
    # a machine of 16 GiB, wherever the test runs
    monkeypatch.setattr("usp.inputs.model_size.host_memory_bytes", lambda: 16 * 2**30)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**SIZES, **change}))
    config = run_spec(hf_config=str(path), seq_len=64, synthetic=True,
                         out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=message) as refused:
        validate(config, 1)
    if "parameters" in message:
        assert "this machine need" in str(refused.value) and "it has 16.0 GiB" in str(refused.value)


def test_on_cuda_the_training_state_per_rank_meets_one_gpu(monkeypatch):
    """The CUDA branch without a GPU: a device of 80 GiB, 16 bytes a parameter over the ranks."""
    from types import SimpleNamespace

    from usp.inputs.model_size import check_training_memory

    monkeypatch.setattr("torch.cuda.current_device", lambda: 0)
    monkeypatch.setattr("torch.cuda.get_device_properties",
                        lambda index: SimpleNamespace(total_memory=80 * 2**30))
    check_training_memory("8b", 8 * 10**9, 2, cuda=True)  # 64 GB a rank: fits
    with pytest.raises(ValueError, match=r"119.2 GiB in all, 119.2 GiB on each of 1 rank\(s\), "
                                         r"before any activation; a GPU here has 80.0 GiB"):
        check_training_memory("8b", 8 * 10**9, 1, cuda=True)


def test_generate_checks_the_memory_before_loading(files, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(files["model"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 10**12}))
    error = _one_line_refusal(capsys, "generate", "--prompt-file", files["prompt"],
                              "--hf-model", model, "--max-new-tokens", "1")
    assert "each of the 1 rank(s) holds the whole model" in error and "GiB" in error


# ------------------------------------------------------------------------ weights and prompts
def _with_nan(files: dict, tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of the model with a NaN and an infinity in one tensor; (folder, tensor, file)."""
    model = tmp_path / "nan-model"
    shutil.copytree(files["model"], model)
    name = "model.layers.1.mlp.up_proj.weight"
    file = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(model / file)
    tensors[name][3, 5] = float("nan")
    tensors[name][0, 0] = float("inf")
    save_file(tensors, model / file, metadata={"format": "pt"})
    return model, name, file


def test_nan_weights_are_refused_naming_the_tensor(files, tmp_path, capsys):
    model, name, file = _with_nan(files, tmp_path)
    error = _one_line_refusal(capsys, "generate", "--prompt-file", files["prompt"],
                              "--hf-model", model, "--max-new-tokens", "1")
    assert f"tensor {name!r} in {file} holds 2 NaN or infinite values" in error
    config = run_spec(hf_model=str(model), tokenizer=str(model), data=files["data"],
                         seq_len=24, steps=1, ckpt_every=0, out=str(tmp_path / "run"),
                         progress=False)
    with pytest.raises(ValueError, match=f"tensor {name!r} in {file} holds 2 NaN"):
        train(config)
    assert not (tmp_path / "run/metrics.jsonl").exists()


def test_an_empty_prompt_is_refused_before_any_rank_starts(files, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    error = _one_line_refusal(capsys, "generate", "--prompt-file", empty, "--nproc", "2",
                              "--ulysses", "2", "--max-new-tokens", "1")
    assert "the prompt is empty" in error
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n")  # no token for this tokenizer (whitespace is only a separator)
    error = _one_line_refusal(capsys, "generate", "--prompt-file", blank,
                              "--hf-model", files["model"], "--max-new-tokens", "1")
    assert f"the prompt is empty: the tokenizer of {files['model']} turns it into no tokens" \
        in error


# ------------------------------------------------------------------------ a folder of another kind
@pytest.fixture(scope="module")
def run_directory(tmp_path_factory) -> Path:
    CONFIGS["test-micro"] = MICRO
    try:
        run = tmp_path_factory.mktemp("a-run") / "run"
        assert cli.main(["train", *FLAGS, "--seq-len", "64", "--synthetic", "--steps", "1",
                         "--out", str(run)]) == 0
    finally:
        del CONFIGS["test-micro"]
    return run


def test_folders_given_to_the_wrong_flag_are_named_for_what_they_are(files, run_directory,
                                                                     tmp_path, capsys):
    error = _one_line_refusal(capsys, "generate", "--prompt-file", files["prompt"],
                              "--hf-model", run_directory, "--max-new-tokens", "1")
    assert f"--hf-model {run_directory} is a usp run directory, not a Hugging Face model " \
           "folder" in error
    assert f"usp generate --checkpoint {run_directory}" in error
    error = _one_line_refusal(capsys, "generate", "--prompt-file", files["prompt"],
                              "--hf-model", run_directory / "checkpoints/step_000001",
                              "--max-new-tokens", "1")
    assert "is a usp checkpoint, not a Hugging Face model folder" in error
    error = _one_line_refusal(capsys, "train", "--nproc", "1", "--hf-model", run_directory,
                              "--seq-len", "64", "--synthetic", "--out", tmp_path / "a")
    assert "is a usp run directory, not a Hugging Face model folder" in error
    error = _one_line_refusal(capsys, "train", "--resume", files["model"])
    assert f"{files['model']} is a Hugging Face model folder (its config.json has a " \
           "model_type), not a usp run directory" in error
    error = _one_line_refusal(capsys, "train", *FLAGS, "--seq-len", "64", "--synthetic",
                              "--tokenizer", run_directory, "--out", tmp_path / "b")
    assert f"--tokenizer {run_directory} is a usp run directory, which has none of " \
           "tokenizer.json" in error
    (tmp_path / "empty").mkdir()
    error = _one_line_refusal(capsys, "train", *FLAGS, "--seq-len", "64", "--synthetic",
                              "--tokenizer", tmp_path / "empty", "--out", tmp_path / "c")
    assert f"--tokenizer {tmp_path / 'empty'} holds no tokenizer files" in error
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


def test_loaders_never_trust_remote_code():
    """Every transformers loader usp calls says trust_remote_code=False (the refusals above
    catch the folders; this keeps a later loader from forgetting the flag)."""
    root = Path(__file__).resolve().parents[1] / "usp"
    calls = 0
    for path in root.rglob("*.py"):
        text = path.read_text()
        loaders = r"(AutoTokenizer|AutoModel\w*|AutoConfig)\.from_(pretrained|config)\("
        for match in re.finditer(loaders, text):
            calls += 1
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            assert "trust_remote_code=False" in text[match.start():end], \
                f"{path.relative_to(root.parent)}: {text[match.start():end + 1]}"
    assert calls >= 4
