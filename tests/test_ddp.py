"""Multi-process fine-tuning: DDP over the LoRA parameters with torchrun, 2 processes, gloo
on the CPU. Both ranks must end with identical adapters, and the loss must go down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from nybble.train import example  # noqa: E402

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    import torch.distributed as dist
    from nybble.model import adapter_state_dict
    from nybble.train.trainer import FinetuneConfig, finetune
    import nybble.train.trainer as T

    model_dir, data, out = sys.argv[1:4]
    captured = {}
    original = T.load_model
    def load_model(*a, **k):
        captured["model"] = m = original(*a, **k)
        return m
    T.load_model = load_model
    cfg = FinetuneConfig(model_dir=model_dir, data=data, output_dir=out, device="cpu", lr=2e-3, r=8, alpha=16,
                         dropout=0.1, batch_size=4, grad_accum=2, max_steps=30, max_length=32, progress=False,
                         log_every=10, optim="adamw_8bit", save_steps=15)
    res = finetune(cfg)
    rank = dist.get_rank()
    torch.save({k: v.clone() for k, v in adapter_state_dict(captured["model"]).items()}, f"{out}/rank{rank}.pt")
    with open(f"{out}/losses{rank}.json", "w") as f:
        json.dump({"losses": res.losses, "world": dist.get_world_size(), "tokens": res.tokens}, f)
    dist.destroy_process_group()
''')


def _gloo_port() -> int:
    """Skips without gloo or the offline tokenizer; a free port for torchrun's rendezvous."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    try:
        example.tokenizer_dir()
    except RuntimeError as e:
        pytest.skip(str(e))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    port = _gloo_port()
    model_dir = example.build_model_dir(tmp_path / "llama", hidden=64, layers=2)
    data = example.make_dataset(tmp_path / "train.jsonl", n=256)
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           str(script), str(model_dir), str(data), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    a = torch.load(out / "rank0.pt")
    b = torch.load(out / "rank1.pt")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # layers x linear layers x (A, B)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    r0 = json.loads((out / "losses0.json").read_text())
    r1 = json.loads((out / "losses1.json").read_text())
    assert r0["world"] == 2
    assert r0["losses"] == r1["losses"]  # all-reduced: every rank logs the global loss
    first, last = sum(r0["losses"][:3]) / 3, sum(r0["losses"][-5:]) / 5
    assert last < 0.7 * first, (first, last)
    # rank 0 alone saved the adapter and the checkpoints (with one RNG file per rank)
    assert (out / "adapter_model.safetensors").is_file()
    ckpt = out / "checkpoint-000015"
    assert (ckpt / "optimizer.pt").is_file()
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert "step 30/30" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_ddp_example_on_a_cold_cache(tmp_path):
    # Rank 0 builds the example model and data; rank 1 must wait for them, never race it.
    port = _gloo_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NYBBLE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "nybble.cli", "finetune", "--example", "-o", str(tmp_path / "out"),
           "--max-steps", "2", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "cache" / "example").glob("*.tmp*"))
