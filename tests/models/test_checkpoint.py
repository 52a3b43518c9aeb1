import pytest
import torch
from safetensors.torch import save_file

from compress.errors import BadInput
from compress.models import get_builtin, load_checkpoint


def resnet8(**kwargs):
    return get_builtin("resnet8")(in_channels=1, **kwargs)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model_state_dict", "model"])
def test_round_trip_pt(tmp_path, wrap):
    source = resnet8()
    state = source.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    target = resnet8()
    assert not same_weights(source, target)
    assert load_checkpoint(target, path) is target
    assert same_weights(source, target)


def test_round_trip_safetensors(tmp_path):
    source = resnet8()
    path = tmp_path / "ckpt.safetensors"
    save_file(source.state_dict(), str(path))
    target = load_checkpoint(resnet8(), path)
    assert same_weights(source, target)


def test_data_parallel_prefix_is_stripped(tmp_path):
    source = resnet8()
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    assert same_weights(source, load_checkpoint(resnet8(), path))


def test_pickled_module_needs_trust(tmp_path):
    source = resnet8()
    path = tmp_path / "whole.pt"
    torch.save(source, path)
    with pytest.raises(BadInput, match="needs full unpickling.*--trust-checkpoint") as err:
        load_checkpoint(resnet8(), path)
    assert str(err.value).startswith(str(path))
    loaded = load_checkpoint(resnet8(), path, trust=True)
    assert type(loaded) is type(source) and same_weights(source, loaded)


def test_trusted_pickle_holding_a_state_dict(tmp_path):
    source = resnet8()
    path = tmp_path / "with_objects.pt"
    torch.save({"state_dict": source.state_dict(), "args": {"lr": slice(0, 1)}}, path)
    with pytest.raises(BadInput, match="--trust-checkpoint"):
        load_checkpoint(resnet8(), path)
    assert same_weights(source, load_checkpoint(resnet8(), path, trust=True))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pt":
        torch.save(resnet8().state_dict(), path)
    else:
        save_file(resnet8().state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match=r"ckpt.*: cannot read checkpoint, corrupt or truncated"):
        load_checkpoint(resnet8(), path)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(BadInput, match="nope.pt: checkpoint file not found"):
        load_checkpoint(resnet8(), tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(BadInput, match="notes.pt: cannot read checkpoint"):
        load_checkpoint(resnet8(), text)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "lr": torch.tensor(0.1), "best": 0.9}, other)
    with pytest.raises(BadInput, match="other.pt: no state_dict found.*top-level keys: epoch, lr, best"):
        load_checkpoint(resnet8(), other)


def test_other_architecture_names_keys(tmp_path):
    path = tmp_path / "resnet8.pt"
    torch.save(resnet8(num_classes=100).state_dict(), path)
    target = get_builtin("resnet20")(in_channels=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(BadInput) as err:
        load_checkpoint(target, path, arch="builtin:resnet20")
    message = str(err.value)
    assert message.startswith(f"{path}: does not match builtin:resnet20: missing keys layer1.1.conv1.weight, ")
    assert "more)" in message and "\n" not in message
    assert "shape mismatch (model vs checkpoint) fc.weight [10, 64] vs [100, 64]" in message
    # A refused checkpoint must leave the model untouched.
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_unexpected_keys_are_reported(tmp_path):
    state = dict(resnet8().state_dict(), extra_head=torch.zeros(3))
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(BadInput, match="does not match ResNetCifar: unexpected keys extra_head$"):
        load_checkpoint(resnet8(), path)
