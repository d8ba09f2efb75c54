"""Smoke runs of the benchmark scripts' main() in CPU mode with tiny settings (no timing assertions)."""
import pytest
from bench_loader import load_benchmark


def _table(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return header, rows


def test_bench_generate_cpu_mid_smoke():
    bench = load_benchmark("bench_generate")
    text = bench.main(["--device", "cpu", "--config", "mid", "--cases", "480p5,mid5", "--num-scales", "2",
                       "--threads", "1"])
    header, rows = _table(text)
    assert header == bench.COLUMNS
    assert [(r[0], r[1]) for r in rows] == [("480p5", "ours"), ("mid5", "ours")]
    for r in rows:
        assert int(r[2]) > 0 and float(r[3]) > 0 and float(r[6]) > 0 and float(r[7]) > 0


def test_bench_generate_refuses_full_on_cpu():
    bench = load_benchmark("bench_generate")
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.main(["--device", "cpu", "--config", "full"])


def test_bench_decode_cpu_smoke():
    bench = load_benchmark("bench_decode")
    text = bench.main(["--device", "cpu", "--config", "mid", "--cells", "1x2", "--latents", "3",
                       "--chunks", "official,all", "--threads", "1"])
    header, rows = _table(text)
    assert header == bench.COLUMNS
    assert [r[3] for r in rows] == ["official", "all"] and all(r[1] == "9" for r in rows)
    assert all(float(r[5]) > 0 for r in rows)
