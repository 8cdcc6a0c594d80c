"""Trust: no network, checkpoints that cannot run code, a clean boundary between the layers and Ultralytics,
a dataset cache that heals itself, and bad inputs that fail with a clear error."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

# Replaces every way to reach the network by a recorder that raises; at exit the calls are printed as JSON.
NETWORK_TRAP = textwrap.dedent("""
    import atexit, json, socket
    _calls = []
    def _trap(name):
        def refuse(*args, **kwargs):
            _calls.append([name, repr(args[:2])])
            raise OSError(f"network access blocked by the test: {name}{args[:2]!r}")
        return refuse
    socket.getaddrinfo = _trap("getaddrinfo")
    socket.gethostbyname = _trap("gethostbyname")
    socket.create_connection = _trap("create_connection")
    socket.socket.connect = _trap("connect")
    socket.socket.connect_ex = _trap("connect_ex")
    atexit.register(lambda: print("NETWORK_CALLS " + json.dumps(_calls)))
""")


def run_python(code: str, tmp_path: Path, env_extra=None, timeout=900, trap=True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (network trapped), with its own Ultralytics config dir; cwd tmp_path."""
    env = dict(os.environ)
    for key in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "PYTEST_CURRENT_TEST"):
        env.pop(key, None)
    env.update(YOLO_CONFIG_DIR=str(tmp_path / "ultralytics-config"), **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", (NETWORK_TRAP if trap else "") + code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def network_calls(proc: subprocess.CompletedProcess) -> list:
    line = next((line for line in proc.stdout.splitlines() if line.startswith("NETWORK_CALLS ")), None)
    assert line is not None, f"no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[len("NETWORK_CALLS "):])


# ---- the boundary between the layers and Ultralytics ---------------------------------------------------------
def test_import_yoloattn_nn_imports_no_ultralytics_and_changes_nothing(tmp_path):
    proc = run_python(textwrap.dedent("""
        import os, sys
        import torch
        before = dict(os.environ)
        import yoloattn.nn, yoloattn.nn.bra, yoloattn.nn.functional
        imported = dict(os.environ) == before
        import torch._dynamo  # a custom op's first call imports it, and it sets TORCHINDUCTOR_CACHE_DIR: torch's doing
        before = dict(os.environ)
        y = yoloattn.nn.BiLevelRoutingAttention(16, num_heads=2)(torch.randn(1, 16, 9, 9))
        print("ULTRALYTICS", "ultralytics" in sys.modules, "ENV", imported and dict(os.environ) == before)
    """), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ULTRALYTICS False ENV True" in proc.stdout
    assert not (tmp_path / "ultralytics-config").exists()  # no fonts, no settings written
    assert network_calls(proc) == []


def test_import_yoloattn_then_ultralytics_is_offline_registered_and_quiet(tmp_path):
    proc = run_python(textwrap.dedent("""
        import os, sys
        import yoloattn
        print("AFTER_IMPORT", "ultralytics" in sys.modules, os.environ.get("YOLO_OFFLINE"))
        from ultralytics import YOLO
        from ultralytics.nn import tasks
        print("REGISTERED", "BiLevelRoutingAttention" in vars(tasks), os.environ.get("YOLO_OFFLINE"),
              os.environ.get("YOLO_AUTOINSTALL"))
        model = YOLO("yolov8n.yaml")
    """), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "AFTER_IMPORT False None" in proc.stdout and "REGISTERED True 1 False" in proc.stdout
    assert network_calls(proc) == []
    fonts = sorted(p.name for p in (tmp_path / "ultralytics-config" / "Ultralytics").glob("Arial*.ttf"))
    assert fonts == ["Arial.Unicode.ttf", "Arial.ttf"]


def test_fonts_already_there_are_not_touched(tmp_path):
    config = tmp_path / "ultralytics-config" / "Ultralytics"  # Ultralytics' USER_CONFIG_DIR under YOLO_CONFIG_DIR
    config.mkdir(parents=True)
    (config / "Arial.ttf").write_bytes(b"the user's own font")
    proc = run_python("import yoloattn\nimport ultralytics.utils\n", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (config / "Arial.ttf").read_bytes() == b"the user's own font"
    assert (config / "Arial.Unicode.ttf").exists()


def test_ultralytics_imported_first_is_made_offline(tmp_path):
    proc = run_python(textwrap.dedent("""
        import ultralytics.utils as u
        import yoloattn
        from ultralytics.nn import tasks
        print("ONLINE", u.ONLINE, "REGISTERED", "DAttention" in vars(tasks))
    """), tmp_path, trap=True)
    assert proc.returncode == 0, proc.stderr
    assert "ONLINE False REGISTERED True" in proc.stdout
    # Ultralytics' own import-time probe ran before yoloattn could stop it: that is the user's import order
    assert {call[0] for call in network_calls(proc)} <= {"getaddrinfo"}


def test_changed_ultralytics_internals_fail_with_a_clear_message():
    import types

    from yoloattn.yolo.register import UnsupportedUltralyticsError, check_internals

    def parse_model(d, input_channels, verbose=True):  # no local named ch, f or i
        return input_channels

    fake = types.ModuleType("ultralytics.nn.tasks")
    fake.parse_model, fake.Conv = parse_model, object
    with pytest.raises(UnsupportedUltralyticsError, match=r"cannot register its layers with Ultralytics 8\.\d+\.\d+: "
                                                          r"parse_model has no local variable\(s\) \['i', 'f', 'ch'\]"
                                                          r".*supports ultralytics ?>=8\.3\.0,<8\.5"):
        check_internals(fake)
    from ultralytics.nn import tasks

    check_internals(tasks)  # the installed release passes


def test_unsupported_ultralytics_release_is_refused():
    from yoloattn.yolo.compat import UnsupportedUltralyticsError, check_installed_version

    check_installed_version("8.3.0")
    check_installed_version("8.4.250")
    for version in ("8.2.103", "8.5.0", "9.0.1"):
        with pytest.raises(UnsupportedUltralyticsError, match=rf"supports ultralytics>=8\.3\.0,<8\.5, but ultralytics "
                                                              rf"{version} is installed"):
            check_installed_version(version)


# ---- checkpoints ------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A stock YOLOv8n checkpoint, a yoloattn one, and one whose pickle would create a file."""
    from yoloattn import YOLO

    folder = tmp_path_factory.mktemp("checkpoints")
    YOLO("yolov8n.yaml").save(folder / "stock.pt")
    YOLO("yolov8n-bra.yaml").save(folder / "bra.pt")
    marker = folder / "PWNED"
    torch.save({"model": _Payload(marker), "date": "today"}, folder / "evil.pt")
    return folder, marker


def test_safe_loading_keeps_stock_and_yoloattn_checkpoints(checkpoints):
    from yoloattn import YOLO
    from yoloattn.yolo.checkpoints import load_checkpoint

    folder, _ = checkpoints
    for name in ("stock.pt", "bra.pt"):
        ckpt = load_checkpoint(folder / name)
        assert isinstance(ckpt["model"], torch.nn.Module)
        YOLO(folder / name)


@pytest.mark.parametrize("entry", ["YOLO", "load", "transfer_weights", "train_pretrained", "checkpoint"])
def test_malicious_checkpoint_runs_nothing_and_says_what_to_do(checkpoints, entry):
    from yoloattn import YOLO, transfer_weights
    from yoloattn.yolo.checkpoints import UnsafeCheckpointError, load_checkpoint

    folder, marker = checkpoints
    evil = folder / "evil.pt"
    calls = {
        "YOLO": lambda: YOLO(evil),
        "load": lambda: YOLO("yolov8n.yaml").load(evil),
        "transfer_weights": lambda: transfer_weights(YOLO("yolov8n.yaml").model, evil),
        "train_pretrained": lambda: YOLO("yolov8n.yaml").train(data="coco8.yaml", pretrained=str(evil), epochs=1),
        "checkpoint": lambda: load_checkpoint(evil),
    }
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil\.pt: it references \['posix\.system'\].* "
                                                    r"trusted=True.*YOLOATTN_TRUST_CHECKPOINTS=1"):
        calls[entry]()
    assert not marker.exists()


def test_trusted_opt_out_loads_legacy_files(checkpoints, monkeypatch, tmp_path):
    from yoloattn.yolo.checkpoints import load_checkpoint

    folder, _ = checkpoints
    marker = tmp_path / "RAN"
    torch.save({"model": _Payload(marker)}, tmp_path / "legacy.pt")
    load_checkpoint(tmp_path / "legacy.pt", trusted=True)
    assert marker.exists()  # the user asked for it
    marker.unlink()
    monkeypatch.setenv("YOLOATTN_TRUST_CHECKPOINTS", "1")
    load_checkpoint(tmp_path / "legacy.pt")
    assert marker.exists()


def test_missing_checkpoint_is_a_clear_error_never_a_download(tmp_path):
    names = ["missing.pt", "yolov8n.pt", "yolo26n", "https://example.com/yolov8n.pt"]
    proc = run_python(textwrap.dedent(f"""
        import yoloattn
        from yoloattn import YOLO
        from yoloattn.yolo.checkpoints import CheckpointNotFoundError
        for name in {names!r}:
            for call in (lambda: YOLO(name), lambda: YOLO("yolov8n.yaml").load(name)):
                try:
                    call()
                except CheckpointNotFoundError as e:
                    print("ERROR", e)
    """), tmp_path)
    assert proc.returncode == 0, proc.stderr
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 2 * len(names) and all("never downloads" in e for e in errors), proc.stdout
    assert network_calls(proc) == []


# ---- zero network in every command-line flow -----------------------------------------------------------------
CLI_FLOWS = textwrap.dedent("""
    import sys
    from yoloattn.yolo.cli import main
    from yoloattn.data import shapes
    data = str(shapes(n_train=8, n_val=4, imgsz=64, progress=False))
    common = ["imgsz=64", "batch=4", "workers=0", "device=cpu", "plots=False"]
    flows = [
        ["train", "model=yolov8n-bra.yaml", f"data={data}", "epochs=1", *common],
        ["val", "model=runs/detect/train/weights/best.pt", f"data={data}", *common],
        ["predict", "model=runs/detect/train/weights/best.pt", f"source={data.rsplit('/', 1)[0]}/images/val",
         "imgsz=64", "device=cpu"],
        ["export", "model=runs/detect/train/weights/best.pt", "format=onnx", "imgsz=64", "dynamic=True"],
        ["info", "model=yolov8n-dat.yaml", "imgsz=64"],
    ] + EXTRA
    for flow in flows:
        code = main(flow)
        print("FLOW", flow[0], code, flush=True)
""")
SLOW_FLOWS = """[
    ["bench", "layers=bra", "maps=P5", "batches=1", "models=", "out=runs/bench"],
    ["visualize", "model=runs/detect/train/weights/best.pt", f"source={data.rsplit('/', 1)[0]}/images/val/00000.png",
     "imgsz=64"],
    ["ablate", "models=yolov8n.yaml", "seeds=0", f"data={data}", "epochs=1", "imgsz=64", "batch=4", "workers=0"],
]"""


@pytest.mark.parametrize("extra", ["[]", pytest.param(SLOW_FLOWS, marks=pytest.mark.slow)], ids=["core", "tools"])
def test_cli_flows_make_no_network_call(tmp_path, extra):
    proc = run_python(CLI_FLOWS.replace("+ EXTRA", f"+ {extra}"), tmp_path, env_extra={"YOLOATTN_CACHE": str(tmp_path)})
    flows = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("FLOW ")]
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert all(code == "0" for _, code in flows) and len(flows) == 5 + (3 if extra != "[]" else 0), flows
    assert network_calls(proc) == []


# ---- the built-in dataset's cache heals itself ---------------------------------------------------------------
def _tiny(root):
    from yoloattn.data import shapes

    return shapes(n_train=6, n_val=3, imgsz=64, root=root, progress=False)


def test_dataset_cache_heals(tmp_path):
    from yoloattn._cache import check_manifest

    data = _tiny(tmp_path)
    folder = data.parent
    good = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert oct(folder.stat().st_mode & 0o777) == "0o755" and oct(data.stat().st_mode & 0o777) == "0o644"
    image = folder / "images" / "train" / "00002.png"
    for damage in (lambda: image.unlink(), lambda: image.write_bytes(good[image][:50]), lambda: data.unlink(),
                   lambda: (folder / "manifest.json").write_text("{broken")):
        damage()
        assert check_manifest(folder) is not None
        assert _tiny(tmp_path) == data
        assert check_manifest(folder) is None
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == good  # regenerated identically


def test_dataset_generation_killed_midway_recovers(tmp_path):
    code = textwrap.dedent(f"""
        import yoloattn.data.scenes as s
        original = s._scene
        def slow(*args):
            import time; time.sleep(0.2)
            return original(*args)
        s._scene = slow
        s.shapes(n_train=200, n_val=3, imgsz=64, root={str(tmp_path)!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while not list(tmp_path.glob(".shapes-*.tmp/images")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".shapes-*.tmp"))  # the killed run left its temporary directory
    data = _tiny(tmp_path)  # another configuration: it still cleans up the dead run's leftovers
    assert data.exists() and not list(tmp_path.glob(".shapes-*.tmp"))


def test_dataset_concurrent_first_uses(tmp_path):
    code = f"from yoloattn.data import shapes; print(shapes(n_train=20, n_val=4, imgsz=64, root={str(tmp_path)!r}, " \
           f"progress=False))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1
    from yoloattn._cache import check_manifest

    assert check_manifest(Path(outs[0]).parent) is None
    assert not list(tmp_path.glob(".shapes-*.tmp"))


# ---- bad inputs: a ValueError/TypeError naming the value -----------------------------------------------------
def _bra(**kw):
    from yoloattn.nn import BiLevelRoutingAttention

    return BiLevelRoutingAttention(32, num_heads=4, **kw)


def _dat(**kw):
    from yoloattn.nn import DAttention

    return DAttention(64, **kw)


@pytest.mark.parametrize("build,error,match", [
    (lambda: _bra(backend="gpu"), ValueError, r"backend for routed_attention must be None or one of"),
    (lambda: _dat(ksize=0), ValueError, r"ksize must be a positive integer, got 0"),
    (lambda: _dat(n_groups=0), ValueError, r"n_groups must be a positive integer, got 0"),
    (lambda: _dat(n_heads=0), ValueError, r"n_heads must be a positive integer, got 0"),
    (lambda: _dat(offset_range_factor="x"), TypeError, r"offset_range_factor must be a number, got 'x'"),
    (lambda: _dat(attn_drop=1.5), ValueError, r"attn_drop must be in \[0.0, 1.0\), got 1.5"),
    (lambda: _dat(backend="fast"), ValueError, r"backend for deformable_attention must be None or one of "
                                               r"\('auto', 'fused', 'reference'\), got 'fast'"),
    (lambda: _dat(residual=1), TypeError, r"residual must be True or False, got 1"),
    (lambda: _dat(pe="rope"), ValueError, r"pe must be one of \('table', 'dwc', 'log_cpb', 'none'\), got 'rope'"),
])
def test_bad_configuration_raises_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("layer", ["bra", "dat"])
@pytest.mark.parametrize("x,error,match", [
    (torch.ones(1, 32, 8, 8, dtype=torch.int64), TypeError, r"expects a floating-point input, got torch.int64"),
    (torch.randn(1, 32, 8, 8, dtype=torch.float64), TypeError,
     r"has torch.float32 weights but got a torch.float64 input"),
    (torch.randn(1, 32, 0, 8), ValueError, r"needs N, H and W >= 1, got an input \(N, C, H, W\) of shape \(1, 32, 0, 8\)"),
    (torch.randn(1, 32, 8, 0), ValueError, r"needs N, H and W >= 1"),
    (torch.randn(0, 32, 8, 8), ValueError, r"needs N, H and W >= 1"),
    (torch.randn(1, 31, 8, 8), ValueError, r"expects a \(N, 32, H, W\) tensor, got shape \(1, 31, 8, 8\)"),
    (torch.randn(32, 8, 8), ValueError, r"expects a \(N, 32, H, W\) tensor"),
    ("an image", TypeError, r"expects a tensor, got str"),
])
def test_bad_input_raises_before_any_kernel(layer, x, error, match):
    from yoloattn.nn import DAttention

    module = _bra() if layer == "bra" else DAttention(32)
    with pytest.raises(error, match=match):
        module(x)
