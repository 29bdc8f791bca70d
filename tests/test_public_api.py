"""The documented import paths resolve (README and module docstrings use them)."""

import types

import hedgehog_attention
import hedgehog_attention.convert as convert


def test_every_public_name_resolves():
    for name in hedgehog_attention.__all__:
        assert getattr(hedgehog_attention, name) is not None, name
    for name in convert.__all__:
        assert getattr(convert, name) is not None, name


def test_lazy_exports_are_the_defining_objects():
    from hedgehog_attention.convert.serialization import load_linearized
    from hedgehog_attention.models import RotaryTransformer
    from hedgehog_attention.train import Trainer

    assert hedgehog_attention.Trainer is Trainer
    assert hedgehog_attention.RotaryTransformer is RotaryTransformer
    assert hedgehog_attention.load_linearized is load_linearized is convert.load_linearized


def test_unknown_attribute_raises_attribute_error():
    try:
        hedgehog_attention.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_convert_submodules_are_not_shadowed():
    # `from .distill import distill` at package level would make `convert.distill` a function.
    import hedgehog_attention.convert.distill  # noqa: F401
    import hedgehog_attention.convert.finetune  # noqa: F401

    assert isinstance(convert.distill, types.ModuleType)
    assert isinstance(convert.finetune, types.ModuleType)
