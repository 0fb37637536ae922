"""Writes tests/data/bnb_nf4_checkpoint.pt: NF4 entries exactly as bitsandbytes serializes them.

Made once with bitsandbytes 0.50.2 (CPU build) and torch 2.13.0 in a separate environment:
    pip install torch==2.13.0 bitsandbytes==0.50.2 && python tests/data/make_bnb_checkpoint.py
The project never imports bitsandbytes; this file records how the fixture was made.
"""
import torch, bitsandbytes as bnb, bitsandbytes.functional as F
torch.manual_seed(1234)
cases = [  # name, shape, dtype, blocksize, double quant
    ("model.layers.0.self_attn.q_proj.weight", (64, 96), torch.bfloat16, 64, True),
    ("model.layers.0.mlp.up_proj.weight", (40, 33), torch.float16, 128, True),
    ("model.layers.1.mlp.down_proj.weight", (7, 45), torch.float32, 64, False),
    ("lm_head.weight", (300, 32), torch.bfloat16, 32, True),
]
sd, dense, deq = {}, {}, {}
for name, shape, dtype, bs, dq in cases:
    w = torch.randn(shape, dtype=torch.float32).to(dtype)
    packed, qs = F.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type="nf4")
    sd[name] = packed
    for k, v in qs.as_dict(packed=True).items():
        sd[f"{name}.{k}"] = v
    dense[name] = w
    deq[name] = F.dequantize_4bit(packed, qs)
torch.save({"bitsandbytes_version": bnb.__version__, "state_dict": sd, "dense": dense, "bnb_dequantized": deq},
           __file__.replace("make_bnb_checkpoint.py", "bnb_nf4_checkpoint.pt"))
for k, v in sd.items(): print(k, v.dtype, tuple(v.shape))
