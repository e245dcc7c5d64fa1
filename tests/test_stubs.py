"""`python/nybble/_core.pyi` against the compiled extension: the stubs are the documented,
typed surface of the Rust core, so a function missing from them, or a parameter that the
stubs promise and the extension refuses (or the other way round), is a bug."""

import ast
import inspect
import pathlib

import numpy as np
import pytest

import nybble
from nybble import _core
from nybble.codebooks import dynamic_map

STUBS = pathlib.Path(nybble.__file__).with_name("_core.pyi")


def _stub_definitions() -> dict[str, ast.AST]:
    """The stubs' names: functions, classes, module attributes and the re-exported errors
    (``from nybble.errors import ...``); not the stubs' own imports (typing, numpy)."""
    tree = ast.parse(STUBS.read_text())
    defs = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nybble"):
            for alias in node.names:
                defs[alias.asname or alias.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defs[node.target.id] = node
    return defs


def _stub_parameters(fn: ast.FunctionDef) -> list[tuple[str, str, object]]:
    """(name, kind, default) of a stub's parameters, ``self`` dropped."""
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + [
        ast.literal_eval(d) for d in args.defaults
    ]
    out = [(a.arg, "positional", d) for a, d in zip(positional, defaults)]
    out += [
        (a.arg, "keyword", inspect.Parameter.empty if d is None else ast.literal_eval(d))
        for a, d in zip(args.kwonlyargs, args.kw_defaults)
    ]
    return [p for p in out if p[0] != "self"]


def _runtime_parameters(obj) -> list[tuple[str, str, object]]:
    kinds = {inspect.Parameter.KEYWORD_ONLY: "keyword"}
    return [
        (p.name, kinds.get(p.kind, "positional"), p.default)
        for p in inspect.signature(obj).parameters.values()
        if p.name != "self"
    ]


def test_every_public_name_of_the_extension_has_a_stub():
    stubbed = _stub_definitions()
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert public - set(stubbed) == set()
    assert {n for n in stubbed if not n.startswith("_")} - public == set()


def _signature_cases():
    defs = _stub_definitions()
    for name, node in sorted(defs.items()):
        if isinstance(node, ast.FunctionDef):
            yield pytest.param(getattr(_core, name, None), node, id=name)
        elif isinstance(node, ast.ClassDef):
            init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            if init is not None:
                yield pytest.param(getattr(_core, name, None), init, id=name)
            for meth in node.body:
                if isinstance(meth, ast.FunctionDef) and not meth.name.startswith("_"):
                    yield pytest.param(getattr(getattr(_core, name, None), meth.name, None), meth,
                                       id=f"{name}.{meth.name}")


@pytest.mark.parametrize("obj, stub", list(_signature_cases()))
def test_stub_signature_matches_the_extension(obj, stub):
    assert obj is not None, f"{stub.name} is in the stubs but not in the extension"
    if isinstance(obj, property) or not callable(obj):
        return  # a stubbed property: no signature to compare
    try:
        runtime = _runtime_parameters(obj)
    except (TypeError, ValueError):
        pytest.fail(f"{stub.name} has no text signature to check the stub against")
    stub_params = _stub_parameters(stub)
    assert [p[:2] for p in stub_params] == [p[:2] for p in runtime]  # names and kinds
    for (name, _, stub_default), (_, _, default) in zip(stub_params, runtime):
        if default is Ellipsis:  # PyO3 writes a default it cannot render as `...`: any will do
            assert stub_default is not inspect.Parameter.empty, name
        else:
            assert stub_default == default, name


def test_a_stub_mismatch_is_caught():
    """The comparison itself: a stub with a parameter the function lacks does not pass."""
    stub = ast.parse("def quantize_4bit(x, dtype, blocksize, quant_type, threads=None, simd=None, extra=1): ...")
    assert _stub_parameters(stub.body[0]) != _runtime_parameters(_core.quantize_4bit)


@pytest.mark.parametrize("level", _core.simd_levels())
def test_8bit_quantize_and_double_quantize_take_every_simd_level(level, monkeypatch):
    rng = np.random.default_rng(7)
    code = dynamic_map(signed=True)
    x = (rng.standard_normal(5000) * 3).astype(np.float32)
    want = _core.quantize_blockwise(x, "float32", code, 256, simd="portable")
    got = _core.quantize_blockwise(x, "float32", code, 256, simd=level)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    absmax = np.abs(x)
    want_dq = _core.double_quantize(absmax, code, 256, simd="portable")
    monkeypatch.setenv("NYBBLE_SIMD", level)
    got_dq = _core.double_quantize(absmax, code, 256)
    assert np.array_equal(got_dq[0], want_dq[0]) and np.array_equal(got_dq[1], want_dq[1])
    assert got_dq[2] == want_dq[2]


def test_8bit_quantize_refuses_an_unknown_simd_level(monkeypatch):
    x = np.ones(64, dtype=np.float32)
    code = np.linspace(-1, 1, 256, dtype=np.float32)
    with pytest.raises(ValueError, match="avx9000"):
        _core.quantize_blockwise(x, "float32", code, 64, simd="avx9000")
    monkeypatch.setenv("NYBBLE_SIMD", "avx9000")
    with pytest.raises(ValueError, match="avx9000"):
        _core.double_quantize(x, code, 64)
