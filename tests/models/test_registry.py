import pytest
from torch import nn

from compress.models import builtin_names, get_builtin
from compress.models.registry import register_builtin


def test_builtins_are_registered():
    assert builtin_names() == ["mobilenet", "resnet20", "resnet32", "resnet8", "transformer"]
    for name in builtin_names():
        assert isinstance(get_builtin(name)(num_classes=3), nn.Module)


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="unknown builtin 'resnet21'.*resnet20"):
        get_builtin("resnet21")


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):

        @register_builtin("resnet20")
        def impostor(**kwargs):
            return nn.Identity()

    assert get_builtin("resnet20").__module__ == "compress.models.resnet_cifar"
