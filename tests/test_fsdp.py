"""FSDP2 over nybble's packed layers (nybble.train.fsdp), on the CPU with gloo and 2 processes.

One torchrun launch does the distributed work and writes what it saw; the tests read it:
sharded forward / backward and state dicts bit for bit against the unsharded model, resident
packed bytes per rank, bitsandbytes' two FSDP failure modes, and ``finetune(fsdp=True)``
against one process with grad-accum 2 (losses and adapter), checkpoints and resume.
The memory arithmetic needs no processes (meta-device shapes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_ddp import _gloo_port  # noqa: E402

from nybble.train import example, fsdp  # noqa: E402
from nybble.train.config import FinetuneConfig  # noqa: E402

STEPS, SAVE_AT = 6, 3
TRAIN = dict(lr=2e-3, r=8, alpha=16, dropout=0.0, batch_size=4, max_steps=STEPS, max_length=32, progress=False,
             log_every=1, optim="adamw_32bit", device="cpu", dtype="fp32", warmup_ratio=0.0)

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from nybble.model import add_lora, adapter_state_dict
    from nybble.nn import Linear4bit, Linear8bitLt, LoraLinear
    from nybble.train import fsdp
    from nybble.train.trainer import FinetuneConfig, finetune, load_model

    model_dir, data, out, train, save = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    res = {}

    # --- a packed model of every layer kind: NF4+DQ in bf16 storage holding bf16 NaN patterns,
    # FP4 without DQ, LLM.int8(); LoRA on all.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Linear4bit.from_linear(nn.Linear(64, 128), quant_storage=torch.bfloat16)
            self.b = Linear4bit.from_linear(nn.Linear(128, 64), quant_type="fp4", double_quant=False)
            self.c = Linear8bitLt.from_linear(nn.Linear(64, 64))

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    class Net(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.norm = nn.LayerNorm(64)

        def forward(self, x):
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)

    def build():
        torch.manual_seed(0)
        net = Net()
        with torch.no_grad():
            # Codes whose bf16 view is a NaN (high byte 0x7f / 0xff, low byte > 0x80): a bf16
            # round trip through arithmetic would canonicalize them (bitsandbytes #1945).
            for blk in net.blocks:
                w = blk.a.weight.view(torch.uint8).view(-1, 2)
                w[::3, 0], w[::3, 1] = 0x81 + torch.arange(w[::3].shape[0]) % 0x7f, 0x7f
                w[1::5, 0], w[1::5, 1] = 0xc3, 0xff
        add_lora(net, r=4, alpha=8)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, LoraLinear):
                    m.lora_B.weight.normal_()
        return net

    def bits(t):
        return t.detach().contiguous().view(torch.uint8).reshape(-1)

    seen = []

    def record(module, args):  # the bytes a layer decodes (cloned: FSDP frees them after)
        seen.append(bits(module.packed_uint8()).clone())

    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    ref = build()
    ref_out = ref(x)
    ref_out.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    ref_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    nan_bf16 = int(torch.isnan(ref.blocks[0].a.base_layer.weight).sum())

    net = build()
    assert fsdp.prepare_packed(net) == 6
    full_packed = fsdp.resident_bytes(net)["packed"]
    unsharded_local = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    fsdp.shard_model(net)
    # bitsandbytes #1424: torch.chunk (FSDP's split) dropped the Params4bit subclass with its
    # quant_state. Here each shard is torch.chunk of the plain packed bytes.
    chunk_ok = all(torch.equal(fsdp.local_tensor(p).detach(), torch.chunk(unsharded_local[n], world)[rank])
                   and type(fsdp.local_tensor(p).detach()) is torch.Tensor
                   for n, p in net.named_parameters() if n in unsharded_local and "blocks" in n)
    res["resident"] = fsdp.resident_bytes(net)
    res["full_packed"] = full_packed
    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, Linear4bit)]
    y = net(x)
    y.square().sum().backward()
    for h in hooks:
        h.remove()
    ref_packed = [bits(m.packed_uint8()) for m in ref.modules() if isinstance(m, Linear4bit)]
    res["forward_equal"] = torch.equal(y, ref_out)
    res["decoded_bytes_equal"] = len(seen) == len(ref_packed) and all(torch.equal(a, b)
                                                                      for a, b in zip(seen, ref_packed))
    grads = fsdp.full_adapter_state_dict(net)
    ref_adapter_grads = {}
    for n, m in ref.named_modules():
        if isinstance(m, LoraLinear):
            ref_adapter_grads[f"base_model.model.{n}.lora_A.weight"] = m.lora_A.weight.grad
            ref_adapter_grads[f"base_model.model.{n}.lora_B.weight"] = m.lora_B.weight.grad
    gathered_grads = {}
    for n, m in net.named_modules():
        if isinstance(m, LoraLinear):
            for k in ("lora_A", "lora_B"):
                g = getattr(m, k).weight.grad
                gathered_grads[f"base_model.model.{n}.{k}.weight"] = g.full_tensor()
    res["grads_equal"] = all(torch.equal(gathered_grads[k], ref_adapter_grads[k]) for k in ref_adapter_grads)
    res["chunk_keeps_layout"] = chunk_ok

    # --- state dict: gathered == the unsharded model's, bit for bit (bf16 storage kept);
    # it reloads into a fresh model and into a fresh sharded one, with the same outputs.
    sd = fsdp.full_state_dict(net)
    res["state_dict_keys_equal"] = sorted(sd) == sorted(ref_sd)
    res["state_dict_bits_equal"] = all(sd[k].dtype == ref_sd[k].dtype and sd[k].shape == ref_sd[k].shape
                                       and torch.equal(bits(sd[k]), bits(ref_sd[k])) for k in ref_sd)
    res["storage_dtype"] = str(sd["blocks.0.a.base_layer.weight"].dtype)
    fresh = build()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(sd)
    res["reload_equal"] = torch.equal(fresh(x), ref_out)
    fsdp.shard_model(fresh)
    res["reload_sharded_equal"] = torch.equal(fresh(x), ref_out)

    # --- bitsandbytes #1945 under a mixed-precision policy that casts floating parameters:
    # nybble's packed bytes (integer parameters) are never cast, the decoded bytes are the
    # stored ones. Control: the bitsandbytes layout (the codes as a bf16 parameter) is cast.
    mp = MixedPrecisionPolicy(param_dtype=torch.float16)
    casted = build()
    fsdp.shard_model(casted, mp_policy=mp)
    seen.clear()
    hooks = [m.register_forward_pre_hook(record) for m in casted.modules() if isinstance(m, Linear4bit)]
    casted(x.half())
    res["mp_decoded_bytes_equal"] = all(torch.equal(a, b) for a, b in zip(seen, ref_packed)) and len(seen) == 4
    holder = nn.Module()
    holder.codes = nn.Parameter(ref.blocks[0].a.base_layer.weight.detach().clone(), requires_grad=False)  # bf16 storage
    holder.forward = lambda: holder.codes.view(torch.uint8) if holder.codes.dtype == torch.bfloat16 else holder.codes
    fully_shard(holder, mp_policy=mp)
    got = holder()
    res["control_bf16_param_cast"] = str(got.dtype)
    res["nan_bf16_patterns"] = nan_bf16

    # --- the example llama: resident packed bytes with LoRA, one fully_shard per decoder layer
    llama = add_lora(load_model(model_dir, torch.device("cpu"), torch.float32), r=8, alpha=16)
    fsdp.prepare_packed(llama)
    llama_full = fsdp.resident_bytes(llama)
    fsdp.shard_model(llama)
    res["llama_full"], res["llama_resident"] = llama_full, fsdp.resident_bytes(llama)
    res["llama_blocks"] = len(fsdp.transformer_blocks(llama))
    del llama

    # --- finetune --fsdp: one run with a checkpoint, one resumed from it
    base = dict(model_dir=model_dir, data=data, **train)
    r1 = finetune(FinetuneConfig(output_dir=f"{out}/run1", fsdp=True, grad_accum=1, save_steps=save, **base))
    dist.barrier()
    r2 = finetune(FinetuneConfig(output_dir=f"{out}/run2", fsdp=True, grad_accum=1, save_steps=save,
                                 resume=f"{out}/run1/checkpoint-{save:06d}", **base))
    res["losses"], res["resumed_losses"] = r1.losses, r2.losses
    with open(f"{out}/result{rank}.json", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The 2-process run (rank results, output folder) and the 1-process grad-accum-2 reference."""
    port = _gloo_port()
    tmp = tmp_path_factory.mktemp("fsdp")
    model_dir = example.build_model_dir(tmp / "llama", hidden=64, layers=2)
    data = example.make_dataset(tmp / "train.jsonl", n=64)
    out = tmp / "out"
    out.mkdir()
    script = tmp / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), str(model_dir), str(data), str(out), json.dumps(TRAIN),
           str(SAVE_AT)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    results = [json.loads((out / f"result{r}.json").read_text()) for r in (0, 1)]
    # The reference: one process, the same batch size, grad-accum 2 (what 2 ranks see per step).
    from nybble.train import finetune

    ref = finetune(FinetuneConfig(model_dir=str(model_dir), data=str(data), output_dir=str(tmp / "single"),
                                  grad_accum=2, **TRAIN), log=lambda _msg: None)
    return {"results": results, "out": out, "single": tmp / "single", "ref": ref, "log": proc.stdout + proc.stderr}


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_sharded_forward_backward_bit_identical(launched):
    for res in launched["results"]:
        assert res["forward_equal"] and res["grads_equal"]
        assert res["decoded_bytes_equal"]  # what each layer decodes are the stored bytes


def test_each_rank_holds_half_of_the_packed_bytes(launched):
    r0, r1 = launched["results"]
    for res in (r0, r1):
        assert res["resident"]["packed"] * 2 == res["full_packed"] > 0
        assert res["llama_blocks"] == 2
        full, mine = res["llama_full"], res["llama_resident"]
        assert mine["packed"] * 2 == full["packed"] > 0  # codes + absmax codes: exactly half
        assert mine["replicated"] == full["replicated"] > 0  # nested absmax, code tables: replicated
        assert mine["buffers"] == full["buffers"]  # FSDP leaves buffers (rotary tables) whole
    # embeddings, norms, head and adapters are sharded too (the vocabulary may split unevenly)
    assert r0["llama_resident"]["other"] + r1["llama_resident"]["other"] == r0["llama_full"]["other"]
    assert r0["llama_resident"]["other"] < 0.6 * r0["llama_full"]["other"]


def test_state_dict_survives_fully_shard_and_reloads(launched):
    for res in launched["results"]:
        assert res["state_dict_keys_equal"] and res["state_dict_bits_equal"]
        assert res["storage_dtype"] == "torch.bfloat16"  # bitsandbytes' quant_storage layout kept
        assert res["reload_equal"] and res["reload_sharded_equal"]


def test_bitsandbytes_failure_modes_pass_here(launched):
    for res in launched["results"]:
        # #1424: FSDP's torch.chunk of the packed weight keeps it a plain tensor of its bytes
        assert res["chunk_keeps_layout"]
        # #1945: bf16 storage holding NaN patterns, under a casting mixed-precision policy
        assert res["nan_bf16_patterns"] > 100
        assert res["mp_decoded_bytes_equal"]
        assert res["control_bf16_param_cast"] == "torch.float16"  # the bnb layout would be cast


def test_fsdp_equals_single_process_grad_accum(launched):
    ref, results = launched["ref"], launched["results"]
    assert len(ref.losses) == STEPS
    for res in results:
        assert res["losses"] == pytest.approx(ref.losses, rel=1e-5)
    assert ref.losses[-1] < ref.losses[0]
    a, b = _adapter(launched["out"] / "run1"), _adapter(launched["single"])
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for k in a:  # relative to the tensor's norm: Adam amplifies float32 noise in near-zero gradients
        assert float((a[k] - b[k]).norm() / b[k].norm()) < 1e-5, k
    assert any(v.abs().max() > 0 for k, v in a.items() if k.endswith("lora_B.weight"))


def test_fsdp_checkpoint_and_resume(launched):
    out, results = launched["out"], launched["results"]
    ckpt = out / "run1" / f"checkpoint-{SAVE_AT:06d}"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
    assert (ckpt / "optimizer_rank0.pt").is_file() and (ckpt / "optimizer_rank1.pt").is_file()
    assert not (ckpt / "optimizer.pt").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["config"]["fsdp"] is True
    for res in results:
        assert res["resumed_losses"] == pytest.approx(res["losses"][SAVE_AT:], rel=1e-6)
    a, b = _adapter(out / "run1"), _adapter(out / "run2")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8, msg=k)


def test_shard_model_errors():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        fsdp.shard_model(torch.nn.Linear(2, 2), blocks=[torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="transformer block"):
        fsdp.transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---------------------------------------------------------------------- memory arithmetic

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=32000)


@pytest.mark.parametrize("name,shape,expected_params", [("7B", LLAMA_7B, 6.74e9), ("70B", LLAMA_70B, 68.98e9)])
def test_memory_arithmetic_7b_70b(name, shape, expected_params, capsys):
    import transformers

    from nybble.train import memory

    shapes = fsdp.model_shapes(transformers.LlamaConfig(**shape), r=64)
    total = shapes.quantized + shapes.other
    assert total == pytest.approx(expected_params, rel=5e-3)  # Llama(-2) 7B / 70B parameter counts
    paper = memory.paper_estimate(shapes.quantized, shapes.adapter)
    # QLoRA's per-parameter figures: 4 bits + 0.127 bits of DQ constants per base weight
    # (8/64 + 32/(64*256)); float32 adapters, gradients and two AdamW moments: 16 bytes each.
    assert paper["weights"] * 8 / shapes.quantized == pytest.approx(4.127, abs=5e-4)
    assert sum(paper[k] for k in ("adapters", "grads", "optimizer")) == 16 * shapes.adapter
    rows = []
    for world in (1, 2, 4, 8):
        est = fsdp.sharded_estimate(shapes, world)
        # Sharding conserves the paper's bytes: the shards of every rank plus the replicated
        # nested constants make up the whole (nested absmax is 32/(64*256) bits per weight).
        nested = shapes.quantized * 32 / (64 * 256) / 8
        assert est.weights * world + nested == pytest.approx(paper["weights"], rel=1e-12)
        assert est.adapters * world == pytest.approx(16 * shapes.adapter, rel=1e-12)
        assert est.replicated < 0.002 * paper["weights"]
        rows.append((world, est))
    for (w1, e1), (w2, e2) in zip(rows, rows[1:]):
        assert e2.total < e1.total  # more ranks, less per rank
    with capsys.disabled():
        print(f"\nQLoRA {name}: {shapes.quantized / 1e9:.2f}B quantized + {shapes.other / 1e9:.2f}B other params, "
              f"{shapes.adapter / 1e6:.0f}M adapter params (r=64)")
        for world, est in rows:
            print(f"  {world} rank(s): {est.total / 1e9:6.2f} GB per rank = weights {est.weights / 1e9:.2f} + other "
                  f"{est.other / 1e9:.2f} + adapters/grads/AdamW {est.adapters / 1e9:.2f} + gathered block "
                  f"{est.gathered / 1e9:.2f} + replicated {est.replicated / 1e9:.3f}")
    if name == "70B":
        # fsdp_qlora's claim: 70B QLoRA on two 24 GB cards (the weights part at least fits).
        two = dict(rows)[2]
        assert two.weights + two.other + two.gathered + two.replicated < 24e9
        assert dict(rows)[1].weights > 24e9


def test_cli_fsdp_without_torchrun_fails_before_writing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from nybble.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["finetune", "--example", "--fsdp", "-o", str(out), "--max-steps", "1"])
    assert result.exit_code == 2 and "torchrun" in result.output, result.output
    assert not out.exists()


def test_ctrl_c_under_torchrun_fsdp_saves_one_step_every_rank_agrees_on(tmp_path):
    """Ctrl-C in the terminal (SIGINT to the whole process group) during `nybble finetune
    --fsdp` under torchrun: both ranks finish the same step, save it as one sharded
    checkpoint (one optimizer shard per rank) and stop; --resume latest continues from it."""
    import re
    import signal
    import time

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_gloo_port()), "--no-python", "nybble",
           "finetune", "--example", "--fsdp", "-o", str(out), "--max-steps", "2000", "--no-progress", "--log-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines, deadline = [], time.monotonic() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if sum(bool(re.match(r"step \d+/2000", x)) for x in lines) >= 3 or time.monotonic() > deadline:
                break
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    steps = re.findall(r"interrupted after step (\d+) of 2000", text)
    assert len(steps) == 2 and steps[0] == steps[1], text[-3000:]
    ckpt = out / f"checkpoint-{int(steps[0]):06d}"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("optimizer")) == [
        "optimizer_rank0.pt", "optimizer_rank1.pt"], text[-2000:]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == int(steps[0])
