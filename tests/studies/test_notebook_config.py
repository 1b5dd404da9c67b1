"""The declared constraints of study configs (workbench.studies.notebook): each kind, relations, the error text,
notebook parameter names, and the phase timer."""

from dataclasses import dataclass

import pytest

from workbench.studies.notebook import (
    ConfigError,
    NotebookConfig,
    Phases,
    StudyResult,
    as_tuple,
    at_most,
    choice,
    constrained,
    each_in,
    each_int,
    each_number,
    int_range,
    less_than,
    non_empty,
    positive_int,
    relation,
)


@dataclass
class Demo(NotebookConfig):
    NOTEBOOK = {"n_prompts": "n_prompts", "n_train": "n_train", "mode": "mode", "steps": "steps",
                "n_eval": "n_test"}
    SMOKE_SIZED = ("n_prompts", "n_train")
    RELATIONS = (less_than("n_train", "n_prompts", "held-out rows"),
                 at_most("n_pool", "n_train", when=lambda c: c.mode == "train"),
                 relation(("tags", "names"), lambda c: len(c.tags) == len(c.names), "one tag per name"))

    n_prompts: int = positive_int(10)
    n_train: int = positive_int(5)
    n_test: int = positive_int(4, minimum=2)
    n_pool: int = positive_int(3)
    steps: int = int_range(2, 1, 8)
    mode: str = choice("fast", ("fast", "train"))
    kinds: tuple[str, ...] = each_in(("a",), ("a", "b"), non_empty=True)
    layers: tuple[int, ...] | None = each_int(None, lo=0, optional=True)
    taus: tuple[float, ...] = each_number((0.5,), above=0)
    names: tuple[str, ...] = non_empty(("x",), of=str)
    tags: tuple = as_tuple(("t",))
    even: int = constrained(2, check=lambda v: v % 2 == 0, allowed="an even number")
    smoke: bool = False

    @classmethod
    def smoke_config(cls, **overrides):
        return cls(**(dict(n_prompts=4, n_train=2, smoke=True) | overrides))


def test_valid_values_are_kept_and_lists_become_tuples():
    d = Demo(kinds=["a", "b"], layers=[0, 3], taus=[1], names=["y"], tags=["u"])
    assert d.kinds == ("a", "b") and d.layers == (0, 3) and d.taus == (1.0,) and d.names == ("y",)
    assert Demo().layers is None and Demo().kinds == ("a",)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(n_prompts=0), r"Demo: n_prompts=0 is not allowed: n_prompts must be a positive int"),
    (dict(n_prompts=True), r"n_prompts=True .*positive int"),  # a bool is no count
    (dict(n_test=1), r"n_test=1 .*an int >= 2"),
    (dict(steps=9), r"steps=9 .*an int in 1..8"),
    (dict(steps=1.5), r"steps=1.5 .*an int in 1..8"),
    (dict(mode="slow"), r"mode='slow' .*one of \['fast', 'train'\]"),
    (dict(kinds=("a", "c")), r"kinds=\('a', 'c'\) .*a non-empty list of \['a', 'b'\]"),
    (dict(kinds=()), r"kinds=\(\) .*non-empty"),
    (dict(layers=[-1]), r"layers=\[-1\] .*list of ints >= 0 or None"),
    (dict(taus=(0.0,)), r"taus=\(0.0,\) .*numbers > 0"),
    (dict(names=("",)), r"names=\(''\,\) .*non-empty list of non-empty strs"),
    (dict(names=()), r"names=\(\) .*non-empty list"),
    (dict(tags="t"), r"tags='t' .*a list"),
    (dict(even=3), r"even=3 .*an even number"),
])
def test_each_constraint_kind_names_field_value_and_what_is_allowed(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        Demo(**kwargs)
    assert err.value.fields == tuple(kwargs)
    assert isinstance(err.value, ValueError)


def test_relations_name_every_field_and_value():
    with pytest.raises(ConfigError, match=r"n_train=10, n_prompts=10 is not allowed: need n_train < n_prompts "
                                          r"\(held-out rows\)") as err:
        Demo(n_train=10)
    assert err.value.fields == ("n_train", "n_prompts")
    Demo(n_pool=9, n_train=5)  # the conditional relation holds only when mode == "train"
    with pytest.raises(ConfigError, match=r"n_pool=9, n_train=5 .*n_pool <= n_train"):
        Demo(n_pool=9, mode="train")
    with pytest.raises(ConfigError, match="one tag per name"):
        Demo(tags=("a", "b"))


def test_check_notebook_builds_full_size_and_smoke_configs_naming_the_parameter():
    ns = {"n_prompts": 10, "n_train": 5, "mode": "fast", "steps": 2, "n_eval": 4}
    Demo.check_notebook(ns, smoke=True)
    # smoke replaces n_train with its own size, but the user's value is still checked at full size
    with pytest.raises(ConfigError, match=r"^parameter n_train, n_prompts: Demo: n_train=50"):
        Demo.check_notebook(ns | {"n_train": 50}, smoke=True)
    # a notebook parameter with another field name is reported by its notebook name
    with pytest.raises(ConfigError, match=r"^parameter n_eval: Demo: n_test=0"):
        Demo.check_notebook(ns | {"n_eval": 0}, smoke=False)
    # a smoke config is checked like any other: n_train 4 is fine at full size, not against smoke's n_prompts 4
    with pytest.raises(ConfigError, match=r"n_train=4, n_prompts=4"):
        Demo.smoke_config(n_train=4)
    assert Demo.parameter_for("n_test") == "n_eval" and Demo.parameter_for("taus") == "taus"


def test_phases_time_each_named_phase():
    phases = Phases()
    with phases("a"):
        pass
    with phases("a"):
        pass
    assert phases.run("b", lambda x: x + 1, 1) == 2
    timings = phases.finish()
    assert set(timings) == {"a", "b", "total"} and all(v >= 0 for v in timings.values())


def test_study_results_follow_the_protocol():
    from workbench.studies.counting_readout.study import CountingResult
    from workbench.studies.encoded_expressed.study import EncodedExpressedResult
    from workbench.studies.latent_drift.study import DriftResult
    from workbench.studies.logit_lens.study import LogitLensResult
    from workbench.studies.sae_features.study import SAEStudyResult
    from workbench.studies.tuned_lens_patching.study import TunedLensPatchingResult
    from workbench.studies.visual_ignorance.study import VisualResult

    for cls in (CountingResult, EncodedExpressedResult, DriftResult, LogitLensResult, SAEStudyResult,
                TunedLensPatchingResult, VisualResult):
        for name in ("summary", "tables", "figures", "save"):
            assert callable(getattr(cls, name, None)), f"{cls.__name__} lacks {name}()"
        assert "timings" in cls.__dataclass_fields__, f"{cls.__name__} has no timings"
    assert StudyResult is not None
