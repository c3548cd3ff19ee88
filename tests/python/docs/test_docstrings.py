"""Every public Python name has a docstring: the names in ``__all__`` of mola
and of its public submodules, and the public methods and properties of the
classes defined in Python."""
import inspect

import pytest

import mola
import mola.data
import mola.ops

MODULES = [mola, mola.ops, mola.data, mola.recipes, mola.evaluation, mola.analysis, mola.authors, mola.molex,
           mola.trainable, mola.config, mola.injection, mola.quant]
try:
    import mola.integrations  # needs transformers and accelerate

    MODULES.append(mola.integrations)
except ImportError:
    pass


def _documented(obj):
    doc = getattr(obj, "__doc__", None)
    return bool(doc and doc.strip())


def _public_names():
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, (str, bool, int, float, dict, tuple)):
                continue  # values: __version__, built_with_cuda, COMPUTE
            if getattr(obj, "__module__", None) == "typing":
                continue  # type aliases (mola.config.PerLayer): their #: comment documents them
            yield f"{module.__name__}.{name}", obj


@pytest.mark.parametrize("name, obj", list(_public_names()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_name_has_a_docstring(name, obj):
    assert _documented(obj), f"{name} has no docstring"
    if inspect.isclass(obj) and obj.__module__.startswith("mola.") and obj.__module__ != "mola._C":  # Python classes
        for attr, value in vars(obj).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value) or isinstance(value, property):
                assert _documented(value), f"{name}.{attr} has no docstring"


def test_every_module_lists_its_names():
    for module in MODULES:
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.__all__ names {name}, which it lacks"


def test_moved_names_still_work_with_a_deprecation_warning():
    """The names that left the top level work for one release, warning where they live now."""
    for name, home in mola._MOVED.items():
        with pytest.warns(DeprecationWarning, match=f"mola.{name} moved to mola.{home}.{name}"):
            obj = getattr(mola, name)
        assert obj is getattr(getattr(mola, home), name)
        assert name not in mola.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mola.nope  # noqa: B018


def test_inject_is_the_function_and_its_module_has_another_name():
    import mola.injection
    assert callable(mola.inject) and mola.inject is mola.injection.inject
    assert len(mola.__all__) <= 20
