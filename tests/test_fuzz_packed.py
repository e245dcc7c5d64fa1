"""A fuzz harness for the packed-checkpoint layer, run for a bounded count in CI.

Beside the Rust header fuzzing (``rust/core/src/safetensors.rs::fuzz_mutated_headers`` and the
cargo-fuzz targets in ``rust/core/fuzz/``), this mutates what sits on top of the safetensors
format: the quant_state JSON, the constants of packed weights (absmax, quant_map, nested
tensors, SCB), config.json and its quantization_config, the shard index, adapter_config.json
and the adapter weights. The bases are small valid checkpoints written by ``nybble quantize``
from a tiny random Llama (4-bit with and without DQ, int8, sharded) and an adapter written by
``save_adapter``. Every mutated input goes through every reader (inspect, dequantize, verify,
load_quantized; load_adapter) and the CLI's ``inspect``; the only acceptable outcomes are
success or a nybble error (CheckpointError, CorruptFileError, NonFiniteError) that names the
file, and exit code 0 / 1 without a traceback from the CLI. The counts of inputs and outcome
classes are printed.

``NYBBLE_FUZZ_COUNT`` (default 300 inputs, about 20 s) and ``NYBBLE_FUZZ_SEED`` scale it up for
a longer local run.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_validation import tiny_llama

import nybble
from nybble import checkpoint as ck
from nybble.cli import main
from nybble.errors import CorruptFileError, NonFiniteError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from nybble.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora, load_adapter, save_adapter  # noqa: E402

COUNT = int(os.environ.get("NYBBLE_FUZZ_COUNT", "300"))
SEED = int(os.environ.get("NYBBLE_FUZZ_SEED", "11"))
NYBBLE_ERRORS = (ck.CheckpointError, CorruptFileError, NonFiniteError)

# Values a field is set to. Model dimensions in config.json get only small ones (see
# _small): a valid but huge vocab_size would make transformers allocate for real.
POOL = [None, True, False, 0, 1, -1, 2, 7, 48, 64, 65, 256, 4096, 8192, -64, 2**31, 2**63, 10**30, 1.5, 64.0, -0.0,
        "NaN", "Infinity", "", "x", "nf4", "fp4", "int8", "float32", "bfloat16", "torch.float16", "uint8", "true",
        "false", [], [1, 2], [128, 64], [64, 128], [0, 64], [-1, 64], [2**40, 2**40], [1.5], ["a"], {}, {"a": 1},
        [[[[]]]]]
SPECIALS = ["NaN", "Infinity", "-Infinity"]  # spelled as bare words in the JSON text


def _value(rng: random.Random, small: bool = False):
    v = rng.choice(POOL)
    if small and isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > 256:
        v = rng.choice([0, 1, -1, 3])
    if small and isinstance(v, list) and any(isinstance(x, int) and abs(x) > 256 for x in v):
        v = [1, 2]
    return copy.deepcopy(v)


def _dump(rng: random.Random, obj) -> str:
    text = json.dumps(obj)
    for s in SPECIALS:  # "NaN" as a string -> NaN as a (non-standard) JSON literal
        text = text.replace(f'"{s}"', s) if rng.random() < 0.5 else text
    return text


def _text_mutation(rng: random.Random, text: str) -> str:
    op = rng.randrange(7)
    i = rng.randrange(len(text) + 1)
    if op == 0:
        return text[:i]
    if op == 1:
        return text[:i] + rng.choice('{}[],:"-.eE0123456789 \\\x00\xff') + text[i:]
    if op == 2:
        return text[:i] + text[i + 1:]
    if op == 3:
        depth = rng.choice([50, 1000, 100_000])
        return "[" * depth + text + "]" * depth
    if op == 4:
        return text.replace(": ", ": -", 1) if ": " in text else text + "x"
    if op == 5:
        return rng.choice(["[1, 2]", "null", "1e999", '"s"', "", "{}", "true"])
    return text[:i] + text[i:].replace("}", ', "blocksize": 64}', 1)  # a duplicated key


def mutate_json(rng: random.Random, obj, small_keys=()) -> bytes:
    """One or two structural mutations of a JSON object, then sometimes a textual one."""
    obj = copy.deepcopy(obj)
    for _ in range(rng.choice([1, 1, 2])):
        target = obj
        if isinstance(obj, dict) and obj and rng.random() < 0.4:
            nested = [k for k, v in obj.items() if isinstance(v, dict) and v]
            if nested:
                target = obj[rng.choice(nested)]
        if not isinstance(target, dict):
            break
        keys = list(target)
        op = rng.randrange(4)
        if op == 0 and keys:
            k = rng.choice(keys)
            target[k] = _value(rng, small=k in small_keys)
        elif op == 1 and keys:
            del target[rng.choice(keys)]
        elif op == 2:
            target[rng.choice(keys + ["extra", "nested_offset", "shape", "r"])] = _value(rng)
        else:
            obj = _value(rng)
    text = _dump(rng, obj)
    if rng.random() < 0.25:
        text = _text_mutation(rng, text)
    return text.encode("utf-8", "surrogatepass")


def mutate_array(rng: random.Random, a: np.ndarray) -> np.ndarray:
    a = a.copy()
    op = rng.randrange(8)
    flat = a.reshape(-1)
    if op == 0 and flat.size and a.dtype.kind == "f":
        flat[rng.randrange(flat.size)] = rng.choice([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30])
        return a
    if op == 1 and a.dtype.kind == "f":
        return (a * rng.choice([-1.0, 0.0, 10.0, 1e-30])).astype(a.dtype)
    if op == 2:
        return flat[: max(flat.size - rng.randint(1, 3), 0)].copy()
    if op == 3:
        return np.concatenate([flat, flat[:1]]) if flat.size else np.ones(1, a.dtype)
    if op == 4:
        return flat.astype(rng.choice([np.float16, np.float64, np.int8, np.uint8, np.int32, np.float32]))
    if op == 5 and flat.size % 2 == 0 and flat.size:
        return flat.reshape(2, -1)
    if op == 6 and flat.size:
        raw = flat.view(np.uint8).copy()
        raw[rng.randrange(raw.size)] ^= 1 << rng.randrange(8)
        return raw.view(a.dtype).reshape(a.shape)
    return np.zeros(0, a.dtype)


def rewrite(path: Path, edit) -> None:
    tensors = edit(dict(load_file(str(path))))
    path.unlink()
    save_file(tensors, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- the bases


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-bases")
    dense = tiny_llama(root / "dense")
    out = {"dense": dense}
    for name, kwargs in {"nf4-dq": {}, "nf4": {"double_quant": False}, "int8": {"method": "int8"},
                         "sharded": {"max_shard_size": "30KB"}}.items():
        ck.quantize_checkpoint(dense, root / name, **kwargs)
        out[name] = root / name
    model = transformers.AutoModelForCausalLM.from_pretrained(dense)
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    save_adapter(model, root / "adapter")
    out["adapter"] = root / "adapter"
    out["base_model"] = transformers.AutoModelForCausalLM.from_pretrained(dense)
    return out


def _packed_case(rng: random.Random, bases, work: Path) -> tuple[str, Path]:
    kind = rng.choice(["nf4-dq", "nf4", "int8", "sharded"])
    folder = work / "packed"
    shutil.copytree(bases[kind], folder)
    target = rng.choice(["quant_state", "tensor", "tensor", "config", "index", "raw"])
    if target == "index" and kind != "sharded":
        target = "quant_state"
    if target == "quant_state" and kind == "int8":
        target = "tensor"
    shards = sorted(folder.glob("*.safetensors"))
    if target == "config":
        cfg = json.loads((folder / "config.json").read_text())
        small = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "head_dim"}
        (folder / "config.json").write_bytes(mutate_json(rng, cfg, small_keys=small))
        return f"{kind}/config", folder
    if target == "index":
        index = json.loads((folder / ck.INDEX_FILE).read_text())
        wm = index["weight_map"]
        op = rng.randrange(6)
        names = sorted(wm)
        if op == 0:
            del wm[rng.choice(names)]
        elif op == 1:
            wm[rng.choice(names)] = rng.choice([s.name for s in shards] + ["nope.safetensors", "../x", "", 5])
        elif op == 2:
            wm["ghost.weight"] = shards[0].name
        elif op == 3:
            gone = rng.choice(shards).name
            index["weight_map"] = {k: v for k, v in wm.items() if v != gone}
        elif op == 4:
            rng.choice(shards).unlink()
        else:
            (folder / ck.INDEX_FILE).write_bytes(mutate_json(rng, index))
            return f"{kind}/index-json", folder
        (folder / ck.INDEX_FILE).write_text(json.dumps(index))
        return f"{kind}/index", folder
    if target == "raw":
        f = rng.choice(shards)
        data = bytearray(f.read_bytes())
        if rng.random() < 0.5:
            del data[rng.randrange(len(data)):]
        else:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
        return f"{kind}/raw", folder
    # quant_state or tensor: a shard holding a packed weight.
    f = rng.choice(shards)
    tensors = load_file(str(f))
    if target == "quant_state":
        keys = [k for k in tensors if ".quant_state." in k]
        if not keys:
            target, keys = "tensor", []
        else:
            key = rng.choice(keys)
            fields = json.loads(tensors[key].tobytes())
            blob = mutate_json(rng, fields)
            rewrite(f, lambda t: {**t, key: np.frombuffer(blob, np.uint8).copy()})
            return f"{kind}/quant_state", folder
    consts = [k for k in tensors if k.endswith((".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB",
                                                ".weight_format")) or tensors[k].dtype in (np.uint8, np.int8)]
    key = rng.choice(consts or list(tensors))
    rewrite(f, lambda t: {**t, key: mutate_array(rng, t[key])})
    return f"{kind}/tensor", folder


def _adapter_case(rng: random.Random, bases, work: Path) -> tuple[str, Path]:
    folder = work / "adapter"
    shutil.copytree(bases["adapter"], folder)
    if rng.random() < 0.5:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
        (folder / ADAPTER_CONFIG).write_bytes(mutate_json(rng, cfg))
        return "adapter/config", folder
    f = folder / ADAPTER_WEIGHTS
    if rng.random() < 0.2:
        data = f.read_bytes()
        f.write_bytes(data[: rng.randrange(len(data))])
        return "adapter/raw", folder
    tensors = load_file(str(f))
    key = rng.choice(sorted(tensors))
    if rng.random() < 0.2:
        rewrite(f, lambda t: {**t, key.replace("lora_A", "lora_C"): t[key]})
    else:
        rewrite(f, lambda t: {**t, key: mutate_array(rng, t[key])})
    return "adapter/weights", folder


# ----------------------------------------------------------------------------- the run


def _classify(call, named: Path) -> str:
    try:
        call()
    except NYBBLE_ERRORS as e:
        if str(named) not in str(e):
            return f"UNNAMED {type(e).__name__}: {e}"
        return type(e).__name__
    except Exception as e:  # the point of the harness: anything else is a bug
        return f"BUG {type(e).__name__}: {e}\n{traceback.format_exc()}"
    return "ok"


def test_fuzz_packed_checkpoint_layer(bases, tmp_path, capsys):
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    by_target: Counter[str] = Counter()
    bugs = []
    started = time.perf_counter()
    runner = CliRunner()
    for i in range(COUNT):
        work = tmp_path / f"case{i}"
        work.mkdir()
        if rng.random() < 0.25:
            what, folder = _adapter_case(rng, bases, work)
            calls = [("load_adapter", lambda f=folder: load_adapter(copy.deepcopy(bases["base_model"]), f))]
        else:
            what, folder = _packed_case(rng, bases, work)
            out = work / "plain"
            calls = [("inspect", lambda f=folder: ck.inspect_checkpoint(f)),
                     ("dequantize", lambda f=folder, o=out: ck.dequantize_checkpoint(f, o)),
                     ("verify", lambda f=folder: ck.verify_checkpoint(bases["dense"], f, min_sqnr_db=-1e9)),
                     ("load_quantized", lambda f=folder: nybble.load_quantized(f, transformers.AutoModelForCausalLM))]
        by_target[what.split("/", 1)[0].split("-")[0] + "/" + what.split("/")[-1]] += 1
        for op, call in calls:
            outcome = _classify(call, folder)
            outcomes[outcome.split(":")[0] if outcome.startswith(("BUG", "UNNAMED")) else outcome] += 1
            if outcome.startswith(("BUG", "UNNAMED")):
                bugs.append(f"[{i}] {what} {op}: {outcome}")
        if what.split("/")[0] != "adapter":
            result = runner.invoke(main, ["inspect", str(folder)])
            cli = f"cli exit {result.exit_code}"
            if result.exit_code not in (0, 1) or "Traceback" in result.output or result.exception and not isinstance(
                    result.exception, SystemExit):
                bugs.append(f"[{i}] {what} cli inspect: exit {result.exit_code} {result.exception!r}\n{result.output}")
                cli += " BUG"
            outcomes[cli] += 1
        shutil.rmtree(work)
    seconds = time.perf_counter() - started
    with capsys.disabled():
        print(f"\nfuzz (seed {SEED}): {COUNT} mutated inputs ({dict(sorted(by_target.items()))}) in {seconds:.1f} s; "
              f"outcomes: {dict(sorted(outcomes.items()))}")
    assert not bugs, f"{len(bugs)} inputs ended outside nybble's errors:\n" + "\n".join(bugs[:10])
