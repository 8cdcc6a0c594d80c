"""The backend switch (one registry of named backends for every op) and the measured choice of the CPU kernel."""

import json
import logging
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from yoloattn.nn import BackendUnavailableError, YoloattnWarning, get_backend, ops, set_backend, use_backend
from yoloattn.nn import backends as registry
from yoloattn.nn.functional import ROUTED_ATTENTION
from yoloattn.nn.functional._autotune import Autotuner


def test_every_op_has_a_reference_and_names_its_backends():
    table = ops()
    assert {"routed_attention", "deformable_attention", "attention", "msda", "acmix", "hab", "ema", "cpca", "msca",
            "polarized_attention", "sea_attention", "deform_conv2d"} <= set(table)
    assert table["routed_attention"] == ("cpu", "dense", "sdpa", "reference")
    assert all("reference" in names for names in table.values())


def test_global_name_applies_to_the_ops_that_have_it():
    with use_backend("sdpa"):
        assert get_backend() == "sdpa"
        assert ROUTED_ATTENTION.requested() == "sdpa" and registry._OPS["attention"].requested() == "sdpa"
        assert registry._OPS["deformable_attention"].requested() == "auto"  # it has no 'sdpa'
    with use_backend("reference"):
        assert all(op.requested() == "reference" for op in registry._OPS.values())
    assert get_backend() == "auto"


def test_per_op_choice_and_restore():
    with use_backend(routed_attention="sdpa", deformable_attention="reference"):
        assert get_backend("routed_attention") == "sdpa" and get_backend("deformable_attention") == "reference"
        with use_backend(routed_attention="auto"):
            assert get_backend("routed_attention") == "auto"
        assert get_backend("routed_attention") == "sdpa"
    assert get_backend("routed_attention") == "auto" and get_backend("deformable_attention") == "auto"


@pytest.mark.parametrize("call,match", [
    (lambda: set_backend("fast"), r"backend must be one of \[.*\], got 'fast'"),
    (lambda: set_backend(routed_attention="fused"), r"backend for routed_attention must be None or one of \('auto', "
                                                    r"'cpu', 'dense', 'sdpa', 'reference'\), got 'fused'"),
    (lambda: set_backend(nope="sdpa"), r"no op named 'nope'"),
    (lambda: get_backend("nope"), r"no op named 'nope'"),
])
def test_bad_names_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("value,expected", [
    ("sdpa,deformable_attention:reference", {"routed_attention": "sdpa", "deformable_attention": "reference"}),
    pytest.param("reference", {"routed_attention": "reference", "deformable_attention": "reference"},
                 marks=pytest.mark.slow),
])
def test_environment_variable(value, expected):
    code = ("import json; from yoloattn.nn import get_backend; "
            "print(json.dumps({op: get_backend(op) for op in ('routed_attention', 'deformable_attention')}))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, YOLOATTN_BACKEND=value),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_environment_variable_with_a_bad_name_fails_naming_it():
    code = "from yoloattn.nn import get_backend; get_backend()"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, YOLOATTN_BACKEND="routed_attention:gpu"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "YOLOATTN_BACKEND entry 'routed_attention:gpu'" in out.stderr


def test_declines_expected_at_debug_surprising_warned_once(monkeypatch, caplog):
    op = registry.Op("test_op_declines")
    try:
        op.register("fast", can_run=lambda x: registry.Decline("it is Tuesday") if x == 1 else
                    registry.Decline("the kernel failed to build", expected=False) if x == 2 else None)(lambda x: "fast")
        op.register("reference")(lambda x: "reference")
        monkeypatch.setattr(registry, "_reported", set())
        with caplog.at_level(logging.DEBUG, logger="yoloattn"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert op(0) == "fast" and op(1) == "reference" and op(2) == "reference" and op(2) == "reference"
        assert "does not use its 'fast' backend: it is Tuesday" in caplog.text
        surprising = [w for w in caught if issubclass(w.category, YoloattnWarning)]
        assert len(surprising) == 1 and "failed to build" in str(surprising[0].message)
        with pytest.raises(BackendUnavailableError, match="the 'fast' backend cannot run this call: it is Tuesday"):
            op(1, backend="fast")
    finally:
        registry._OPS.pop("test_op_declines")


# ---- the autotuner -----------------------------------------------------------------------------------------
def _sleepy(ms):
    return lambda: time.sleep(ms / 1e3)


def test_autotuner_measures_once_caches_on_disk_and_survives_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOATTN_CACHE", str(tmp_path))
    calls = []

    def candidates():
        calls.append(1)
        return {"cpu": _sleepy(8), "sdpa": _sleepy(1)}

    tuner = Autotuner("test", preferred="cpu", rounds=2)
    record = tuner.choose("build1", "shape1", candidates)
    assert record["winner"] == "sdpa" and record["ms"]["cpu"] > record["ms"]["sdpa"] and calls == [1]
    assert tuner.choose("build1", "shape1", candidates)["winner"] == "sdpa" and calls == [1]  # in memory
    fresh = Autotuner("test", preferred="cpu", rounds=2)
    assert fresh.choose("build1", "shape1", candidates)["winner"] == "sdpa" and calls == [1]  # from the file
    path = tmp_path / "kernels" / "test-build1.autotune.json"
    path.write_text("{damaged")
    again = Autotuner("test", preferred="cpu", rounds=2)
    assert again.choose("build1", "shape1", candidates)["winner"] == "sdpa" and calls == [1, 1]  # measured again
    assert json.loads(path.read_text())["shape1"]["winner"] == "sdpa"  # and the file repaired


def test_autotuner_preferred_wins_within_its_margin(tmp_path, monkeypatch):
    """The tie rule on fixed timings (real sleeps of equal length differ by more than 5% on a loaded machine)."""
    from yoloattn.nn.functional import _autotune

    monkeypatch.setenv("YOLOATTN_CACHE", str(tmp_path))
    timings = {}
    monkeypatch.setattr(_autotune, "_time", lambda fns, rounds: {name: timings[name] for name in fns})
    tuner = Autotuner("test", preferred="cpu", margin=0.05)
    for key, cpu_ms, winner in [("tie", 1.0, "cpu"), ("within", 1.049, "cpu"), ("beyond", 1.051, "sdpa")]:
        timings.update(cpu=cpu_ms, sdpa=1.0)
        assert tuner.choose("build", key, lambda: {"cpu": None, "sdpa": None})["winner"] == winner, key


def test_autotuner_confirms_a_decision_against_the_preferred(tmp_path, monkeypatch):
    """A measurement that the preferred candidate loses is repeated, and each candidate keeps its best time: a
    moment of load that slowed the kernel's first timing does not hand the decision to SDPA, a real loss does."""
    from yoloattn.nn.functional import _autotune

    monkeypatch.setenv("YOLOATTN_CACHE", str(tmp_path))
    runs = []

    def fake_time(fns, rounds):
        assert runs, "measured more often than expected"
        return runs.pop(0)

    monkeypatch.setattr(_autotune, "_time", fake_time)
    tuner = Autotuner("test", preferred="cpu", margin=0.05)

    def candidates():
        return {"cpu": None, "sdpa": None}

    runs[:] = [{"cpu": 2.0, "sdpa": 1.0}, {"cpu": 0.9, "sdpa": 1.1}]  # the kernel was slowed the first time
    record = tuner.choose("build", "transient", candidates)
    assert record == {"winner": "cpu", "ms": {"cpu": 0.9, "sdpa": 1.0}} and runs == []
    runs[:] = [{"cpu": 2.0, "sdpa": 1.0}, {"cpu": 1.9, "sdpa": 1.2}]  # slower both times
    assert tuner.choose("build", "real", candidates)["winner"] == "sdpa" and runs == []
    runs[:] = [{"cpu": 1.0, "sdpa": 1.5}]  # the preferred wins: measured once
    assert tuner.choose("build", "won", candidates)["winner"] == "cpu" and runs == []


def test_auto_follows_the_measurement(monkeypatch):
    """With the autotuner on, 'auto' takes the SDPA backend where it measured faster, and the kernel elsewhere."""
    import importlib

    from yoloattn.nn.functional import routed_attention_cpu as cpu

    ra = importlib.import_module("yoloattn.nn.functional.routed_attention")  # the module, not the function

    if not cpu.build_info()["available"]:
        pytest.skip("no CPU kernel")
    monkeypatch.setattr(ra, "_AUTOTUNE", True)
    q = torch.randn(1, 2, 2, 3, 3, 8)
    kv = torch.randn(1, 2, 2, 3, 3, 16)
    r_idx = torch.zeros(1, 4, 2, dtype=torch.int64)
    kw = dict(num_heads=2, scale=0.3)
    for winner in ("sdpa", "cpu"):
        monkeypatch.setattr(ra, "_tuned_winner", lambda key, w=winner: w)
        assert ROUTED_ATTENTION.select(None, q, kv, r_idx, **kw).name == winner
        assert ROUTED_ATTENTION.select("cpu", q, kv, r_idx, **kw).name == "cpu"  # by name: no measurement
