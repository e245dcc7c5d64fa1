"""nybble.train / `nybble finetune`: data, memory arithmetic, the training loop on a tiny
random Llama (CPU), checkpoints and resume, the CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

import nybble  # noqa: E402
from nybble.cli import main  # noqa: E402
from nybble.nn import Linear4bit  # noqa: E402
from nybble.train import data as D  # noqa: E402
from nybble.train import example  # noqa: E402
from nybble.train import memory as M  # noqa: E402
from nybble.train.trainer import FinetuneConfig, finetune  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    return example.make_dataset(tmp_path_factory.mktemp("data") / "train.jsonl", n=256)


def _cfg(model, data, out, **kw):
    base = dict(model_dir=str(model), data=str(data), output_dir=str(out), lr=2e-3, r=8, alpha=16, dropout=0.1,
                batch_size=8, grad_accum=2, max_steps=8, max_length=32, progress=False, log_every=1000)
    base.update(kw)
    return FinetuneConfig(**base)


# ---------------------------------------------------------------------- data


def test_malformed_line_names_its_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n\n{"prompt": "a", "response": "b"}\n{"prompt": "x"}\n')
    with pytest.raises(D.DataError, match=r"d.jsonl:4: .*needs"):
        D.load_jsonl(p)
    p.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(D.DataError, match=r"d.jsonl:2: not valid JSON"):
        D.load_jsonl(p)
    p.write_text('["a list"]\n')
    with pytest.raises(D.DataError, match=r"d.jsonl:1: expected a JSON object"):
        D.load_jsonl(p)


def test_prompt_tokens_are_masked_and_batches_padded(tokenizer):
    recs = [{"prompt": "3 plus 4 is", "response": "7"}, {"text": "hello world again and again"}]
    ex = D.tokenize(recs, tokenizer, max_length=64)
    prompt_len = 1 + len(tokenizer("3 plus 4 is", add_special_tokens=False)["input_ids"])
    resp = tokenizer("7", add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert ex[0].labels == [D.IGNORE_INDEX] * prompt_len + resp
    assert ex[0].input_ids[prompt_len:] == resp
    assert ex[1].labels[1:] == ex[1].input_ids[1:]
    b = D.collate(ex, D.pad_id(tokenizer))
    n0, n1 = len(ex[0].input_ids), len(ex[1].input_ids)
    assert b["input_ids"].shape == (2, max(n0, n1))
    assert b["attention_mask"].sum(1).tolist() == [n0, n1]
    short = 0 if n0 < n1 else 1
    assert (b["labels"][short, min(n0, n1):] == D.IGNORE_INDEX).all()


# ---------------------------------------------------------------------- memory arithmetic


def test_paper_bits_per_parameter():
    assert M.dq_bits_per_param(64, 256) == pytest.approx(8 / 64 + 32 / (64 * 256))
    assert round(M.dq_bits_per_param(), 3) == 0.127
    assert M.weight_bits_per_param(64, double_quant=False) == 4.5
    # 70B: 4.127 bits/param is ~36 GB of weights (the paper's ~46 GB adds adapters and activations).
    assert M.paper_estimate(70e9, 0)["weights"] / 1e9 == pytest.approx(36.1, abs=0.1)


def test_measured_weight_bytes_agree_with_the_arithmetic():
    lin = torch.nn.Linear(4096, 2048, bias=False)
    q = Linear4bit.from_linear(lin, "nf4", 64, True)
    n = 4096 * 2048
    nblocks = n // 64
    tables = 16 * 4 + 256 * 4 + 4  # quant map, nested code, offset: per layer, not per param
    expected = n // 2 + nblocks + math.ceil(nblocks / 256) * 4 + tables
    assert M.linear4bit_bytes(q) == expected
    model = torch.nn.Sequential(q)
    r = M.measure(model)
    assert r.base_quantized_bytes == expected
    # Per parameter exactly 4 + 0.127 bits; the fixed tables add 1 KB per layer.
    assert (r.base_quantized_bytes - tables) * 8 / n == M.weight_bits_per_param()
    assert r.weight_bits_per_param == pytest.approx(M.weight_bits_per_param(), abs=2e-3)


def test_adapter_and_optimizer_bytes_are_on_adapters_only():
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 128))
    nybble.quantize_model(model, skip_modules=())
    nybble.add_lora(model, r=16)
    n_lora = 16 * (256 + 512) + 16 * (512 + 128)
    from nybble.optim import AdamW

    for bits, per_param in ((32, 8.0), (8, None)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = AdamW(params, optim_bits=bits)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        r = M.measure(model, opt)
        assert r.adapter_params == n_lora and r.adapter_bytes == 4 * n_lora and r.grad_bytes == 4 * n_lora
        if per_param:
            assert r.optimizer_bytes == per_param * n_lora
        else:  # 8-bit for tensors >= 4096 elements, 32-bit below (here every LoRA tensor is >= 4096 but one)
            expect = sum(2 * p.numel() + 8 * math.ceil(p.numel() / 256) if p.numel() >= 4096 else 8 * p.numel()
                         for p in params)
            assert r.optimizer_bytes == expect
        assert "optimizer states" in r.format()


# ---------------------------------------------------------------------- training


def test_finetune_loss_decreases_and_adapter_round_trips(tiny_model, train_data, tmp_path):
    out = tmp_path / "out"
    res = finetune(_cfg(tiny_model, train_data, out, max_steps=60, optim="paged_adamw_8bit"), log=lambda s: None)
    assert len(res.losses) == 60
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert res.tokens > 0 and res.tokens_per_second > 0
    assert res.memory.activation_bytes and res.memory.optimizer_bytes > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # The saved adapter reloaded onto a freshly quantized base gives a trained (lower-loss) model.
    from nybble.train.trainer import load_model

    batch = D.collate(D.tokenize(D.load_jsonl(train_data)[:16], _tok(tiny_model), 32), 0)
    fresh = load_model(tiny_model, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        base_loss = float(fresh(**batch).loss)
        nybble.load_adapter(fresh, out)
        tuned_loss = float(fresh(**batch).loss)
    assert tuned_loss < 0.6 * base_loss


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_resume_reproduces_an_uninterrupted_run(tiny_model, train_data, tmp_path):
    full = tmp_path / "full"
    finetune(_cfg(tiny_model, train_data, full, max_steps=6, save_steps=3), log=lambda s: None)
    part = tmp_path / "part"
    finetune(_cfg(tiny_model, train_data, part, max_steps=3, save_steps=3), log=lambda s: None)
    ckpt = part / "checkpoint-000003"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "rng_rank0.pt").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    finetune(_cfg(tiny_model, train_data, part, max_steps=6, save_steps=3, resume="latest"), log=lambda s: None)
    from safetensors.torch import load_file

    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training did move the adapters (B starts at zero)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)


class _GradRecorder(torch.optim.Optimizer):
    """Records each step's gradients (no update), to compare loss normalizations."""

    def __init__(self, params, lr=0.0, **_):
        super().__init__(params, {"lr": lr})
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])


def _grads_of_one_step(monkeypatch, model, data, out, **kw):
    from nybble.train import trainer

    made = []
    monkeypatch.setattr(trainer, "make_optimizer", lambda params, *a, **k: made.append(_GradRecorder(params)) or made[-1])
    finetune(_cfg(model, data, out, max_steps=1, max_grad_norm=0.0, dropout=0.0, warmup_ratio=0.0, **kw),
             log=lambda s: None)
    return made[0].grads[0]


def test_accumulated_loss_is_the_mean_over_tokens(tiny_model, tmp_path, monkeypatch):
    # Responses of very different lengths: averaging micro-batch means would weigh a
    # 1-token response like a 40-token one. Accumulating 2 x 4 must equal one batch of 8.
    # One long response among short ones: whichever micro-batch holds it has ~10x the tokens.
    recs = [{"prompt": f"item {i} is", "response": " ".join(["word"] * (40 if i == 0 else 1))} for i in range(8)]
    data = tmp_path / "uneven.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    one = _grads_of_one_step(monkeypatch, tiny_model, data, tmp_path / "a", batch_size=8, grad_accum=1, max_length=48)
    two = _grads_of_one_step(monkeypatch, tiny_model, data, tmp_path / "b", batch_size=4, grad_accum=2, max_length=48)
    assert any(g.abs().max() > 0 for g in one)
    for a, b in zip(one, two):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), float((a - b).abs().max())


def test_token_loss_sum_agrees_with_the_models_own_loss(tiny_model, tokenizer):
    # One micro-batch: summed token loss / label tokens is exactly HF's causal-LM mean loss.
    from nybble.train.trainer import _label_tokens, load_model, token_loss_sum

    recs = [{"prompt": "3 plus 4 is", "response": "7"}, {"text": "a longer text with more tokens to score"}]
    batch = D.collate(D.tokenize(recs, tokenizer, 32), D.pad_id(tokenizer))
    model = load_model(tiny_model, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        out = model(**batch)
        mine = token_loss_sum(out.logits, batch["labels"]) / _label_tokens(batch["labels"])
    assert float(mine) == pytest.approx(float(out.loss), rel=1e-5)
    assert int(_label_tokens(batch["labels"])) == int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum()) > 0


def test_non_finite_gradients_skip_steps_then_stop_with_a_checkpoint(tiny_model, train_data, tmp_path, monkeypatch):
    from nybble.train import trainer

    real = trainer.token_loss_sum
    calls = {"n": 0}

    def sometimes_nan(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == 3 else loss  # one bad micro-batch in step 2

    monkeypatch.setattr(trainer, "token_loss_sum", sometimes_nan)
    lines = []
    res = finetune(_cfg(tiny_model, train_data, tmp_path / "skip", max_steps=4), log=lines.append)
    assert res.skipped_steps == 1 and len(res.losses) == 4
    assert any("step 2: non-finite loss (nan); step skipped" in line for line in lines)
    assert all(math.isfinite(v) for i, v in enumerate(res.losses) if i != 1)

    monkeypatch.setattr(trainer, "token_loss_sum", lambda logits, labels: real(logits, labels) * float("nan"))
    monkeypatch.setattr(trainer, "MAX_NON_FINITE_STEPS", 2)
    out = tmp_path / "stop"
    with pytest.raises(trainer.NonFiniteGradientError, match="2 steps in a row"):
        finetune(_cfg(tiny_model, train_data, out, max_steps=4), log=lambda s: None)
    assert (out / "checkpoint-000002" / "adapter_model.safetensors").is_file()
    # fp16: the GradScaler skips overflow steps on its own, but a NaN loss still stops the run.
    with pytest.raises(trainer.NonFiniteGradientError, match="2 steps in a row"):
        finetune(_cfg(tiny_model, train_data, tmp_path / "stop16", max_steps=6, dtype="fp16"), log=lambda s: None)


def test_resume_refuses_changed_settings(tiny_model, train_data, tmp_path):
    out = tmp_path / "run"
    finetune(_cfg(tiny_model, train_data, out, max_steps=2, save_steps=2), log=lambda s: None)
    with pytest.raises(ValueError, match="batch_size: 8 in the checkpoint, 4 now"):
        finetune(_cfg(tiny_model, train_data, out, max_steps=4, batch_size=4, resume="latest"), log=lambda s: None)
    with pytest.raises(ValueError, match="alpha: 16 in the checkpoint, 32 now"):
        finetune(_cfg(tiny_model, train_data, out, max_steps=4, alpha=32, resume="latest"), log=lambda s: None)
    with pytest.raises(ValueError, match="nothing left to train"):
        finetune(_cfg(tiny_model, train_data, out, max_steps=2, resume="latest"), log=lambda s: None)
    # Same layout, other hyper-parameters: accepted, and the new ones are the ones used.
    lines = []
    finetune(_cfg(tiny_model, train_data, out, max_steps=3, lr=1e-5, optim="adamw_32bit", resume="latest"),
             log=lines.append)
    assert any("resume with new hyper-parameters: lr 0.002 -> 1e-05" in line for line in lines)
    assert any("step 3/3" in line and "lr 1.00e-05" in line for line in lines)


def test_fewer_examples_than_processes_is_a_clear_error(tiny_model, tmp_path):
    from nybble.train.trainer import _Batches

    ex = [D.Example([1, 2, 3], [1, 2, 3])]
    with pytest.raises(ValueError, match="1 training examples cannot be split over 2 processes"):
        _Batches(ex, 4, 0, rank=0, world=2, seed=0)


def test_cli_finetune_runs_and_reports(tiny_model, train_data, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(main, ["finetune", str(tiny_model), "--data", str(train_data), "-o", str(out),
                                  "--max-steps", "3", "--r", "4", "--batch-size", "4", "--grad-accum", "1",
                                  "--max-length", "32", "--optim", "adamw_8bit", "--no-progress", "--log-every", "1"])
    assert r.exit_code == 0, r.output
    assert "step 3/3" in r.output and "tok/s" in r.output
    assert "base weights, quantized" in r.output and "optimizer states" in r.output
    assert (out / "adapter_model.safetensors").is_file()


def test_cli_finetune_bad_data_is_a_clean_error(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"response": "no prompt"}\n')
    r = CliRunner().invoke(main, ["finetune", str(tiny_model), "--data", str(bad), "-o", str(tmp_path / "o"),
                                  "--max-steps", "1", "--no-progress"])
    assert r.exit_code == 1
    assert "bad.jsonl:2" in r.output
    assert "Traceback" not in r.output


def test_cli_example_flag_builds_everything(tmp_path, monkeypatch):
    try:
        example.tokenizer_dir()
    except RuntimeError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("NYBBLE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ex"
    r = CliRunner().invoke(main, ["finetune", "--example", "-o", str(out), "--max-steps", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (out / "example_train.jsonl").is_file() and (out / "adapter_config.json").is_file()
    assert list((tmp_path / "cache" / "example").glob("llama-*"))
    shutil.rmtree(out)


def test_long_prompt_keeps_response_and_eos(tokenizer):
    long_prompt = " ".join(["word"] * 100)
    with pytest.warns(UserWarning, match="1 prompts lost their oldest tokens, 0 responses cut"):
        ex = D.tokenize([{"prompt": long_prompt, "response": "seven"}], tokenizer, max_length=16)[0]
    resp = tokenizer("seven", add_special_tokens=False)["input_ids"]
    assert len(ex.input_ids) == 16
    assert ex.input_ids[-1] == tokenizer.sep_token_id and ex.labels[-1] == tokenizer.sep_token_id
    assert ex.labels[-1 - len(resp):-1] == resp
    assert sum(label != D.IGNORE_INDEX for label in ex.labels) == len(resp) + 1
    with pytest.raises(ValueError, match="no example has tokens to train on"):
        D.tokenize([{"prompt": "a", "response": ""}], _NoEos(tokenizer), max_length=16)


class _NoEos:
    """A tokenizer wrapper without EOS, so an empty response leaves nothing to learn."""

    def __init__(self, tok):
        self._tok = tok
        self.bos_token_id = tok.cls_token_id

    def __call__(self, *a, **k):
        return self._tok(*a, **k)


def test_fp16_training_runs_with_loss_scaling(tiny_model, train_data, tmp_path):
    # fp16 without a GradScaler underflows adapter gradients; with it, the first steps may be
    # skipped (scale too high) and the rest train.
    res = finetune(_cfg(tiny_model, train_data, tmp_path / "fp16", dtype="fp16", max_steps=4), log=lambda s: None)
    assert len(res.losses) == 4 and all(math.isfinite(v) for v in res.losses)
    assert res.skipped_steps < 4
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "fp16" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in a.items())


def test_ctrl_c_saves_the_finished_steps_and_resume_continues_exactly(tiny_model, train_data, tmp_path, monkeypatch):
    import os
    import signal

    from safetensors.torch import load_file

    from nybble.train import trainer

    full = tmp_path / "full"
    finetune(_cfg(tiny_model, train_data, full, max_steps=4), log=lambda s: None)

    real = trainer.token_loss_sum
    calls = {"n": 0}

    def ctrl_c_in_step_2(logits, labels):
        calls["n"] += 1
        if calls["n"] == 3:  # grad_accum 2: the first micro-batch of step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real(logits, labels)

    monkeypatch.setattr(trainer, "token_loss_sum", ctrl_c_in_step_2)
    part = tmp_path / "part"
    r = CliRunner().invoke(main, ["finetune", str(tiny_model), "--data", str(train_data), "-o", str(part),
                                  "--max-steps", "4", "--r", "8", "--alpha", "16", "--dropout", "0.1", "--lr", "2e-3",
                                  "--batch-size", "8", "--grad-accum", "2", "--max-length", "32", "--no-progress",
                                  "--seed", "42"])
    assert r.exit_code == 130, r.output
    assert "interrupted after step 2 of 4" in r.output and "--resume latest" in r.output
    assert (part / "checkpoint-000002" / "trainer_state.json").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    monkeypatch.setattr(trainer, "token_loss_sum", real)
    finetune(_cfg(tiny_model, train_data, part, max_steps=4, resume="latest"), log=lambda s: None)
    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_finetune_from_a_packed_checkpoint_equals_quantizing_at_load(tiny_model, train_data, tmp_path):
    # `nybble quantize` then `nybble finetune` on its output: the same NF4 + DQ weights as
    # quantizing the dense model at load, so the same losses step for step.
    from nybble import checkpoint as ck

    packed = tmp_path / "packed"
    ck.quantize_checkpoint(tiny_model, packed)
    assert "quantization_config" in json.loads((packed / "config.json").read_text())
    a = finetune(_cfg(tiny_model, train_data, tmp_path / "dense", max_steps=3, dropout=0.0), log=lambda s: None)
    b = finetune(_cfg(packed, train_data, tmp_path / "fromp", max_steps=3, dropout=0.0), log=lambda s: None)
    assert a.losses == b.losses
    assert (tmp_path / "fromp" / "adapter_model.safetensors").is_file()
