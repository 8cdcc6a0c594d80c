"""The yoloattn command end to end, in subprocesses: train -> reload -> val -> predict -> export, resume, DDP state."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from yoloattn.data import shapes

IMGSZ = 64


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def env(workdir):
    return dict(os.environ, YOLOATTN_CACHE=str(workdir / "cache"), PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def tiny_data(workdir):
    return shapes(n_train=8, n_val=4, imgsz=IMGSZ, root=workdir / "data", progress=False)


def _run(args, env, cwd, check=True):
    # a user's run: with PYTEST_CURRENT_TEST set, Ultralytics writes runs/ into its own package folder instead of cwd
    env = {key: value for key, value in env.items() if key != "PYTEST_CURRENT_TEST"}
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _cli(*args, env, cwd, check=True):
    return _run([sys.executable, "-m", "yoloattn.yolo.cli", *args], env, cwd, check)


def _python(code, env, cwd, check=True):
    return _run([sys.executable, "-c", textwrap.dedent(code)], env, cwd, check)


@pytest.fixture(scope="module")
def trained(workdir, env, tiny_data):
    _cli("train", "model=yolov8n-bra.yaml", f"data={tiny_data}", "epochs=1", f"imgsz={IMGSZ}", "batch=4", "workers=0",
         f"project={workdir}", "name=run", "exist_ok=True", "plots=False", env=env, cwd=workdir)
    best = workdir / "run" / "weights" / "best.pt"
    assert best.exists() and (workdir / "run" / "weights" / "last.pt").exists()
    return best


def test_reload_with_plain_ultralytics_in_fresh_process(trained, workdir, env):
    # no `import yoloattn`: unpickling the checkpoint imports it
    out = _python(f"""
        import torch
        from ultralytics import YOLO
        model = YOLO({str(trained)!r})
        names = [type(m).__module__ + "." + type(m).__name__ for m in model.model.modules()]
        assert "yoloattn.yolo.layers.BiLevelRoutingAttention" in names, names
        print(model.model(torch.zeros(1, 3, 64, 64))[0].shape)
    """, env, workdir)
    assert "torch.Size" in out.stdout


def test_reload_under_safe_load(trained, workdir, env):
    out = _python(f"""
        import yoloattn
        from ultralytics import YOLO
        model = YOLO({str(trained)!r})
        print(sum(type(m).__name__ == "BiLevelRoutingAttention" for m in model.model.modules()))
    """, dict(env, ULTRALYTICS_SAFE_LOAD="1"), workdir)
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_val_predict_through_cli(trained, workdir, env, tiny_data):
    val = _cli("val", f"model={trained}", f"data={tiny_data}", f"imgsz={IMGSZ}", "batch=4", "plots=False",
               f"project={workdir}", "name=val", "exist_ok=True", env=env, cwd=workdir)
    assert "all" in val.stdout + val.stderr
    image = next((Path(tiny_data).parent / "images" / "val").glob("*.png"))
    _cli("predict", f"model={trained}", f"source={image}", f"imgsz={IMGSZ}", "save=True", f"project={workdir}",
         "name=pred", "exist_ok=True", env=env, cwd=workdir)
    assert (workdir / "pred" / image.name).exists() or any((workdir / "pred").glob(image.stem + ".*"))


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
def test_onnx_export_matches_pytorch(trained, workdir, env, dynamic):
    ort = pytest.importorskip("onnxruntime")
    _cli("export", f"model={trained}", "format=onnx", f"imgsz={IMGSZ}", f"dynamic={dynamic}", "simplify=False",
         env=env, cwd=workdir)
    onnx_path = trained.with_suffix(".onnx")
    assert onnx_path.exists()
    from ultralytics import YOLO

    model = YOLO(str(trained)).model.float().eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    sizes = [(IMGSZ, IMGSZ)] + ([(96, 64), (128, 160)] if dynamic else [])
    for h, w in sizes:
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            expected = model(x)[0].numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-3)


def test_torchscript_export(trained, workdir, env):
    _cli("export", f"model={trained}", "format=torchscript", f"imgsz={IMGSZ}", env=env, cwd=workdir)
    scripted = torch.jit.load(str(trained.with_suffix(".torchscript")))
    from ultralytics import YOLO

    model = YOLO(str(trained)).model.float().eval()
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x)[0] if isinstance(scripted(x), tuple) else scripted(x),
                                   model(x)[0], atol=2e-3, rtol=1e-3)


def test_resume(workdir, env, tiny_data):
    # the process dies after epoch 1 of 2 (last.pt saved), then `yoloattn train resume=last.pt` finishes the run
    crashed = _python(f"""
        import os
        from yoloattn import YOLO
        model = YOLO("yolov8n-bra.yaml")
        model.add_callback("on_fit_epoch_end", lambda trainer: os._exit(3))  # after last.pt is saved
        model.train(data={str(tiny_data)!r}, epochs=2, imgsz={IMGSZ}, batch=4, workers=0, project={str(workdir)!r},
                    name="resume", exist_ok=True, plots=False)
    """, env, workdir, check=False)
    assert crashed.returncode == 3
    last = workdir / "resume" / "weights" / "last.pt"
    assert torch.load(last, weights_only=False)["epoch"] == 0
    out = _cli("train", f"resume={last}", env=env, cwd=workdir)
    log = out.stdout + out.stderr
    assert "from epoch 2 to 2 total epochs" in log and "1 epochs completed" in log
    assert torch.load(last, weights_only=False)["epoch"] == -1  # finished (optimizer stripped)


def test_pretrained_transfer_through_cli(workdir, env, tiny_data):
    # a yolov8n checkpoint trained here, then yolov8n-bra trained from it: every tensor must transfer
    _cli("train", "model=yolov8n.yaml", f"data={tiny_data}", "epochs=1", f"imgsz={IMGSZ}", "batch=4", "workers=0",
         f"project={workdir}", "name=base", "exist_ok=True", "plots=False", env=env, cwd=workdir)
    base = workdir / "base" / "weights" / "last.pt"
    from ultralytics import YOLO as Plain

    n_src = len(Plain(str(base)).model.state_dict())
    out = _cli("train", "model=yolov8n-bra.yaml", f"data={tiny_data}", f"pretrained={base}", "epochs=1", f"imgsz={IMGSZ}",
               "batch=4", "workers=0", f"project={workdir}", "name=transfer", "exist_ok=True", "plots=False",
               env=env, cwd=workdir)
    assert f"({n_src} of the {n_src} pretrained tensors)" in out.stdout + out.stderr


def test_ddp_worker_finds_layers(workdir, env, tiny_data):
    # Ultralytics' multi-GPU launcher starts fresh worker processes from a generated script: since 8.4.x
    # it cloudpickles the model next to it, before that the script imported the trainer class and rebuilt
    # the model from the YAML. Either way a fresh worker must end up with the yoloattn layers.
    out = _python(f"""
        from yoloattn import YOLO
        from ultralytics.utils.dist import generate_ddp_file
        model = YOLO("yolov8n-bra.yaml")
        trainer = model._smart_load("trainer")(overrides=dict(model=model.overrides["model"], data={str(tiny_data)!r},
                                                               imgsz={IMGSZ}, epochs=1, project={str(workdir)!r},
                                                               name="ddp", exist_ok=True))
        trainer.model = trainer.get_model(cfg=trainer.args.model, verbose=False)
        print(generate_ddp_file(trainer))
    """, env, workdir)
    script = Path(out.stdout.strip().splitlines()[-1])
    state_file = script.with_suffix(".pt")
    text = script.read_text()
    if state_file.exists():  # cloudpickled model: what the worker script does first is load it
        check = f"""
            import sys, torch
            from ultralytics.utils.patches import torch_load
            model = torch_load({str(state_file)!r}, map_location="cpu")["model"].eval()
            assert "yoloattn" in sys.modules
            print(sum(type(m).__name__ == "BiLevelRoutingAttention" for m in model.modules()))
        """
    else:  # the worker imports the trainer class named in the script and builds the model from the YAML
        check = text.replace("results = trainer.train()", "trainer.setup_model(); print(sum("
                             "type(m).__name__ == 'BiLevelRoutingAttention' for m in trainer.model.modules()))")
        check = "__name__ = '__main__'\n" + check
    worker = _python(check, env, workdir)
    assert worker.stdout.strip().splitlines()[-1] == "1"
    script.unlink(missing_ok=True)
    state_file.unlink(missing_ok=True)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_same_behaviour_as_yolo(workdir, env, tiny_data):
    """The same commands through `yolo` and `yoloattn`, each in its own folder: the same files, the same exit codes."""
    import shutil

    yolo = shutil.which("yolo") or str(Path(sys.executable).with_name("yolo"))
    image = next((Path(tiny_data).parent / "images" / "val").glob("*.png"))
    commands = [
        ["train", "model=yolov8n.yaml", f"data={tiny_data}", "epochs=1", f"imgsz={IMGSZ}", "batch=4", "workers=0",
         "plots=False", "seed=0", "deterministic=True"],
        ["val", "model=runs/detect/train/weights/best.pt", f"data={tiny_data}", f"imgsz={IMGSZ}", "plots=False"],
        ["predict", "model=runs/detect/train/weights/best.pt", f"source={image}", f"imgsz={IMGSZ}"],
        ["export", "model=runs/detect/train/weights/best.pt", "format=onnx", f"imgsz={IMGSZ}"],
        ["predict", "model=runs/detect/train/weights/missing.pt", f"source={image}"],
        ["train", "model=yolov8n.yaml", f"data={tiny_data}", "epochz=3"],
    ]
    offline = dict(env, YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(workdir / "ul-config"))
    results = {}
    for program in ("yoloattn", "yolo"):
        folder = workdir / f"as-{program}"
        folder.mkdir(exist_ok=True)
        codes = []
        for args in commands:
            cmd = [sys.executable, "-m", "yoloattn.yolo.cli", *args] if program == "yoloattn" else [yolo, *args]
            codes.append(_run(cmd, offline, folder, check=False).returncode)
        results[program] = (codes, _files(folder))
    (codes_a, files_a), (codes_y, files_y) = results["yoloattn"], results["yolo"]
    assert [c == 0 for c in codes_a] == [c == 0 for c in codes_y] == [True, True, True, True, False, False]
    assert files_a == files_y
    assert f"runs/detect/predict/{image.stem}.jpg" in files_a  # predictions are saved, as yolo saves them


def test_help_and_version(workdir, env):
    for flag in ("help", "--help", "-h"):
        out = _cli(flag, env=env, cwd=workdir).stdout
        for command in ("ablate", "bench", "visualize", "info", "insert", "version"):
            assert f"yoloattn {command}" in out
        assert "`yolo help`" in out  # Ultralytics' modes are pointed to, not repeated with `yolo` examples
    out = _cli("version", env=dict(env, YOLOATTN_AUTOTUNE="0"), cwd=workdir).stdout
    import yoloattn

    assert out.startswith(f"yoloattn {yoloattn.__version__}") and "torch " in out and "ultralytics " in out
    assert "BRA CPU kernel:" in out and "at YOLOv8n's P3" in out


MISTAKES = [
    (["train", "model=yolov8q-bra.yaml", "data=shapes"], "yolov8q-bra.yaml"),
    (["train", "model=yolov8n-bra.yaml", "data=does/not/exist.yaml"], "does/not/exist.yaml"),
    (["train", "model=yolov8n-bra.yaml", "data=shapes", "epochz=3"], "'epochz' is not a valid YOLO argument"),
    (["val", "model=missing.pt", "data=shapes"], "never downloads"),
    (["predict", "model=missing.pt", "source=nothing.jpg"], "never downloads"),
    (["train", "model={bad_row}", "data=shapes"], "YAML row 16 names an unknown layer 'BiLevelRoutingAttentionn'"),
    (["train", "model={bad_kw}", "data=shapes"], "unknown keyword argument(s) ['topkk']"),
    (["train", "model={evil}", "data=shapes"], "refused to load"),
    (["visualize", "model=yolov8n.yaml", "imgsz=320"], "has no BiLevelRoutingAttention or DAttention layer"),
    (["visualize", "model=yolov8n-bra.yaml", "point=5"], "point must be 'x,y'"),
    (["visualize", "model=yolov8n-bra.yaml", "point=5000,10"], "is outside the 810x1080 image"),
    (["visualize", "model=yolov8n-bra.yaml", "out=somewhere"], "yoloattn visualize does not take out"),
    (["visualize", "model=yolov8n-bra.yaml", "imgsz=100"], "must be a multiple of the model's stride 32"),
    (["bench", "layers=nope", "models="], "unknown layer 'nope'"),
    (["ablate", "seeds=x"], "seeds must be comma-separated integers"),
    (["ablate", "split=train"], "split must be 'val' or 'test'"),
    (["ablate", "models=yolov8n.yaml,yolov8n.yaml"], "distinct models"),
    (["info", "model=yolov8n-bra.yaml", "size=3"], "yoloattn info does not take size"),
    (["insert", "model=yolov8n.yaml", "layer=Nope"], "is not a layer a YAML row can name"),
    (["insert", "model=yolov8n-cls.yaml", "layer=EMA", "at=p3"], "has no detection-style head"),
    (["train", "model=yolov8n-bra.yaml", "data=shapes", "trusted=maybe"], "trusted must be True or False"),
]


@pytest.fixture(scope="module")
def mistake_files(workdir):
    base = Path(__file__).parent.parent / "src" / "yoloattn" / "yolo" / "cfg" / "yolov8-bra.yaml"
    text = base.read_text()
    bad_row = workdir / "bad_row.yaml"
    bad_row.write_text(text.replace("BiLevelRoutingAttention, []", "BiLevelRoutingAttentionn, []"))
    bad_kw = workdir / "bad_kw.yaml"
    bad_kw.write_text(text.replace("BiLevelRoutingAttention, []", "BiLevelRoutingAttention, [{topkk: 3}]"))
    evil = workdir / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {workdir / 'PWNED'}",))

    torch.save({"model": Payload()}, evil)
    return {"bad_row": bad_row, "bad_kw": bad_kw, "evil": evil}


def test_user_mistakes_print_one_line(workdir, env, mistake_files):
    """Each mistake through the command's entry point (one interpreter for all, as each call is independent):
    status 2, one `yoloattn: error:` line that says what is wrong, no traceback."""
    calls = [[a.format(**mistake_files) for a in args] for args, _ in MISTAKES]
    out = _python(f"""
        import contextlib, io, json
        from yoloattn.yolo.cli import main
        for args in {calls!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(args)
            print("CALL " + json.dumps([code, err.getvalue()]))
    """, env, workdir)
    results = [json.loads(line[5:]) for line in out.stdout.splitlines() if line.startswith("CALL ")]
    assert len(results) == len(MISTAKES)
    for (args, match), (code, err) in zip(MISTAKES, results):
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and lines and lines[-1].startswith("yoloattn: error: ") and match in lines[-1], (args, err)
        assert "Traceback" not in err, (args, err)
    assert not (workdir / "PWNED").exists()


def test_a_mistake_exits_2_from_the_shell(workdir, env):
    out = _cli("ablate", "seeds=x", env=env, cwd=workdir, check=False)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "yoloattn: error: seeds must be comma-separated integers, got 'x'"]


def test_real_crash_keeps_its_traceback(workdir, env):
    # a layer that crashes inside PyTorch (not a user's mistake): the traceback is shown
    out = _python("""
        import sys, torch
        from yoloattn.yolo import cli
        def boom(options):
            torch.zeros(2) @ torch.zeros(3)  # a RuntimeError from inside PyTorch
        cli._info = boom
        sys.exit(cli.main(["info"]))
    """, env, workdir, check=False)
    assert out.returncode != 0 and "Traceback" in out.stderr and "RuntimeError" in out.stderr
    debug = _cli("ablate", "seeds=x", env=dict(env, YOLOATTN_DEBUG="1"), cwd=workdir, check=False)
    assert "Traceback" in debug.stderr and "seeds must be comma-separated integers" in debug.stderr


def test_users_training_scripts_with_only_import_and_paths_changed(trained, workdir, env, tiny_data):
    # the YOLOv10 + BRA and YOLOv8 + BRA training scripts users copy (YOLOv10(yaml).train(...); YOLO(yaml), train, YOLO(best, task), plot)
    out = _python(f"""
        from yoloattn import YOLO, YOLOv10
        import warnings
        warnings.filterwarnings('ignore')
        model = YOLOv10("yolov10n-bra.yaml")
        model.train(data={str(tiny_data)!r}, imgsz={IMGSZ}, epochs=1, batch=4, workers=0, optimizer='SGD', amp=False,
                    project={str(workdir)!r}, name='seed000', exist_ok=True, plots=False)
        model = YOLO({str(trained)!r}, task='detect')
        results = model({str(next((Path(tiny_data).parent / 'images' / 'val').glob('*.png')))!r})
        res = results[0].plot()
        print(res.shape)
    """, env, workdir)
    assert out.stdout.strip().splitlines()[-1] == f"({IMGSZ}, {IMGSZ}, 3)"
