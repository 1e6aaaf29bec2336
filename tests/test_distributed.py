"""Two CPU ranks (torch.distributed, gloo, spawned here): calibration sums all-reduced over data-parallel ranks
equal one process's sums over the same sequences, and gain measurement sharded over the ranks into one shared cache
makes the same cache entries as one process (issue 16)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
import torch.multiprocessing as mp

from inc_ipamp.distributed import MergeError, merge_sensitivities, shard
from inc_ipamp.gains.cache import MeasurementCache
from inc_ipamp.records import OperandStats, OpSensitivity, Sensitivity

FORMATS = ["int8", "fp8_e4m3"]
WORLD = 2


def _blocks() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (1, 24), generator=g) for _ in range(4)]


def _worker(rank: int, model, part, tmp: str) -> None:
    """One rank: calibrate its share of the sequences and all-reduce; measure its share of the configs."""
    import torch.distributed as dist

    from inc_ipamp.distributed import allreduce_sensitivity
    from inc_ipamp.gains.measure import measure_gains
    from inc_ipamp.sensitivity import calibrate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        mine = calibrate(model, shard(_blocks(), rank, WORLD), FORMATS, progress=False, batch_size=1,
                         curvature_share=1.0)  # a share < 1 picks every k-th batch of each rank's own shard
        merged = allreduce_sensitivity(mine)
        gains = measure_gains(model, part, ["fp32", "int8"], "cpu", seq_len=16, reps=3, warmup=1, metrics=("ET",),
                              cache_path=f"{tmp}/shared.jsonl", progress=False, distributed=True)
        with open(f"{tmp}/rank{rank}.pkl", "wb") as f:
            pickle.dump((mine.n_samples, merged, gains), f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    from inc_ipamp.gains.measure import measure_gains
    from inc_ipamp.ops import install_attention
    from inc_ipamp.partition import partition_model
    from inc_ipamp.sensitivity import calibrate

    tmp = tmp_path_factory.mktemp("ranks")
    install_attention(tiny_llama)
    part = partition_model(tiny_llama)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the thread count is part of a measurement's cache key
    try:
        single = calibrate(tiny_llama, _blocks(), FORMATS, progress=False, batch_size=1, curvature_share=1.0)
        one = measure_gains(tiny_llama, part, ["fp32", "int8"], "cpu", seq_len=16, reps=3, warmup=1,
                            metrics=("ET",), cache_path=tmp / "single.jsonl", progress=False)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(tiny_llama, part, str(tmp)), nprocs=WORLD, join=True)
    ranks = [pickle.loads((tmp / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    return tmp, single, one, ranks


def _close(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-12), where
    elif isinstance(a, list) and any(f".{k}." in where for k in ("seq", "dseq", "cseq")):
        # per-sequence lists (batch 1): rank by rank (the shards are round-robin)
        order = [i for r in range(WORLD) for i in range(r, len(b), WORLD)]
        assert a == pytest.approx([b[i] for i in order], rel=1e-5, abs=1e-12), where
    else:
        assert a == b, where


def test_allreduced_calibration_equals_one_process(runs):
    _, single, _, ranks = runs
    assert [n for n, _, _ in ranks] == [2, 2]
    merged = ranks[0][1]
    assert merged.to_json() == ranks[1][1].to_json()  # every rank holds the same record
    assert merged.n_samples == single.n_samples == 4
    assert merged.mean_loss == pytest.approx(single.mean_loss, rel=1e-6)
    assert list(merged.ops) == list(single.ops) and merged.unreached == single.unreached
    for name, op in single.ops.items():
        _close(dataclasses.asdict(merged.ops[name]), dataclasses.asdict(op), name)


def test_sharded_measurement_makes_the_same_cache_entries(runs):
    tmp, _, one, ranks = runs
    shared, alone = MeasurementCache(tmp / "shared.jsonl"), MeasurementCache(tmp / "single.jsonl")
    assert len(shared) == len(alone) > 3
    assert set(shared.entries) == set(alone.entries)
    g0, g1 = ranks[0][2], ranks[1][2]
    table = [{n: (gg.configs, gg.gains, gg.ci, gg.flags) for n, gg in g.groups.items()} for g in (g0, g1)]
    assert json.dumps(table[0], sort_keys=True) == json.dumps(table[1], sort_keys=True)  # one table on every rank
    assert g0.reference_time_s == g1.reference_time_s  # rank 0's, broadcast
    assert set(g0.groups) == set(one.groups) and g0.reference_time_s > 0
    for name, gg in one.groups.items():
        assert g0.groups[name].configs == gg.configs
    lines = (tmp / "shared.jsonl").read_text().splitlines()
    assert len(lines) == len(shared)  # each config timed by one rank only, no line written twice


def test_merge_rules_follow_the_fields():
    """Sums add, amax is the max, per-sequence constants must agree; an op one rank never reached comes from the
    other; a field of an unknown type fails loudly instead of being dropped."""
    def rec(n, amax, calls, macs=10, reached=True):
        st = OperandStats(xg2=1.0 * n, g2=2.0, amax=amax, x2=3.0, numel=5, emp={"int8": 0.5}, lin={"int8": -1.0},
                          seq={"int8": [amax + i for i in range(n)]})
        ops = {"a": OpSensitivity("a", "linear", calls=calls, macs=macs, operands={"x": st})}
        if reached:
            ops["b"] = OpSensitivity("b", "linear", calls=calls, macs=macs, operands={"x": OperandStats(
                g2=1.0, seq={"int8": [7.0] * n})})
        return Sensitivity("m", n, 16, mean_loss=2.0 * n, formats=["int8"], ops=ops,
                           unreached=[] if reached else ["b"])

    m = merge_sensitivities([rec(1, 4.0, 1), rec(3, 2.0, 3, reached=False)])
    st = m.ops["a"].operands["x"]
    assert (m.n_samples, m.mean_loss, m.ops["a"].calls) == (4, (2.0 + 18.0) / 4, 4)
    assert (st.xg2, st.g2, st.amax, st.numel, st.emp, st.lin) == (4.0, 4.0, 4.0, 10, {"int8": 1.0}, {"int8": -2.0})
    assert m.unreached == [] and m.ops["b"].calls == 1
    # per-sequence lists: rank order, and zeros for the sequences of the rank that never reached "b"
    assert st.seq == {"int8": [4.0, 2.0, 3.0, 4.0]}
    assert m.ops["b"].operands["x"].seq == {"int8": [7.0, 0.0, 0.0, 0.0]}
    with pytest.raises(MergeError, match="macs differs"):
        merge_sensitivities([rec(1, 1.0, 1), rec(1, 1.0, 1, macs=11)])
    bad = rec(1, 1.0, 1)
    bad.ops["a"].operands["x"].emp = {"int8": "1.0"}  # a type no rule covers
    with pytest.raises(MergeError, match="OperandStats.emp"):
        merge_sensitivities([bad, bad])
