"""Smoke runs of the benchmark scripts' main() in CPU mode with tiny settings (no timing assertions)."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _table(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return header, rows


def test_bench_generate_cpu_mid_smoke():
    bench = _load("bench_generate")
    text = bench.main(["--device", "cpu", "--config", "mid", "--cases", "480p5,mid5", "--num-scales", "2",
                       "--threads", "1"])
    header, rows = _table(text)
    assert header == bench.COLUMNS
    assert [(r[0], r[1]) for r in rows] == [("480p5", "ours"), ("mid5", "ours")]
    for r in rows:
        assert int(r[2]) > 0 and float(r[3]) > 0 and float(r[6]) > 0 and float(r[7]) > 0


def test_bench_generate_refuses_full_on_cpu():
    bench = _load("bench_generate")
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.main(["--device", "cpu", "--config", "full"])


def test_bench_decode_cpu_smoke():
    bench = _load("bench_decode")
    text = bench.main(["--device", "cpu", "--config", "mid", "--cells", "1x2", "--latents", "3",
                       "--chunks", "official,all", "--threads", "1"])
    header, rows = _table(text)
    assert header == bench.COLUMNS
    assert [r[3] for r in rows] == ["official", "all"] and all(r[1] == "9" for r in rows)
    assert all(float(r[5]) > 0 for r in rows)
