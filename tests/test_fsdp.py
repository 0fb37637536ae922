"""Distributed QLoRA on CPU: FSDP2 (``fully_shard``) and DDP over gloo with 2 ranks, against one process; the NF4
weight held as frozen parameters (``quant_storage``); sharded checkpoints (DCP) and the bitsandbytes/PEFT export.

The distributed tests start three processes each (``python tests/test_fsdp.py <scenario> <role> <dir>``): ranks 0
and 1 of a gloo process group (``MASTER_ADDR``/``MASTER_PORT`` on a free local port, as torchrun sets them) and a
single-process reference, with ``QLORA_INTERPRET=1`` and one thread each, all under one deadline. They write their
results to files that the test compares.

Why the comparison is exact (tolerance 0). Each global batch has 4 sequences; rank r takes sequences 2r and 2r+1
and computes its mean token loss ``l_r`` and gradient ``g_r``; data parallelism averages: FSDP2 reduce-scatters
with ``ReduceOp.AVG``, DDP all-reduces gradients divided by the world size. The reference runs the same two halves
as two micro-batches (same shapes, same dropout seeds, same kernels, one thread), so its ``l_r`` and ``g_r`` are
bitwise those of rank r, and it forms ``(g_0 + g_1) / 2`` itself. A sum of two float32 numbers does not depend on
their order and halving is exact (no underflow here), so ``fl(g_0 + g_1) / 2 == fl(g_0 / 2 + g_1 / 2)``: the two
runs get the same averaged gradient whichever way the collective computes it; likewise the logged loss
``(l_0 + l_1) / 2``. AdamW is elementwise, so the steps agree bit for bit; the 8-bit optimizer quantizes in
256-element blocks of each rank's shard, which are the reference's blocks because every LoRA tensor below splits
into two halves of 256 or 512 elements. (With more than two ranks the average sums more than two terms in an order
the collective picks, and only ``|error| <= (world_size - 1) * 2^-24 * sum_r |g_r| / world_size`` would hold.)
"""

from __future__ import annotations

import copy
import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import qlora  # noqa: F401  (interpreter switch before the kernels; the workers set QLORA_INTERPRET=1)
import pytest
import torch
from helpers import TinyLM, nf4_equal
from torch import nn

from qlora.distributed import (export_pretrained, full_state_dict, fully_shard_model, load_checkpoint,
                               save_checkpoint, set_quant_storage)
from qlora.interop import load_adapter, load_quantized, save_adapter, save_quantized
from qlora.layers import QUANT_STORAGES, QLoRALinear
from qlora.model import prepare_model
from qlora.optim import PagedAdamW, PagedAdamW8bit
from safetensors.torch import load_file

DEVICE = torch.device("cpu" if qlora.interpreter_active() else "cuda")
VOCAB, D, HIDDEN, BLOCKS, R = 64, 64, 128, 1, 8
SEQ, BATCH, STEPS, RESUME_AT = 8, 4, 5, 3
WORLD = 2
TIMEOUT_S = 150  # all three processes together; measured 25-35 s on 2 CPU cores
NEEDS_GLOO = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend")
# Under FSDP2 the LM head keeps its packed bytes viewed as float32 (bitsandbytes' quant_storage layout); every
# other layer uses the default uint8 storage.
HEAD_STORAGE = torch.float32


# ----------------------------------------------------------------------------------------------------------------
# The model and the training recipe shared by every process
# ----------------------------------------------------------------------------------------------------------------

def build_model(seed: int = 0) -> TinyLM:
    """The prepared model (NF4 weights in uint8 storage), LoRA rank 8 with dropout 0.1, lora_B nonzero so that every
    adapter gets a gradient from the first step."""
    torch.manual_seed(seed)
    model = prepare_model(TinyLM(VOCAB, D, HIDDEN, BLOCKS).to(DEVICE), r=R, lora_alpha=16, lora_dropout=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def make_optimizer(kind: str, params):
    # Tiny pages and min_paged_size=0 so that paging (host pages on CPU) is exercised; min_8bit_size=0 so that the
    # small LoRA tensors get 8-bit states.
    paging = dict(paging="host", page_size=4096, num_pages=2, min_paged_size=0)
    if kind == "8bit":
        return PagedAdamW8bit(params, lr=1e-2, weight_decay=0.01, min_8bit_size=0, **paging)
    return PagedAdamW(params, lr=1e-2, weight_decay=0.01, **paging)


def batches() -> torch.Tensor:
    """(STEPS + 1, BATCH, SEQ + 1) tokens; the last batch is for evaluation."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (STEPS + 1, BATCH, SEQ + 1), generator=gen).to(DEVICE)


def half(batch: torch.Tensor, rank: int) -> torch.Tensor:
    per = BATCH // WORLD
    return batch[rank * per:(rank + 1) * per]


def micro_step_loss(model, tokens: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    torch.manual_seed(1000 + 10 * step + rank)  # the dropout seeds of this step's micro-batch / rank
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def rank_backward(model, opt, data: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """One rank's part of a distributed step: zero the gradients and backpropagate the rank's half of the batch.
    Returns the loss averaged over the ranks (all-reduced)."""
    import torch.distributed as dist

    opt.zero_grad()
    loss = micro_step_loss(model, half(data[step], rank), step, rank)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total / WORLD


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(batches()[-1][:, :-1])
    model.train()
    return out


def lora_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lora_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def head_storage(model) -> None:
    model.lm_head.set_quant_storage(HEAD_STORAGE)


# ----------------------------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------------------------

def _fsdp_model(mesh, seed: int = 0):
    model = build_model(seed)
    head_storage(model)  # every other layer keeps the default uint8 storage
    fully_shard_model(model, model.blocks, mesh=mesh)
    return model


def worker_fsdp_rank(rank: int, out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    data = batches()
    model = _fsdp_model(mesh)
    names = lora_names(model)
    up = model.blocks[0].mlp.up
    record: dict = {"loss": [], "grads": [], "names": names,
                    "param_types": {n: type(p).__name__ for n, p in model.named_parameters()},
                    # (key, type, global shape, local shape) of the sharded state dict entries of one layer
                    "up_state": [(k, type(v).__name__, tuple(v.shape),
                                  tuple(v.to_local().shape) if hasattr(v, "to_local") else None)
                                 for k, v in model.state_dict().items() if k.startswith("blocks.0.mlp.up.weight")],
                    "up_weight": (type(up.weight).__name__, tuple(up.weight.shape), up.weight.double_quant),
                    "up_full": up.weight.full().to_bnb_state_dict("blocks.0.mlp.up.weight")}
    opt = make_optimizer("8bit", lora_parameters(model))
    for step in range(STEPS):
        if step == RESUME_AT:
            # Save sharded, then continue from a fresh model (another seed: other base weights and adapters, all
            # overwritten by the checkpoint) and a fresh optimizer.
            save_checkpoint(out / "ckpt_resume", model, opt)
            model = _fsdp_model(mesh, seed=1)
            opt = make_optimizer("8bit", lora_parameters(model))
            load_checkpoint(out / "ckpt_resume", model, opt)
        record["loss"].append(rank_backward(model, opt, data, step, rank))
        params = dict(model.named_parameters())
        record["grads"].append({n: params[n].grad.full_tensor() for n in names})
        opt.step()
    record["eval"] = eval_logits(model)
    record["state"] = full_state_dict(model)
    # torch's own state dict API resolves every key by attribute (bitsandbytes' keys included) and agrees.
    dsd_full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    record["dsd_agrees"] = list(dsd_full) == list(record["state"]) and all(
        torch.equal(dsd_full[k].cpu(), v) for k, v in record["state"].items())
    record["dsd_sharded_types"] = {k: type(v).__name__ for k, v in get_model_state_dict(model).items()
                                   if k.startswith("blocks.0.mlp.up.")}
    optim_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    record["optim"] = optim_state["state"]
    save_checkpoint(out / "ckpt_final", model, opt)
    export_pretrained(model, out / "export.safetensors", out / "adapter")
    _mixed_precision(mesh, record)
    # A sharded load checks the replicated code tables as every loader does (qlora.bnb_format): a quant_map that is
    # not the NF4 codebook is refused on every rank, naming the key, before anything is copied.
    bad = {k: v.flip(0) if k.endswith("up.weight.quant_map") else v for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(bad)
    except RuntimeError as err:
        record["bad_code_table"] = str(err)
    if rank == 0:
        torch.save(record, out / "rank0.pt")
        (out / "done").touch()
    dist.destroy_process_group()


def _mixed_precision(mesh, record: dict) -> None:
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bfloat16) casts every floating parameter it gathers. The uint8
    / int32 NF4 storage is not floating and passes as it is, so the model computes what the same model cast with
    ``.to(torch.bfloat16)`` computes in one process (which leaves NF4 weights alone); a float32 quant_storage would
    be cast, and the forward refuses it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    model = build_model()
    fully_shard_model(model, model.blocks, mesh=mesh, mp_policy=policy)
    record["mp_eval"] = eval_logits(model)
    model = build_model()
    head_storage(model)
    fully_shard_model(model, model.blocks, mesh=mesh, mp_policy=policy)
    try:
        eval_logits(model)
    except RuntimeError as err:  # raised on every rank at the same layer, after its all-gather
        record["mp_refused"] = str(err)


def worker_ddp_rank(rank: int, out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    data = batches()
    model = DDP(build_model())
    names = lora_names(model.module)
    opt = make_optimizer("32bit", lora_parameters(model))
    record: dict = {"loss": [], "grads": []}
    for step in range(STEPS):
        record["loss"].append(rank_backward(model, opt, data, step, rank))
        params = dict(model.module.named_parameters())
        record["grads"].append({n: params[n].grad.clone() for n in names})
        opt.step()
    record["eval"] = eval_logits(model.module)
    if rank == 0:
        # DDP keeps whole parameters on every rank: rank 0 writes with the single-process functions.
        save_quantized(model.module, out / "export.safetensors")
        save_adapter(model.module, out / "adapter")
    dist.barrier()
    if rank == 0:
        torch.save(record, out / "rank0.pt")
        (out / "done").touch()
    dist.destroy_process_group()


def _wait_for(path: Path, deadline_s: float = TIMEOUT_S) -> None:
    end = time.monotonic() + deadline_s
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.2)


def worker_reference(scenario: str, out: Path) -> None:
    """The single-process run: each step's two halves as micro-batches, gradients averaged by hand. Then it loads
    what the distributed run wrote: the export (both scenarios) and, for FSDP, the final DCP checkpoint into an
    unsharded model in this process, which has no process group."""
    from torch.distributed.checkpoint.api import CheckpointException

    data = batches()
    model = build_model()
    names = lora_names(model)
    params = dict(model.named_parameters())
    lora = [params[n] for n in names]
    opt = make_optimizer("8bit" if scenario == "fsdp" else "32bit", lora)
    record: dict = {"loss": [], "grads": [], "names": names}
    for step in range(STEPS):
        losses, grads = [], []
        for rank in range(WORLD):
            opt.zero_grad()
            loss = micro_step_loss(model, half(data[step], rank), step, rank)
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad for p in lora])
        for p, g0, g1 in zip(lora, *grads):
            p.grad = (g0 + g1) / WORLD
        record["loss"].append((losses[0] + losses[1]) / WORLD)
        record["grads"].append({n: p.grad.clone() for n, p in zip(names, lora)})
        opt.step()
    record["eval"] = eval_logits(model)
    record["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    record["optim"] = opt.state_dict()["state"]
    if scenario == "fsdp":
        record["mp_eval"] = eval_logits(build_model().to(torch.bfloat16))

    _wait_for(out / "done")
    if scenario == "fsdp":
        restored = build_model(seed=2)  # other weights and adapters, replaced by the checkpoint's
        set_quant_storage(restored, torch.uint8)  # same storage as the saved model, layer by layer
        restored.lm_head.set_quant_storage(HEAD_STORAGE)
        load_checkpoint(out / "ckpt_final", restored)
        record["restored_eval"] = eval_logits(restored)
        # Its 8-bit optimizer state follows the 2 shards' blocks: DCP refuses it for unsharded parameters.
        spare = copy.deepcopy(restored)
        try:
            load_checkpoint(out / "ckpt_final", spare, make_optimizer("8bit", lora_parameters(spare)))
        except CheckpointException as err:  # DCP's wrapper of each rank's error (a BaseException)
            record["optim_refused"] = str(err)
    exported = build_model(seed=3)
    load_quantized(exported, out / "export.safetensors")
    load_adapter(exported, out / "adapter")
    record["export_eval"] = eval_logits(exported)
    record["export_state"] = exported.state_dict()
    torch.save(record, out / "reference.pt")


# ----------------------------------------------------------------------------------------------------------------
# The tests: one process (parameter storage, checkpoints without a process group)
# ----------------------------------------------------------------------------------------------------------------



def _layer(seed: int, shape=(20, 48), **kwargs) -> QLoRALinear:
    torch.manual_seed(seed)
    layer = QLoRALinear.from_linear(nn.Linear(shape[1], shape[0]).to(DEVICE), r=4, lora_alpha=8, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _run(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    grads = (x.grad, layer.lora_A.grad, layer.lora_B.grad)
    layer.zero_grad()
    return (y.detach(), *grads)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "single_quant"])
@pytest.mark.parametrize("storage", QUANT_STORAGES, ids=lambda dtype: str(dtype).removeprefix("torch."))
def test_parameter_storage_computes_and_saves_what_attribute_storage_does(storage, double_quant):
    plain = _layer(0, double_quant=double_quant)
    held = copy.deepcopy(plain).set_quant_storage(storage)
    assert held.quant_storage == storage and f"quant_storage={str(storage)[6:]}" in repr(held)
    rows = 20 * 48 // 2 // storage.itemsize  # 480 packed bytes
    params = {n: (p.dtype, tuple(p.shape), p.requires_grad) for n, p in held.named_parameters() if "nf4" in n}
    expected = {"nf4_packed": (storage, (rows, 1), False),
                "nf4_absmax": (torch.uint8 if double_quant else torch.int32, (15,), False)}
    if double_quant:
        expected["nf4_absmax2"] = (torch.int32, (1,), False)
    assert params == expected
    assert nf4_equal(held.weight, plain.weight)
    x = torch.randn(5, 48, device=DEVICE)
    for a, b in zip(_run(held, x), _run(plain, x)):
        assert torch.equal(a, b)
    # The state dict: bitsandbytes' keys and values; the packed bytes in the storage dtype (its quant_storage).
    sd_plain, sd_held = plain.state_dict(), held.state_dict()
    assert list(sd_held) == list(sd_plain)
    for key, value in sd_held.items():
        want = sd_plain[key]
        if key == "weight":
            assert value.dtype == storage and tuple(value.shape) == (rows, 1)
            value = value.view(torch.uint8).reshape(want.shape)
        assert value.dtype == want.dtype and torch.equal(value, want), key
    # Every key resolves attribute by attribute, as torch's get_model_state_dict resolves keys (bitsandbytes' too).
    for layer in (plain, held):
        for key in sd_held:
            functools.reduce(getattr, key.split("."), layer)
    # Nothing casts the stored weight: a dtype change moves the adapter only.
    cast = copy.deepcopy(held).to(torch.float16)
    assert cast.lora_A.dtype == torch.float16 and nf4_equal(cast.weight, plain.weight)
    assert cast._parameters["nf4_packed"].dtype == storage
    # Loading takes any quantization layout (here another blocksize and double quantization) and keeps the storage.
    other = _layer(1, blocksize=128, double_quant=not double_quant).set_quant_storage(storage)
    other.load_state_dict(sd_plain)
    assert other.quant_storage == storage and nf4_equal(other.weight, plain.weight)
    assert torch.equal(_run(other, x)[0], _run(plain, x)[0])
    back = _layer(2, double_quant=double_quant)
    back.load_state_dict(sd_held)
    assert nf4_equal(back.weight, plain.weight)
    held.set_quant_storage(torch.uint8)
    assert held.quant_storage == torch.uint8 and held._parameters["nf4_packed"].dtype == torch.uint8
    assert nf4_equal(held.weight, plain.weight)


def test_quant_storage_is_checked_and_a_cast_storage_refused():
    layer = _layer(3, shape=(3, 3))  # 9 elements pack into 5 bytes
    with pytest.raises(TypeError, match="quant_storage must be one of uint8, float16, bfloat16, float32"):
        layer.set_quant_storage(torch.int32)
    with pytest.raises(ValueError, match=r"quant_storage=float16 needs a packed byte count that is a multiple of 2"):
        layer.set_quant_storage(torch.float16)
    assert layer.quant_storage == torch.uint8
    assert QLoRALinear(layer.weight, r=2, lora_alpha=2, quant_storage=torch.uint8).quant_storage == torch.uint8
    with pytest.raises(ValueError, match="quant_storage=float32"):
        QLoRALinear(layer.weight, r=2, lora_alpha=2, quant_storage=torch.float32)
    # For a whole model every layer is checked before any changes.
    model = nn.Sequential(_layer(5), layer)
    with pytest.raises(ValueError, match=r"layer '1': quant_storage=float16"):
        set_quant_storage(model, torch.float16)
    assert model[0].quant_storage == torch.uint8
    # What FSDP2's MixedPrecisionPolicy(param_dtype=bfloat16) would do to a float32 storage is caught in forward.
    held = _layer(4).set_quant_storage(torch.float32)
    packed = held._parameters["nf4_packed"]
    held._parameters["nf4_packed"] = nn.Parameter(packed.to(torch.bfloat16), requires_grad=False)
    with pytest.raises(RuntimeError, match="quant_storage is float32.*MixedPrecisionPolicy"):
        held(torch.randn(2, 48, device=DEVICE))


@NEEDS_GLOO
def test_interop_files_and_single_process_checkpoints_with_parameter_storage(tmp_path):
    model = build_model()
    held = set_quant_storage(copy.deepcopy(model), torch.uint8)
    held.lm_head.set_quant_storage(HEAD_STORAGE)
    save_quantized(model, tmp_path / "plain.safetensors")
    save_quantized(held, tmp_path / "held.safetensors")
    plain_file, held_file = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "held.safetensors")
    assert sorted(plain_file) == sorted(held_file)
    for key, value in held_file.items():
        if key == "lm_head.weight":  # bitsandbytes' quant_storage form: the same bytes as float32 (n/8, 1)
            assert value.dtype == HEAD_STORAGE and tuple(value.shape) == (VOCAB * D // 8, 1)
            value = value.view(torch.uint8).reshape(-1, 1)
        assert torch.equal(value, plain_file[key]), key
    # export_pretrained without a process group writes the canonical uint8 file and the PEFT adapter.
    export_pretrained(held, tmp_path / "export.safetensors", tmp_path / "adapter")
    exported = load_file(tmp_path / "export.safetensors")
    assert sorted(exported) == sorted(plain_file) and all(torch.equal(exported[k], v) for k, v in plain_file.items())
    target = set_quant_storage(build_model(seed=5), torch.uint8)
    load_quantized(target, tmp_path / "held.safetensors")  # assigns the NF4 weights, keeps parameter storage
    load_adapter(target, tmp_path / "adapter")
    assert target.blocks[0].mlp.up.quant_storage == torch.uint8
    assert torch.equal(eval_logits(target), eval_logits(model))
    # DCP without a process group: model and optimizer state, saved and reloaded; the next step agrees.
    data = batches()
    opt = make_optimizer("8bit", lora_parameters(held))
    for step in range(2):
        opt.zero_grad()
        micro_step_loss(held, half(data[step], 0), step, 0).backward()
        opt.step()
    save_checkpoint(tmp_path / "ckpt", held, opt)
    again = set_quant_storage(build_model(seed=6), torch.uint8)
    again.lm_head.set_quant_storage(HEAD_STORAGE)
    opt2 = make_optimizer("8bit", lora_parameters(again))
    load_checkpoint(tmp_path / "ckpt", again, opt2)
    for m, o in ((held, opt), (again, opt2)):
        o.zero_grad()
        micro_step_loss(m, half(data[2], 0), 2, 0).backward()
        o.step()
    assert torch.equal(eval_logits(again), eval_logits(held))


# ----------------------------------------------------------------------------------------------------------------
# The tests: two ranks against one process
# ----------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(scenario: str, out: Path) -> tuple[dict, dict]:
    """Run ranks 0 and 1 and the reference of ``scenario`` concurrently; return (rank 0's, the reference's) record."""
    env = {**os.environ, "QLORA_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(WORLD)}
    roles = ["rank0", "rank1", "reference"]
    procs, logs = [], []
    for role in roles:
        log = open(out / f"{role}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, scenario, role, str(out)], stdout=log,
                                      stderr=subprocess.STDOUT, env={**env, "RANK": role.removeprefix("rank")}))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    failed = [(role, proc.returncode) for role, proc in zip(roles, procs) if proc.returncode != 0]
    if failed:
        tails = "\n".join(f"--- {role} (exit {code}):\n" + (out / f"{role}.log").read_text()[-3000:]
                          for role, code in failed)
        pytest.fail(f"{scenario}: processes failed or ran past {TIMEOUT_S} s\n{tails}")
    return (torch.load(out / "rank0.pt", weights_only=False), torch.load(out / "reference.pt", weights_only=False))


def _assert_same_training(dist_run: dict, ref: dict) -> None:
    assert len(dist_run["loss"]) == len(ref["loss"]) == STEPS
    for step, (a, b) in enumerate(zip(dist_run["loss"], ref["loss"])):
        assert torch.equal(a, b), (step, a, b)
    for step, (a, b) in enumerate(zip(dist_run["grads"], ref["grads"])):
        assert list(a) == list(b) == ref["names"]
        for name in b:
            assert torch.equal(a[name], b[name]), (step, name)
    assert torch.equal(dist_run["eval"], ref["eval"])
    assert torch.equal(ref["export_eval"], ref["eval"])  # the files written by rank 0 reload into the same model


@NEEDS_GLOO
def test_fsdp2_training_checkpoint_and_export_match_a_single_process(tmp_path):
    run, ref = _launch("fsdp", tmp_path)
    # Everything FSDP2 manages is a DTensor, the NF4 storage included; one layer's state dict entries are sharded
    # on dim 0 (bitsandbytes' keys: packed (4096, 1) uint8, absmax (128,) uint8 codes, nested_absmax (1,) float32)
    # and the whole ones (codebooks, JSON) are plain.
    assert set(run["param_types"].values()) == {"DTensor"}
    assert any(n.endswith("nf4_packed") for n in run["param_types"])
    assert run["up_state"] == [
        ("blocks.0.mlp.up.weight", "DTensor", (4096, 1), (2048, 1)),
        ("blocks.0.mlp.up.weight.absmax", "DTensor", (128,), (64,)),
        ("blocks.0.mlp.up.weight.quant_map", "Tensor", (16,), None),
        ("blocks.0.mlp.up.weight.nested_absmax", "DTensor", (1,), (1,)),
        ("blocks.0.mlp.up.weight.nested_quant_map", "Tensor", (256,), None),
        ("blocks.0.mlp.up.weight.quant_state.bitsandbytes__nf4", "Tensor", run["up_state"][5][2], None)]
    assert run["up_weight"] == ("ShardedNF4Weight", (HIDDEN, D), True)
    for key, value in run["up_full"].items():  # ShardedNF4Weight.full() gathers the layer's NF4 weight
        assert torch.equal(value, ref["state"][key]), key
    assert run["dsd_agrees"] and run["dsd_sharded_types"]["blocks.0.mlp.up.weight"] == "DTensor"
    assert ("state dict entry 'blocks.0.mlp.up.weight.quant_map' must be the NF4 codebook (only NF4 is supported); "
            "entry 0 is 1.0") in run.get("bad_code_table", "no error"), run.get("bad_code_table")
    # Losses and gradients of 5 steps (the last 2 after a DCP save and a reload into a fresh sharded model and
    # optimizer), and the final model, bit for bit.
    _assert_same_training(run, ref)
    # The gathered state dict is the single-process one: NF4 entries (scales, codebooks, JSON with the offset)
    # included; the LM head's packed bytes are the same bytes viewed as float32.
    assert list(run["state"]) == list(ref["state"])
    for key, want in ref["state"].items():
        got = run["state"][key]
        if key == "lm_head.weight":
            assert got.dtype == HEAD_STORAGE
            got = got.view(torch.uint8).reshape(want.shape)
        assert got.dtype == want.dtype and torch.equal(got, want), key
    # 8-bit optimizer state, gathered with get_optimizer_state_dict(full_state_dict=True): the reference's, since
    # every shard holds whole 256-element blocks (the scales come as one row per shard: (2, blocks per shard)).
    for index, name in enumerate(ref["names"]):
        got, want = run["optim"][name], ref["optim"][index]
        assert set(got) == set(want) and got["step"] == want["step"] == STEPS, name
        for field in set(want) - {"step"}:
            value = got[field]
            if field.endswith("absmax"):
                assert tuple(value.shape) == (WORLD, want[field].numel() // WORLD), (name, field)
                value = value.reshape(-1)
            assert torch.equal(value, want[field]), (name, field)
    # The final DCP checkpoint, saved by 2 ranks, loaded by one process without a process group; its 8-bit
    # optimizer state is refused there (its blocks follow the shards).
    assert torch.equal(ref["restored_eval"], ref["eval"])
    assert "Size mismatch" in ref["optim_refused"] and "exp_avg_absmax" in ref["optim_refused"]
    exported = load_file(tmp_path / "export.safetensors")
    assert exported["lm_head.weight"].dtype == torch.uint8  # canonical bitsandbytes layout whatever the storage
    # Mixed precision (bfloat16 compute) leaves the uint8 NF4 storage alone and refuses a float32 one.
    assert run["mp_eval"].dtype == torch.bfloat16 and torch.equal(run["mp_eval"], ref["mp_eval"])
    assert "quant_storage is float32" in run["mp_refused"]


@NEEDS_GLOO
def test_ddp_training_matches_a_single_process(tmp_path):
    run, ref = _launch("ddp", tmp_path)
    _assert_same_training(run, ref)


def main(argv: list[str]) -> None:
    scenario, role, out = argv[0], argv[1], Path(argv[2])
    torch.set_num_threads(1)
    if role == "reference":
        worker_reference(scenario, out)
        return
    rank = int(role.removeprefix("rank"))
    (worker_fsdp_rank if scenario == "fsdp" else worker_ddp_rank)(rank, out)


if __name__ == "__main__":
    main(sys.argv[1:])
