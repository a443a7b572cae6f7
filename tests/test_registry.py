"""The model registry: versions, lineage, promotion, rollback, and surviving kill -9 mid-write."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tunewise.registry import Registry, RegistryError


def _model_dir(root: Path, name: str, content: str) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_text(content)
    (d / "tunewise.json").write_text('{"base_model": "base"}')
    return d


def test_versions_lineage_promote_rollback(tmp_path):
    reg = Registry(tmp_path / "registry.sqlite")
    a = reg.register("bot", _model_dir(tmp_path, "a", "weights-a"), "base", True, run_dir="runs/a", datasets={"train": "h1"})
    b = reg.register("bot", _model_dir(tmp_path, "b", "weights-b"), "base", True, datasets={"train": "h2"})
    assert (a.ref, b.ref) == ("bot:1", "bot:2")
    # the same content again is the same version; the registry holds its own copy
    assert reg.register("bot", tmp_path / "a", "base", True).ref == "bot:1"
    (tmp_path / "a" / "adapter_model.safetensors").write_text("overwritten by the next training run")
    assert (Path(a.path) / "adapter_model.safetensors").read_text() == "weights-a"
    assert reg.get("bot:1").datasets == {"train": "h1"} and reg.get("bot").ref == "bot:2"
    c = reg.register("bot", _model_dir(tmp_path, "c", "weights-c"), "base", True,
                     datasets={"train": {"sha256": "h3", "path": "/data/train.jsonl", "records": 9}})
    assert reg.get(c.ref).datasets == {"train": "h3"}  # lineage: split -> hash; the file itself in the datasets table
    assert reg.db.execute("SELECT path, records FROM datasets WHERE hash='h3'").fetchone() == ("/data/train.jsonl", 9)
    assert reg.db.execute("SELECT path FROM datasets WHERE hash='h1'").fetchone() == (None,)  # not the split's name

    assert reg.production("bot") is None
    with pytest.raises(RegistryError, match="no production"):
        reg.get("bot:production")
    reg.promote(a.id, {"passed": True})
    reg.promote(b.id, {"passed": False}, forced=True)
    assert reg.get("bot:production").ref == "bot:2"
    assert [p["forced"] for p in reg.promotions("bot")] == [False, True]
    assert reg.rollback("bot").ref == "bot:1" and reg.production("bot").ref == "bot:1"
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback("bot")
    reg.block(b.id, {"passed": False, "reasons": ["safety"]})
    assert reg.production("bot").ref == "bot:1"  # a blocked verdict changes nothing
    reg.add_evaluation(b.id, "gate", {"checks": []})
    assert reg.evaluations(b.id)[0]["suite"] == "gate"
    with pytest.raises(RegistryError, match="bad model reference"):
        reg.get("bot:latest")
    assert reg.check() == []


WRITER = textwrap.dedent("""
    import sys, random
    from pathlib import Path
    from tunewise.registry import Registry
    root = Path(sys.argv[1]); seed = int(sys.argv[2])
    reg = Registry(root / "registry.sqlite")
    rnd = random.Random(seed)
    i = 0
    while True:
        d = root / "src" / f"m{seed}-{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_model.safetensors").write_bytes(rnd.randbytes(200_000))
        m = reg.register("bot", d, "base", True, datasets={"train": str(i)})
        reg.add_evaluation(m.id, "gate", {"checks": [{"passed": True}]})
        if rnd.random() < 0.7:
            reg.promote(m.id, {"passed": True})
        else:
            try:
                reg.rollback("bot")
            except Exception:
                pass
        i += 1
""")


def test_registry_survives_kill_9(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rnd = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for round_ in range(8):
        p = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(round_)], env=env)
        time.sleep(0.6 + rnd.random() * 0.8)  # imports take ~0.2 s; then writes are in flight
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        reg = Registry(tmp_path / "registry.sqlite")
        assert reg.check() == [], f"round {round_}: integrity"
        models = reg.models("bot")
        assert [m.version for m in models] == list(range(1, len(models) + 1)), "versions are contiguous"
        for m in models:  # every committed model has its files
            assert (Path(m.path) / "adapter_model.safetensors").stat().st_size == 200_000
        prod = reg.production("bot")
        assert prod is None or prod.id in {m.id for m in models}
        reg.close()
    assert len(models) > 3, "the writer got far enough to be interrupted mid-write"
