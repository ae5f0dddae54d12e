"""Loading and saving checkpoints: transformers as the independent reference for every round trip,
the real hub-cache layout for offline resolution, and one-sentence errors for each bad input."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import MASK, make_model_dir, tiny_config, tiny_model
from safetensors.torch import load_file, save_file

import minidiff
from minidiff.errors import UserError
from minidiff.plumbing import checkpoint
from minidiff.plumbing.checkpoint import (
    load_model,
    load_weights,
    resolve_model_dir,
    save_pretrained,
)

IDS = torch.tensor([[2, 10, 11, 12, 4, 13, 14, 15, 16, 17, 18, 1], [2, 20, 21, 4, 22, 1, 0, 0, 0, 0, 0, 0]])
MASK_2D = (IDS != 0).long()
REAL = MASK_2D.bool()


def hf_logits(directory, cls=transformers.AutoModelForMaskedLM):
    hf = cls.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(input_ids=IDS, attention_mask=MASK_2D)


def our_logits(model):
    with torch.no_grad():
        return model(IDS, attention_mask=MASK_2D)


def close(a, b):
    return (a[REAL] - b[REAL]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- round trips


def test_save_pretrained_loads_in_transformers(tmp_path):
    model = tiny_model(seed=1)
    save_pretrained(model, tmp_path)
    assert close(our_logits(model), hf_logits(tmp_path).logits)
    again = load_model(tmp_path)
    assert close(our_logits(model), our_logits(again))
    assert again.decoder.weight is again.model.embeddings.tok_embeddings.weight  # one tied Parameter
    assert not again.training


def test_sharded_checkpoint(tmp_path):
    hf = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**tiny_config().to_dict()))
    with torch.no_grad():
        hf.decoder.bias.normal_()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        want = hf.eval()(input_ids=IDS, attention_mask=MASK_2D).logits
    assert close(our_logits(load_model(tmp_path)), want)
    # load_weights joins the shards: every tensor transformers saved, equal
    state = load_weights(tmp_path)
    for key, value in hf.state_dict().items():
        if key != "decoder.weight":
            assert torch.equal(state[key], value), key


def test_headless_checkpoint(tmp_path):
    torch.manual_seed(0)
    hf = transformers.ModernBertModel(transformers.ModernBertConfig(**tiny_config().to_dict())).eval()
    hf.save_pretrained(tmp_path)
    assert not any(k.startswith("model.") for k in load_file(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"headless ModernBertModel.*MLM head .*missing") as err:
        load_model(tmp_path)
    assert "allow_missing_head=True" in str(err.value) and "model.safetensors" in str(err.value)
    with pytest.warns(UserWarning, match="no MLM head"):
        model = load_model(tmp_path, allow_missing_head=True)
    with pytest.warns(UserWarning, match="no MLM head"):
        half = load_model(tmp_path, allow_missing_head=True, dtype=torch.bfloat16)
    assert half.head.dense.weight.dtype == torch.bfloat16
    with torch.no_grad():
        want = hf(input_ids=IDS, attention_mask=MASK_2D).last_hidden_state
        got = model.hidden(IDS, MASK_2D)
    assert close(got, want)


def test_dtype_and_device(tmp_path):
    save_pretrained(tiny_model(seed=2), tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    want = our_logits(load_model(tmp_path))
    got = our_logits(model).float()
    assert (got[REAL] - want[REAL]).abs().max() < 0.3 * want[REAL].abs().max()  # bf16, same function


def write_hub_cache(cache: Path, repo_id: str, source: Path) -> str:
    """The layout huggingface_hub itself writes: blobs named by content hash, a snapshot folder
    of relative symlinks for one commit, and refs/main naming that commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_hub_id_resolves_offline_from_cache(tmp_path, monkeypatch):
    source = make_model_dir(tmp_path / "source", seed=3)
    cache = tmp_path / "hf_home" / "hub"
    commit = write_hub_cache(cache, "someorg/tiny-mmbert", source)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = resolve_model_dir("someorg/tiny-mmbert")
    assert directory.resolve() == (cache / "models--someorg--tiny-mmbert" / "snapshots" / commit).resolve()
    model = minidiff.load_model("someorg/tiny-mmbert")
    assert close(our_logits(model), our_logits(load_model(source)))
    assert minidiff.load_model("someorg/tiny-mmbert", revision=commit) is not None
    tok = minidiff.load_tokenizer("someorg/tiny-mmbert")
    assert tok.mask_id == MASK
    # HF_HUB_CACHE names the cache directly
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("someorg/tiny-mmbert").resolve() == directory.resolve()
    # an id that is not in the cache: one sentence naming it, no network attempt
    with pytest.raises(UserError, match=r"someorg/absent is neither a local directory nor a model found in the hub cache"):
        load_model("someorg/absent")
    with pytest.raises(UserError, match="at revision v9"):
        load_model("someorg/tiny-mmbert", revision="v9")


# ----------------------------------------------------------------------------- the .bin converter


def test_converter_round_trip(tmp_path, capsys):
    torch.manual_seed(4)
    hf = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**tiny_config().to_dict())).eval()
    with torch.no_grad():
        hf.decoder.bias.normal_()
    hf.config.save_pretrained(tmp_path)
    state = hf.state_dict()  # includes the tied decoder.weight, as mmBERT's pytorch_model.bin does
    assert "decoder.weight" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"only a pickled pytorch_model.bin; convert it once with `python -m minidiff.plumbing.checkpoint convert"):
        load_model(tmp_path)
    assert checkpoint.main(["convert", str(tmp_path)]) == 0
    assert "dropped the tied decoder.weight" in capsys.readouterr().out
    written = load_file(tmp_path / "model.safetensors")
    assert set(written) == set(state) - {"decoder.weight"}
    for key, value in written.items():
        assert torch.equal(value, state[key]), key
    assert not list(tmp_path.glob("*.tmp"))
    assert not list(tmp_path.glob("*.tmp*"))  # nor atomic_path's *.tmp-PID
    with torch.no_grad():
        want = hf(input_ids=IDS, attention_mask=MASK_2D).logits
    assert close(our_logits(load_model(tmp_path)), want)
    # transformers reads the converted directory too (it prefers model.safetensors)
    assert close(hf_logits(tmp_path).logits, want)
    # a second run refuses to overwrite without --overwrite
    with pytest.raises(UserError, match="model.safetensors already exists; pass --overwrite"):
        checkpoint.main(["convert", str(tmp_path)])
    assert checkpoint.main(["convert", str(tmp_path), "--overwrite"]) == 0


def one_sentence(text: str) -> bool:
    text = text.strip()
    return "\n" not in text and "Traceback" not in text


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("no_dir", r"does-not-exist is not a directory"),
        ("no_bin", r"has no pytorch_model.bin to convert"),
        ("pickle", r"pytorch_model.bin could not be read .* holds Python objects other than tensors"),
        ("truncated", r"pytorch_model.bin could not be read .*truncated or not a torch.save file"),
        ("not_dict", r"pytorch_model.bin does not hold a flat state dict"),
    ],
)
def test_converter_bad_inputs(tmp_path, case, pattern):
    directory = tmp_path / ("does-not-exist" if case == "no_dir" else "model")
    if case != "no_dir":
        directory.mkdir()
    if case == "pickle":  # an arbitrary object: weights_only refuses to unpickle it
        import pickle

        (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Path("x")}))
    if case == "truncated":
        torch.save({"w": torch.zeros(1000)}, directory / "pytorch_model.bin")
        data = (directory / "pytorch_model.bin").read_bytes()
        (directory / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    if case == "not_dict":
        torch.save([torch.zeros(2)], directory / "pytorch_model.bin")
    with pytest.raises(UserError, match=pattern) as err:
        checkpoint.main(["convert", str(directory)])
    assert one_sentence(str(err.value))
    assert not (directory / "model.safetensors").exists() and not list(directory.glob("*.tmp"))
    assert not list(directory.glob("*.tmp*"))  # nor atomic_path's *.tmp-PID


def test_converter_round_trip_check_refuses_a_changed_file(tmp_path, monkeypatch):
    # a writer that silently changes a tensor: the read-back check must refuse to publish
    import safetensors.torch

    def corrupting_save(state, filename, metadata=None):
        save_file({k: v + 1 for k, v in state.items()}, filename, metadata=metadata)

    torch.save({"w": torch.zeros(3)}, tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(safetensors.torch, "save_file", corrupting_save)
    with pytest.raises(RuntimeError, match="round trip of model.safetensors changed tensor w"):
        checkpoint.convert(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_model.bin"]


def test_converter_cli_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "minidiff.plumbing.checkpoint", "convert", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path} has no pytorch_model.bin to convert\n"


# ----------------------------------------------------------------------------- bad inputs


def test_missing_config(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match=rf"{tmp_path / 'config.json'} is missing"):
        load_model(tmp_path)


def test_missing_key(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.Wi.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors is missing 1 tensor\(s\).*: model\.layers\.1\.mlp\.Wi\.weight$"):
        load_model(tmp_path)


def test_unexpected_key(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["classifier.weight"] = torch.zeros(3, 32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"has 1 tensor\(s\) a ModernBertForMaskedLM does not: classifier\.weight$"):
        load_model(tmp_path)


def test_shape_mismatch(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 40  # weights were saved with 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert "model.layers.0.mlp.Wi.weight" in message and "[96, 32]" in message and "[80, 32]" in message
    assert one_sentence(message)


def test_truncated_safetensors(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    for cut in (len(data) - 100, 5):  # inside the tensor data; inside the header length
        file.write_bytes(data[:cut])
        with pytest.raises(UserError, match=rf"{file} is not a readable safetensors file") as err:
            load_model(tmp_path)
        assert one_sentence(str(err.value))


def test_path_neither_directory_nor_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match=r"nosuchorg/nosuchmodel is neither a local directory nor a model found in the hub cache") as err:
        load_model("nosuchorg/nosuchmodel")
    assert one_sentence(str(err.value))
    with pytest.raises(UserError, match=r"does not exist"):
        load_model(str(tmp_path / "missing-dir"))
    with pytest.raises(UserError, match=r"not/a valid/id.* is neither a local directory"):
        load_model("not/a valid/id")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match=r"file.txt is a file; expected a model directory"):
        load_model(tmp_path / "file.txt")


def test_only_bin_or_nothing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(UserError, match=r"has no model.safetensors or model.safetensors.index.json"):
        load_model(tmp_path)
