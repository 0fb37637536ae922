"""``qlora demo``: QLoRA fine-tuning of a real pretrained encoder, side by side with 16-bit LoRA.

all-MiniLM-L6-v2 (:mod:`qlora.minilm`) with a 4-topic classification head (:mod:`qlora.demo_data`) is trained
twice in lockstep on the same batches: once prepared by :func:`qlora.prepare_model` (NF4, blocksize 64, double
quantization, a LoRA adapter on each of the 36 linear layers, :class:`qlora.PagedAdamW8bit`), once unquantized with
plain-torch :class:`DenseLoRALinear` adapters started from the same values (``torch.optim.AdamW``; bfloat16 on
CUDA, float32 on CPU). It prints and plots both loss curves, evaluates both, prints the QLoRA/LoRA time per step,
saves the QLoRA adapter as a PEFT adapter, reloads it into a fresh model and fails (exit 1) unless the reloaded
logits equal the trained model's bit for bit. No dropout, so the runs differ only by NF4 and the 8-bit optimizer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import demo_data, minilm
from ._runtime import interpreter_active
from .interop import load_adapter, save_adapter
from .model import _human_bytes, _linear_slots, prepare_model, qlora_layers, trainable_parameters_report
from .optim import PagedAdamW8bit

__all__ = ["DemoConfig", "DemoError", "DemoResult", "DenseLoRALinear", "Classifier", "run", "resolve_device",
           "save_trained", "load_trained", "evaluate", "layer_times"]

BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# A small page budget so that paging really streams the adapters' state (about 1.8 MB for rank 8) in the demo.
PAGE_SIZE = 64 * 1024
NUM_PAGES = 4


class DemoError(Exception):
    """A condition that stops the demo before it trains (bad device, missing weights, unwritable --out)."""


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (the CLI's options)."""

    steps: int = 20
    rank: int = 8
    alpha: float = 16.0
    lr: float = 5e-4  # LoRA adapters
    head_lr: float = 1e-2  # the classification head, trained in both runs
    batch_size: int = 8
    max_length: int = 16
    layers: int | None = None  # None: all six transformer layers
    device: str = "auto"
    out: str = "qlora-demo"
    seed: int = 0
    log_every: int | None = None  # None: about ten rows


# Ranges of the numeric settings, checked by ``qlora demo``'s parser and again by :func:`run`. Adam moves each weight
# by about lr per step, so a learning rate above 1 only diverges (from about 3e37 the optimizer's float32 step scalars
# overflow). The LoRA rank is at most the encoder's hidden size (384, the smaller side of every layer). alpha/rank
# above 1e4 swamps the pretrained layer it adapts. The batch is at most the training set (120 sentences); steps and
# log rows are capped at a day's run. Floats: (low, high]; ints: [low, high].
FLOAT_RANGES = {"lr": (0.0, 1.0), "head_lr": (0.0, 1.0), "alpha": (0.0, 1e4)}
INT_RANGES = {"steps": (1, 100_000), "rank": (1, 384), "batch_size": (1, len(demo_data.examples("train"))),
              "max_length": (3, 512), "layers": (1, 6), "seed": (0, 2**31 - 1), "log_every": (1, 100_000)}


def option_name(field: str) -> str:
    """The command-line option of a :class:`DemoConfig` field: ``head_lr`` -> ``--head-lr``."""
    return "--" + field.replace("_", "-")


def check_config(cfg: DemoConfig) -> None:
    """Every numeric setting of ``cfg`` in its range (``FLOAT_RANGES``/``INT_RANGES``); DemoError naming the option."""
    for field, (low, high) in FLOAT_RANGES.items():
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
            raise DemoError(f"{option_name(field)} must be a number in ({low:g}, {high:g}], got {value!r}")
    for field, (low, high) in INT_RANGES.items():
        value = getattr(cfg, field)
        if value is None and field in ("layers", "log_every"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise DemoError(f"{option_name(field)} must be an integer in [{low}, {high}], got {value!r}")


class DenseLoRALinear(nn.Module):
    """``y = x @ W^T + b + (lora_alpha / r) * (x @ lora_A^T) @ lora_B^T`` over a frozen dense ``nn.Linear``.

    The 16-bit LoRA of the baseline, in plain torch: ``lora_A`` (r, in_features), ``lora_B`` (out_features, r)
    in the base layer's dtype, initialized as :class:`qlora.QLoRALinear` (and PEFT) does: Kaiming-uniform A,
    zero B.
    """

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)


def add_dense_lora(model: nn.Module, r: int, lora_alpha: float) -> list[tuple[str, DenseLoRALinear]]:
    """Wrap every ``nn.Linear`` of ``model`` that :func:`qlora.prepare_model` would replace (in place; the same
    enumeration, so the baseline's layers and names are the QLoRA model's) in :class:`DenseLoRALinear` and
    freeze everything but the adapters; returns ``(qualified name, wrapper)`` in registration order."""
    slots = _linear_slots(model)
    model.requires_grad_(False)
    wrapped = []
    for parent, attr, name, linear in slots:
        layer = DenseLoRALinear(linear, r, lora_alpha)
        setattr(parent, attr, layer)
        wrapped.append((name, layer))
    return wrapped


class Classifier(nn.Module):
    """``head(mean_pool(encoder(input_ids, attention_mask)))``: int64 (B, T) ids and mask -> (B, classes) logits
    in the encoder's dtype."""

    def __init__(self, encoder: minilm.MiniLM, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        w = encoder.embeddings.LayerNorm.weight
        self.head = nn.Linear(encoder.config.hidden_size, num_classes, dtype=w.dtype, device=w.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(minilm.mean_pool(self.encoder(input_ids, attention_mask), attention_mask))


def resolve_device(name: str) -> torch.device:
    """``"auto"``, ``"cpu"`` or ``"cuda"`` -> the device the kernels can run on; :class:`DemoError` otherwise.

    The kernels run under the Triton interpreter on CPU tensors, or compiled on CUDA tensors; which one was
    decided when ``qlora`` was imported (see ``qlora/_runtime.py``), so ``cpu`` on a CUDA machine needs
    ``QLORA_INTERPRET=1`` in the environment.
    """
    if name == "auto":
        return torch.device("cpu" if interpreter_active() else "cuda")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DemoError("--device cuda: torch sees no CUDA device on this machine (use --device cpu)")
        if interpreter_active():
            raise DemoError("--device cuda: the kernels run under the Triton interpreter in this process "
                            "(QLORA_INTERPRET or TRITON_INTERPRET is set); unset it to compile for the GPU")
        return torch.device("cuda")
    if name == "cpu":
        if not interpreter_active():
            raise DemoError("--device cpu: the kernels are compiled for CUDA in this process; set "
                            "QLORA_INTERPRET=1 to run them under the Triton interpreter on the CPU")
        return torch.device("cpu")
    raise DemoError(f"--device must be auto, cpu or cuda, got {name!r}")


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` lists of indices into the training set: successive epochs of a seeded permutation, each epoch cut
    into full batches (a short remainder is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen).tolist()
        out.extend(perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return out[:steps]


def _optimizer_groups(model: Classifier, lr: float, head_lr: float) -> list[dict]:
    adapters = [p for name, p in model.encoder.named_parameters() if p.requires_grad]
    return [{"params": adapters, "lr": lr}, {"params": list(model.head.parameters()), "lr": head_lr}]


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


@torch.no_grad()
def evaluate(model: Classifier, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             batch_size: int) -> tuple[float, float, torch.Tensor]:
    """Mean cross-entropy, accuracy and the logits (N, classes) of ``model`` over ``data`` = (input_ids,
    attention_mask, labels), in batches of ``batch_size`` rows."""
    ids, mask, labels = data
    logits = torch.cat([model(ids[i:i + batch_size], mask[i:i + batch_size])
                        for i in range(0, len(labels), batch_size)])
    loss = nn.functional.cross_entropy(logits.float(), labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return loss, accuracy, logits


def _plot(path: Path, steps: list[int], qlora_losses: list[float], dense_losses: list[float],
          final: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(steps, qlora_losses, label="QLoRA (NF4 + double quant, PagedAdamW8bit)", color="tab:blue", lw=1.8)
    ax.plot(steps, dense_losses, label=f"LoRA on the {final['dense_dtype']} model (AdamW)", color="tab:orange",
            lw=1.8, ls="--")
    last = steps[-1]
    ax.scatter([last], [final["qlora"]["eval_loss"]], color="tab:blue", marker="o", zorder=3,
               label=f"QLoRA eval loss (acc {final['qlora']['eval_accuracy']:.0%})")
    ax.scatter([last], [final["dense"]["eval_loss"]], color="tab:orange", marker="s", zorder=3,
               label=f"LoRA eval loss (acc {final['dense']['eval_accuracy']:.0%})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (training batch)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def layer_times(qlayer: nn.Module, dlayer: nn.Module, rows: int, rounds: int = 7,
                seed: int = 0) -> tuple[float, float]:
    """Seconds of one forward + backward of ``y.sum()`` through ``qlayer`` (a :class:`qlora.QLoRALinear`) and
    through ``dlayer`` (its :class:`DenseLoRALinear` twin) on the same random input of ``rows`` rows (gradients of
    the input and the adapters by :func:`torch.autograd.grad`: no ``.grad`` of either model is touched). Each is
    the minimum over ``rounds`` back-to-back rounds after a warm-up, ``dlayer``'s over its rounds before and after
    ``qlayer``'s: as perf/bench_interpreter.py, because right after interpreted work the caches hold NumPy's
    temporaries and a torch layer alternated with it runs slower than alone."""
    if rows < 1 or rounds < 1:
        raise ValueError(f"rows and rounds must be >= 1, got rows={rows}, rounds={rounds}")
    w = dlayer.lora_A
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(rows, dlayer.base.in_features, generator=generator).to(dtype=w.dtype, device=w.device)
    x.requires_grad_(True)

    def once(layer: nn.Module) -> float:
        if w.device.type == "cuda":
            torch.cuda.synchronize(w.device)
        t0 = time.perf_counter()
        torch.autograd.grad(layer(x).float().sum(), [x, layer.lora_A, layer.lora_B])
        if w.device.type == "cuda":
            torch.cuda.synchronize(w.device)
        return time.perf_counter() - t0

    once(dlayer)
    times_d = [once(dlayer) for _ in range(rounds)]
    once(qlayer)
    times_q = [once(qlayer) for _ in range(rounds)]
    times_d += [once(dlayer) for _ in range(rounds)]
    return min(times_q), min(times_d)


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


@dataclass
class DemoResult:
    """What a run measured; ``reload_ok`` False means the saved adapter did not reproduce the model."""

    losses_qlora: list[float] = field(default_factory=list)
    losses_dense: list[float] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    reload_ok: bool = False
    out: str = ""


def save_trained(model: Classifier, out: Path) -> tuple[Path, Path]:
    """Write the QLoRA ``model``'s adapters as a PEFT adapter directory ``out/adapter`` and its head as
    ``out/head.safetensors``; returns both paths."""
    from safetensors.torch import save_file

    adapter_dir = out / "adapter"
    save_adapter(model.encoder, adapter_dir, base_model_name_or_path=BASE_MODEL_NAME)
    head_path = out / "head.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, str(head_path),
              metadata={"format": "pt"})
    return adapter_dir, head_path


def load_trained(adapter_dir: Path, head_path: Path, layers: int | None, rank: int, alpha: float,
                 dtype: torch.dtype, device: torch.device, seed: int) -> Classifier:
    """A fresh QLoRA classifier (pretrained encoder quantized by :func:`qlora.prepare_model`, adapters initialized
    from ``seed``) with the saved adapter and head loaded over it, in eval mode."""
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    fresh = Classifier(minilm.load_minilm(layers, dtype, device), len(demo_data.LABELS))
    prepare_model(fresh.encoder, r=rank, lora_alpha=alpha, lora_dropout=0.0, blocksize=64, double_quant=True)
    load_adapter(fresh.encoder, adapter_dir)
    fresh.head.load_state_dict({k: v.to(device) for k, v in load_file(str(head_path)).items()})
    return fresh.eval()


def _prepare_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise DemoError(f"--out {out!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".qlora-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DemoError(f"--out {out!r} is not a writable directory: {err.strerror or err}") from None
    return path


def run(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo (see the module docstring); ``log`` receives each line of the report."""
    check_config(cfg)
    device = resolve_device(cfg.device)
    if not interpreter_active():
        return _run(cfg, device, log)
    # Under the interpreter every tl.dot is a NumPy matmul of one tile: with NumPy's BLAS threads and torch's
    # intra-op threads competing for the same cores, a QLoRA step took 5.2 s instead of 4.4 s on a 2-core machine
    # (perf/README.md, "Interpreter speed of the layer"). The demo owns its process, so it keeps NumPy's BLAS on one thread.
    from threadpoolctl import threadpool_limits  # imported here: a GPU machine's environment may lack it

    with threadpool_limits(limits=1, user_api="blas"):
        return _run(cfg, device, log)


def _run(cfg: DemoConfig, device: torch.device, log: Callable[[str], None]) -> DemoResult:
    out = _prepare_out(cfg.out)
    try:
        folder = minilm.model_dir()  # checks that the weights, config and vocabulary are all installed
    except minilm.MiniLMNotInstalled as err:
        raise DemoError(str(err)) from None
    tokenizer = minilm.load_tokenizer(folder)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense_dtype = str(dtype).replace("torch.", "")
    n_layers = cfg.layers or minilm.MiniLMConfig.from_json(folder / "config.json").num_hidden_layers

    def encode(split: str):
        pairs = demo_data.examples(split)
        ids, mask = tokenizer.encode_batch([s for s, _ in pairs], cfg.max_length, device)
        return ids, mask, torch.tensor([y for _, y in pairs], dtype=torch.int64, device=device)

    train, evalset = encode("train"), encode("eval")
    n_train = len(train[2])  # check_config capped --batch-size at this (INT_RANGES["batch_size"])
    batches = _batches(n_train, cfg.batch_size, cfg.steps, cfg.seed)
    log_every = cfg.log_every or max(1, round(cfg.steps / 10))
    # Evaluation batches of at most 128 token rows: under the interpreter a layer call is dominated by
    # dequantizing the weight, not by the rows (observed while writing the demo: a step on 8 x 14 tokens took
    # about as long as one on a single token), so few large batches dequantize least often.
    eval_batch = max(1, 128 // evalset[0].shape[1])
    eval_passes = -(-len(evalset[2]) // eval_batch)

    mode = "Triton interpreter on CPU" if interpreter_active() else f"compiled Triton kernels on {device}"
    log(f"qlora demo: {BASE_MODEL_NAME} ({n_layers} transformer layer{'s' if n_layers != 1 else ''}) from "
        f"{folder}")
    log(f"task: {len(demo_data.LABELS)}-way topic classification {demo_data.LABELS}, {n_train} training / "
        f"{len(evalset[2])} evaluation sentences, batch {cfg.batch_size} x {train[0].shape[1]} tokens")
    log(f"kernels: {mode}; compute dtype {dense_dtype}; LoRA r={cfg.rank}, alpha={cfg.alpha:g} on every linear "
        f"layer; lr {cfg.lr:g} (adapters), {cfg.head_lr:g} (head); {cfg.steps} step{'s' if cfg.steps != 1 else ''}; "
        f"seed {cfg.seed}")

    # QLoRA model. The seed fixes the head and the adapters' initialization.
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    qmodel = Classifier(minilm.load_minilm(cfg.layers, dtype, device), len(demo_data.LABELS))
    prepare_model(qmodel.encoder, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, blocksize=64,
                  double_quant=True)
    qmodel.head.requires_grad_(True)
    t_prepare = time.perf_counter() - t0
    qlayers = qlora_layers(qmodel.encoder)
    log(f"quantized {len(qlayers)} linear layers to NF4 (blocksize 64, double quantization) in "
        f"{_fmt_seconds(t_prepare)}")

    # 16-bit LoRA baseline, starting from the same adapters and head.
    dmodel = Classifier(minilm.load_minilm(cfg.layers, dtype, device), len(demo_data.LABELS))
    dlayers = dict(add_dense_lora(dmodel.encoder, cfg.rank, cfg.alpha))
    with torch.no_grad():
        for name, layer in qlayers:
            dlayers[name].lora_A.copy_(layer.lora_A)
            dlayers[name].lora_B.copy_(layer.lora_B)
        dmodel.head.load_state_dict(qmodel.head.state_dict())

    qopt = PagedAdamW8bit(_optimizer_groups(qmodel, cfg.lr, cfg.head_lr), weight_decay=0.0, paging="auto",
                          page_size=PAGE_SIZE, num_pages=NUM_PAGES, min_paged_size=0)
    dopt = torch.optim.AdamW(_optimizer_groups(dmodel, cfg.lr, cfg.head_lr), weight_decay=0.0)

    result = DemoResult(out=str(out))
    header = f"{'step':>5} | {'QLoRA loss':>10} | {'LoRA loss':>10} | {'|diff|':>7} | {'elapsed':>8}"
    log("")
    log(f"training loss (mean over the steps since the previous row; LoRA = the unquantized {dense_dtype} model):")
    rows_printed = False
    t_train = time.perf_counter()
    t_q = t_d = 0.0
    for step, idx in enumerate(batches, start=1):
        index = torch.tensor(idx, device=device)
        ids, mask, y = (t[index] for t in train)
        for model, opt, losses in ((qmodel, qopt, result.losses_qlora), (dmodel, dopt, result.losses_dense)):
            ts = time.perf_counter()
            loss = nn.functional.cross_entropy(model(ids, mask).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if model is qmodel:
                t_q += time.perf_counter() - ts
            else:
                t_d += time.perf_counter() - ts
        if step == 1:
            first = time.perf_counter() - t_train
            # A rough estimate, not a measurement: a forward pass taken as 40% of a training step (forward +
            # backward + optimizer); the reload check quantizes the encoder again and runs one more forward pass.
            after = 0.4 * t_q * (eval_passes + 1) + t_prepare
            log(f"first step: {first:.1f} s (QLoRA {t_q:.1f} s, LoRA {t_d:.2f} s); estimated time: training "
                f"{_fmt_seconds(first * cfg.steps)}, then evaluation and the reload check about "
                f"{_fmt_seconds(after)}")
        if step % log_every == 0 or step == cfg.steps:
            if not rows_printed:
                log(header)
                log("-" * len(header))
                rows_printed = True
            lo = (step - 1) // log_every * log_every
            q = sum(result.losses_qlora[lo:step]) / (step - lo)
            d = sum(result.losses_dense[lo:step]) / (step - lo)
            log(f"{step:>5} | {q:>10.4f} | {d:>10.4f} | {abs(q - d):>7.4f} | "
                f"{_fmt_seconds(time.perf_counter() - t_train):>8}")
    train_seconds = time.perf_counter() - t_train
    # The cost of the 4-bit path per training step against the plain-torch LoRA step on the same batches: on a CPU
    # it is the Triton interpreter's overhead, on a GPU the kernels' (tracked by issue 14 of the project).
    log(f"time per training step: QLoRA {t_q / cfg.steps:.3f} s, LoRA {t_d / cfg.steps:.4f} s "
        f"({t_q / max(t_d, 1e-9):.1f}x)")
    # One layer alone, without the rest of the model and the optimizers (issue 14's measure): the first MLP
    # up-projection at the training batch's token rows, forward + backward, QLoRA against its plain-torch twin.
    up_name, up_layer = next(((n, l) for n, l in qlayers if l.out_features > l.in_features), qlayers[0])
    up_rows = cfg.batch_size * train[0].shape[1]
    lq, ld = layer_times(up_layer, dlayers[up_name], up_rows, seed=cfg.seed)
    log(f"time per layer forward + backward ({up_name}: {up_rows} x {up_layer.in_features} -> "
        f"{up_layer.out_features}, r={cfg.rank}): QLoRA {lq * 1e3:.1f} ms, LoRA {ld * 1e3:.2f} ms "
        f"({lq / max(ld, 1e-9):.1f}x)")

    qmodel.eval()
    dmodel.eval()
    te = time.perf_counter()
    q_loss, q_acc, q_logits = evaluate(qmodel, evalset, eval_batch)
    d_loss, d_acc, _ = evaluate(dmodel, evalset, eval_batch)
    eval_seconds = time.perf_counter() - te
    log("")
    log(f"evaluation on {len(evalset[2])} held-out sentences:")
    log(f"  QLoRA (NF4 base, PagedAdamW8bit)      loss {q_loss:.4f}  accuracy {q_acc:6.1%}")
    log(f"  LoRA ({dense_dtype} base, torch AdamW){' ' * max(0, 10 - len(dense_dtype))} loss {d_loss:.4f}  "
        f"accuracy {d_acc:6.1%}")

    # Memory.
    report = trainable_parameters_report(qmodel)
    mem = qopt.memory_report()
    qopt_bytes = mem["resident_state_bytes"] + mem["paged_state_bytes"]
    dense_params = sum(p.numel() * p.element_size() for p in dmodel.parameters())
    dense_bufs = sum(b.numel() * b.element_size() for b in dmodel.buffers())
    base_linear = sum(l.base.weight.numel() * l.base.weight.element_size() for l in dlayers.values())
    log("")
    log("memory (QLoRA model, trainable_parameters_report):")
    for line in str(report).splitlines():
        log(f"  {line}")
    log(f"  linear weights: {_human_bytes(report.weight_4bit_bytes + report.scale_bytes)} in NF4 vs "
        f"{_human_bytes(base_linear)} in {dense_dtype} "
        f"({8 * (report.weight_4bit_bytes + report.scale_bytes) / sum(l.weight.numel for _, l in qlayers):.3f} "
        f"bits per parameter, codebooks included)")
    log(f"  whole model: {_human_bytes(report.total_bytes)} vs {_human_bytes(dense_params + dense_bufs)} for the "
        f"{dense_dtype} LoRA model")
    last = next(iter(mem["devices"].values()), {}).get("last_step", {})
    log(f"optimizer state: PagedAdamW8bit {_human_bytes(qopt_bytes)} ({mem['paged_tensors']} paged tensors, "
        f"{mem['resident_tensors']} resident; paging {mem['paging']!r}, device budget "
        f"{_human_bytes(mem['device_budget_bytes'])} = {mem['num_pages']} pages of {_human_bytes(mem['page_size'])}; "
        f"last step moved {_human_bytes(last.get('bytes_to_device', 0))} in and "
        f"{_human_bytes(last.get('bytes_to_host', 0))} out) vs torch AdamW {_human_bytes(_state_bytes(dopt))}")

    # Save, reload into a freshly prepared model, compare on the first evaluation batch: same inputs, same kernels.
    adapter_dir, head_path = save_trained(qmodel, out)
    fresh = load_trained(adapter_dir, head_path, cfg.layers, cfg.rank, cfg.alpha, dtype, device, seed=cfg.seed + 1)
    probe = evalset[0][:eval_batch], evalset[1][:eval_batch]
    with torch.no_grad():
        want, got = q_logits[:eval_batch], fresh(*probe)
    result.reload_ok = bool(torch.equal(want, got))
    max_diff = (want.float() - got.float()).abs().max().item()
    log("")
    log(f"saved the adapter to {adapter_dir}/ (PEFT format) and the head to {head_path}")
    log(f"reload check (fresh prepare_model + load_adapter, logits of {len(probe[0])} sentences): "
        f"{'identical' if result.reload_ok else f'MISMATCH, max |difference| {max_diff:.3g}'}")

    result.final = {
        "qlora": {"eval_loss": q_loss, "eval_accuracy": q_acc, "train_seconds": t_q},
        "dense": {"eval_loss": d_loss, "eval_accuracy": d_acc, "train_seconds": t_d},
        "dense_dtype": dense_dtype,
        "reload_identical": result.reload_ok,
    }
    png = out / "loss_curves.png"
    title = (f"all-MiniLM-L6-v2 ({n_layers} layers), topic classification: QLoRA vs {dense_dtype} LoRA "
             f"(r={cfg.rank})")
    _plot(png, list(range(1, cfg.steps + 1)), result.losses_qlora, result.losses_dense, result.final, title)
    metrics = {
        "config": asdict(cfg),
        "device": str(device),
        "interpreter": interpreter_active(),
        "layers": n_layers,
        "losses": {"qlora": result.losses_qlora, "dense": result.losses_dense},
        **result.final,
        "memory": {"qlora_model": asdict(report), "qlora_optimizer": mem,
                   "dense_model_bytes": dense_params + dense_bufs, "dense_optimizer_bytes": _state_bytes(dopt)},
        "seconds": {"prepare": t_prepare, "train": train_seconds, "eval": eval_seconds,
                    "step_ratio_qlora_over_lora": t_q / max(t_d, 1e-9),
                    "layer": {"name": up_name, "rows": up_rows, "qlora": lq, "dense": ld,
                              "ratio_qlora_over_lora": lq / max(ld, 1e-9)}},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n", encoding="utf-8")
    log(f"loss curves: {png}; metrics: {out / 'metrics.json'}")
    return result
