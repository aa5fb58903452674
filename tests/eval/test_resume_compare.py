"""A comparison cut short goes on where it stopped: finished entries are kept, not measured again."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.eval.compare import compare

#: the benchmark scripts' folder: put on sys.path by the one test that imports from it, for that test
#: alone (monkeypatch.syspath_prepend), so that its modules never shadow installed ones elsewhere
BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_done_entries_are_kept_and_the_rest_measured(small):
    first = compare(small, ["q8_0", "q4_0"], max_chunks=2, progress=False)
    kept = first.results[1]
    again = compare(small, ["q8_0", "q4_0"], max_chunks=2, progress=False, done={"q4_0": kept},
                    done_base_ppl=first.base["ppl"])
    assert again.results[1] is kept
    assert again.results[0] is not first.results[0]
    assert again.results[0].metrics["kld_mean"] == pytest.approx(first.results[0].metrics["kld_mean"], rel=1e-9)
    assert [r.format for r in again.results] == ["q8_0", "q4_0"]


def test_done_entries_from_another_original_are_refused(small):
    first = compare(small, ["q4_0"], max_chunks=1, progress=False)
    with pytest.raises(LowbitError, match="not the same model, text or chunks"):
        compare(small, ["q4_0"], max_chunks=2, progress=False, done={"q4_0": first.results[0]},
                done_base_ppl=first.base["ppl"])


def test_partial_rows_resume_only_with_the_same_settings(small, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _common

    monkeypatch.setattr(_common, "OUT", tmp_path)
    cmp = compare(small, ["q4_0"], max_chunks=1, progress=False)
    rows = _common.PartialRows("x", {"chunks": 1}, resume=False)
    rows.add(cmp.results[0], cmp.base["ppl"])
    back = _common.PartialRows("x", {"chunks": 1}, resume=True)
    assert back.done == {"q4_0": cmp.results[0]}
    assert back.base_ppl == cmp.base["ppl"]
    # the kept rows stay in the file for a third run
    assert _common.PartialRows("x", {"chunks": 1}, resume=True).done == {"q4_0": cmp.results[0]}
    other = _common.PartialRows("x", {"chunks": 2}, resume=True)
    assert other.done == {} and other.base_ppl is None
    assert _common.PartialRows("x", {"chunks": 1}, resume=True).done == {}
