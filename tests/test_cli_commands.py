"""`qlora quantize`, `qlora demo` and `qlora bench`: help, exit codes, and what they write.

The console script runs in subprocesses (as a user runs it) for --help, the quantize round trip and a tiny demo
(one transformer layer, two steps); the remaining failure paths call ``cli.main`` in-process, which is the same
code without the interpreter start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qlora  # noqa: F401  (interpreter switch before the kernels)
from qlora import cli, demo, minilm
from qlora.nf4 import NF4Weight, quantize_nf4

SCRIPT = Path(sys.executable).parent / "qlora"
NF4_SUFFIXES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                ".quant_state.bitsandbytes__nf4")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert SCRIPT.exists(), f"the `qlora` console script is missing next to {sys.executable}: pip install -e ."
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("command,expected", [
    ("verify", "--only"),
    ("demo", "--steps"),
    ("quantize", "--no-double-quant"),
    ("bench", "--static-only"),
])
def test_every_command_has_help(command, expected):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"usage: qlora {command}" in proc.stdout and expected in proc.stdout


# -- quantize -------------------------------------------------------------------------------------------------

def _checkpoint() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.attn.q_proj.weight": torch.randn(64, 128, generator=g),
        "layers.0.attn.q_proj.bias": torch.randn(64, generator=g),
        "layers.0.mlp.up.weight": torch.randn(96, 64, generator=g).to(torch.bfloat16),
        "layers.0.input_layernorm.weight": torch.rand(128, generator=g),
        "embed_tokens.weight": torch.randn(50, 128, generator=g),
        "transformer.ln_f.weight": torch.randn(4, 4, generator=g),  # 2-D, but a norm by name
        "lm_head.weight": torch.randn(50, 128, generator=g),
        "position_ids": torch.arange(16)[None],
        "layers.0.scale.weight": torch.randn(3, 4, 5, generator=g),  # 3-D: not a linear weight
    }


QUANTIZED = ["layers.0.attn.q_proj.weight", "layers.0.mlp.up.weight"]


def _assert_round_trip(out: Path, src: dict[str, torch.Tensor], quantized: list[str], blocksize: int = 64,
                       double_quant: bool = True) -> None:
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    got = load_file(str(out))
    want_keys = {k for k in src if k not in quantized} | {
        k + s for k in quantized for s in NF4_SUFFIXES if double_quant or "nested" not in s}
    assert set(got) == want_keys
    for key in quantized:
        direct = quantize_nf4(src[key], blocksize=blocksize, double_quant=double_quant)
        read = NF4Weight.from_bnb_state_dict(got, key)
        assert read.shape == src[key].shape and read.dtype == src[key].dtype and read.blocksize == blocksize
        assert torch.equal(read.packed, direct.packed) and torch.equal(read.absmax, direct.absmax)
        assert read.offset == direct.offset and read.double_quant == double_quant
        assert torch.equal(read.dequantize(), direct.dequantize())
    for key in set(src) - set(quantized):  # copied bit for bit
        assert got[key].dtype == src[key].dtype and torch.equal(got[key], src[key]), key


def test_quantize_round_trip_in_a_subprocess(tmp_path):
    src = _checkpoint()
    save_file(src, str(tmp_path / "model.safetensors"))
    proc = run_cli("quantize", str(tmp_path / "model.safetensors"), str(tmp_path / "out" / "nf4.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert "quantized 2 weights to NF4" in proc.stdout and "copied 7 other tensors" in proc.stdout
    assert "bits per parameter" in proc.stdout and "->" in proc.stdout
    _assert_round_trip(tmp_path / "out" / "nf4.safetensors", src, QUANTIZED)


def test_quantize_options_and_sharded_input(tmp_path, capsys):
    src = _checkpoint()
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = sorted(src)
    save_file({k: src[k] for k in keys[:4]}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({k: src[k] for k in keys[4:]}, str(shards / "model-00002-of-00002.safetensors"))
    out = tmp_path / "a.safetensors"
    assert cli.main(["quantize", str(shards), str(out), "--blocksize", "128", "--no-double-quant"]) == 0
    _assert_round_trip(out, src, QUANTIZED, blocksize=128, double_quant=False)
    # --target restricts to matching module names, and overrides the name-based exclusions.
    assert cli.main(["quantize", str(shards), str(out), "--target", "q_proj", "lm_head"]) == 0
    _assert_round_trip(out, src, ["layers.0.attn.q_proj.weight", "lm_head.weight"])
    assert "quantized 2 weights" in capsys.readouterr().out


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("empty_dir", "without *.safetensors"),
    ("not_safetensors", "not a readable safetensors file"),
    ("nothing", "nothing to quantize"),
    ("no_target_match", "--target nope"),
    ("out_is_dir", "is a directory"),
    ("out_parent_is_file", "OUT"),
    ("duplicate_key", "is in both"),
])
def test_quantize_failures_exit_2_and_name_the_problem(tmp_path, capsys, case, message):
    good = tmp_path / "good.safetensors"
    save_file(_checkpoint(), str(good))
    src, out, extra = good, tmp_path / "out.safetensors", []
    if case == "missing":
        src = tmp_path / "nope.safetensors"
    elif case == "empty_dir":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "not_safetensors":
        src = tmp_path / "junk.safetensors"
        src.write_bytes(b"not a checkpoint")
    elif case == "nothing":
        src = tmp_path / "norms.safetensors"
        save_file({"norm.weight": torch.ones(4), "embed.weight": torch.ones(4, 4)}, str(src))
    elif case == "no_target_match":
        extra = ["--target", "nope"]
    elif case == "out_is_dir":
        out = tmp_path
    elif case == "out_parent_is_file":
        out = good / "out.safetensors"
    elif case == "duplicate_key":
        src = tmp_path / "dup"
        src.mkdir()
        save_file({"a.weight": torch.ones(4, 4)}, str(src / "1.safetensors"))
        save_file({"a.weight": torch.ones(4, 4)}, str(src / "2.safetensors"))
    assert cli.main(["quantize", str(src), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora quantize: error:") and message in err, err
    if case != "out_is_dir":
        assert not out.exists() or out.is_dir()


def test_quantize_write_failure_exits_2_and_keeps_the_old_out(tmp_path):
    """A write that fails inside safetensors (SafetensorError, here a file size limit as under `ulimit -f 16`): exit
    2 with a message, the old OUT untouched, no temporary file left."""
    import resource

    save_file(_checkpoint(), str(tmp_path / "model.safetensors"))  # its NF4 output is over 16 KiB (a 25 KiB embed)
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "nf4.safetensors"
    out.write_bytes(b"the previous OUT")

    def limit_file_size():  # in the child, before exec: what `ulimit -f 16` sets
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    proc = subprocess.run([str(SCRIPT), "quantize", str(tmp_path / "model.safetensors"), str(out)],
                          capture_output=True, text=True, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"qlora quantize: error: OUT {str(out)!r}: writing failed"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == b"the previous OUT"
    assert sorted(p.name for p in folder.iterdir()) == ["nf4.safetensors"]


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dangling symlink"])
def test_quantize_refuses_an_out_that_is_not_a_regular_file(tmp_path, capsys, kind):
    import os

    save_file(_checkpoint(), str(tmp_path / "model.safetensors"))
    target = tmp_path / "target.safetensors"
    out = tmp_path / "out.safetensors"
    if kind == "symlink":
        target.write_bytes(b"kept")
        out.symlink_to(target)
    elif kind == "dangling symlink":
        out.symlink_to(tmp_path / "nowhere.safetensors")
    else:
        os.mkfifo(out)
    assert cli.main(["quantize", str(tmp_path / "model.safetensors"), str(out)]) == 2
    err = capsys.readouterr().err
    expected = "is a symbolic link" if "symlink" in kind else "is not a regular file"
    assert err.startswith(f"qlora quantize: error: OUT {str(out)!r}") and expected in err, err
    if "symlink" in kind:
        assert out.is_symlink()
        assert kind != "symlink" or target.read_bytes() == b"kept"
    else:
        assert out.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.safetensors", "out.safetensors"] + (["target.safetensors"] if kind == "symlink" else []))


def test_quantize_leaves_an_existing_out_dot_tmp_alone(tmp_path):
    save_file(_checkpoint(), str(tmp_path / "model.safetensors"))
    out = tmp_path / "nf4.safetensors"
    bystander = tmp_path / "nf4.safetensors.tmp"  # the name the temporary file used to have
    bystander.write_bytes(b"someone else's file")
    assert cli.main(["quantize", str(tmp_path / "model.safetensors"), str(out)]) == 0
    assert bystander.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "nf4.safetensors",
                                                          "nf4.safetensors.tmp"]
    _assert_round_trip(out, _checkpoint(), QUANTIZED)


@pytest.mark.parametrize("argv, option", [
    (["--lr", "1e39"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--head-lr", "2"], "--head-lr"),
    (["--alpha", "1e39"], "--alpha"),
    (["--alpha", "0"], "--alpha"),
    (["--rank", "100000"], "--rank"),
    (["--batch-size", "121"], "--batch-size"),
    (["--steps", "10000000000"], "--steps"),
    (["--log-every", "0"], "--log-every"),
    (["--seed", "-1"], "--seed"),
    (["--max-length", "513"], "--max-length"),
])
def test_demo_numeric_options_are_range_checked_at_parse_time(capsys, argv, option):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "expected" in err, err


@pytest.mark.parametrize("field, value", [("lr", 1e39), ("alpha", float("nan")), ("rank", 0), ("batch_size", 500),
                                          ("steps", True), ("log_every", 0)])
def test_demo_run_checks_its_config_as_the_parser_does(tmp_path, field, value):
    cfg = demo.DemoConfig(out=str(tmp_path / "out"), **{field: value})
    with pytest.raises(demo.DemoError, match=f"^{demo.option_name(field)} must be"):
        demo.run(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_arguments_are_usage_errors(capsys):
    for argv in (["quantize", "in.safetensors"],  # OUT missing
                 ["quantize", "a", "b", "--blocksize", "48"],
                 ["demo", "--steps", "0"],
                 ["demo", "--layers", "7"],
                 ["demo", "--lr", "nan"],
                 ["demo", "--device", "tpu"],
                 ["bench", "--bogus"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv
    err = capsys.readouterr().err
    assert "--blocksize" in err and "--steps" in err and "--layers" in err and "--device" in err


# -- demo -----------------------------------------------------------------------------------------------------

def test_tiny_demo_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--layers", "1", "--steps", "2", "--max-length", "6", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for expected in ("QLoRA loss", "LoRA loss", "estimated time", "time per training step", "accuracy",
                     "time per layer forward + backward (encoder.layer.0.intermediate.dense: 48 x 384 -> 1536, r=8)",
                     "trainable params:", "PagedAdamW8bit", "reload check", "identical"):
        assert expected in text, expected
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 6  # lora_A and lora_B of the 6 linear layers of one transformer layer
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]["qlora"]) == len(metrics["losses"]["dense"]) == 2
    assert metrics["reload_identical"] is True
    assert metrics["seconds"]["step_ratio_qlora_over_lora"] > 0
    layer = metrics["seconds"]["layer"]
    assert layer["name"] == "encoder.layer.0.intermediate.dense" and layer["rows"] == 8 * 6
    assert layer["qlora"] > 0 and layer["dense"] > 0
    assert layer["ratio_qlora_over_lora"] == pytest.approx(layer["qlora"] / layer["dense"])


def test_layer_times_times_both_layers_without_touching_their_gradients():
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 96)
    qlayer = qlora.QLoRALinear.from_linear(dense, r=4, lora_alpha=8)
    dlayer = demo.DenseLoRALinear(torch.nn.Linear(64, 96), 4, 8)
    calls = []
    real_forward = demo.DenseLoRALinear.forward

    def counted(self, x):
        calls.append(x.shape)
        return real_forward(self, x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo.DenseLoRALinear, "forward", counted)
        tq, td = demo.layer_times(qlayer, dlayer, rows=5, rounds=2)
    assert tq > 0 and td > 0
    # One warm-up and two rounds before the QLoRA layer's rounds, two after; every call on the 5 rows.
    assert calls == [torch.Size([5, 64])] * 5
    for layer in (qlayer, dlayer):
        assert layer.lora_A.grad is None and layer.lora_B.grad is None
    for bad in (dict(rows=0), dict(rows=3, rounds=0)):
        with pytest.raises(ValueError, match="rows and rounds must be >= 1"):
            demo.layer_times(qlayer, dlayer, **bad)


def test_reload_check_sees_a_wrong_adapter_and_the_demo_then_exits_1(tmp_path, monkeypatch, capsys):
    # The pieces of the check on a one-layer model: a faithful reload is identical, a corrupted one is not.
    torch.manual_seed(0)
    model = demo.Classifier(minilm.load_minilm(1), 4)
    qlora.prepare_model(model.encoder, r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # as if trained: lora_B no longer zero
    model.eval()
    adapter_dir, head_path = demo.save_trained(model, tmp_path)
    ids, mask = minilm.load_tokenizer().encode_batch(["It will snow tonight.", "Reboot the server."], 8)
    with torch.no_grad():
        want = model(ids, mask)
        fresh = demo.load_trained(adapter_dir, head_path, 1, 4, 8, torch.float32, torch.device("cpu"), seed=1)
        assert torch.equal(fresh(ids, mask), want)
        real = demo.load_adapter

        def corrupted(encoder, directory):
            real(encoder, directory)
            next(m for m in encoder.modules() if isinstance(m, qlora.QLoRALinear)).lora_B.add_(1e-3)
            return encoder

        monkeypatch.setattr(demo, "load_adapter", corrupted)
        fresh = demo.load_trained(adapter_dir, head_path, 1, 4, 8, torch.float32, torch.device("cpu"), seed=1)
        assert not torch.equal(fresh(ids, mask), want)

    # And a run whose check failed exits 1.
    monkeypatch.setattr(demo, "run", lambda cfg, log: demo.DemoResult(reload_ok=False))
    assert cli.main(["demo", "--out", str(tmp_path)]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_demo_keeps_numpy_blas_on_one_thread_under_the_interpreter(tmp_path, monkeypatch):
    # The interpreter's tl.dot is a NumPy matmul; the demo limits NumPy's BLAS threads for its run only.
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}

    seen = []
    monkeypatch.setattr(demo, "_run", lambda cfg, device, log: seen.append(blas_threads()) or
                        demo.DemoResult(reload_ok=True))
    before = blas_threads()
    assert demo.run(demo.DemoConfig(out=str(tmp_path)), log=lambda line: None).reload_ok
    assert seen == ([{1}] if qlora.kernels.interpreter_active() else [before])
    assert blas_threads() == before  # restored afterwards


def test_demo_environment_errors_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["demo", "--out", str(blocker)]) == 2
    assert "--out" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
        assert "--device cuda" in capsys.readouterr().err


# -- bench ----------------------------------------------------------------------------------------------------

def _fake_perf(root: Path, fail_on: str | None) -> Path:
    """A stand-in perf package that logs its subcommand and fails on ``fail_on``."""
    (root / "perf").mkdir(parents=True)
    (root / "perf" / "__init__.py").write_text("")
    (root / "perf" / "__main__.py").write_text(
        "import os, sys\n"
        "with open('calls.txt', 'a') as f:\n"
        "    f.write(sys.argv[1] + ' ' + os.environ.get('TRITON_INTERPRET', '-') + '\\n')\n"
        f"sys.exit(3 if sys.argv[1] == {fail_on!r} else 0)\n")
    return root / "perf"


def test_bench_runs_static_then_check_and_propagates_the_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "perf_dir", lambda: _fake_perf(tmp_path / "ok", None))
    assert cli.main(["bench", "--static-only"]) == 0
    # From the repository root, without this process's interpreter switch.
    assert (tmp_path / "ok" / "calls.txt").read_text() == "static -\ncheck -\n"
    assert "python -m perf static" in capsys.readouterr().out

    monkeypatch.setattr(cli, "perf_dir", lambda: _fake_perf(tmp_path / "bad", "check"))
    assert cli.main(["bench", "--static-only"]) == 3
    assert "exited with status 3" in capsys.readouterr().err


def test_bench_without_the_perf_folder_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "perf_dir", lambda: tmp_path / "perf")
    assert cli.main(["bench"]) == 2
    assert "perf layer is not at" in capsys.readouterr().err


def test_perf_dir_is_next_to_the_package():
    assert (cli.perf_dir() / "__main__.py").is_file()
